//! What every io driver gets and must do. The portable driver (`crate::portable`) is the
//! reference implementation of this contract.
//!
//! A driver's `run_core(CoreSetup)` runs on a thread already pinned to its CPU and must:
//! - accept on every socket of `setup.listeners` (index `i` is listener `shared.names[i]`);
//!   for each connection load `shared.snapshot` once and build a [`crate::conn::Conn`] from
//!   `listeners[i]` (a `None` there closes the connection as `ListenerGone`);
//! - drive the `Conn`: feed reads while `wants_*_read()`, write `client_out()`/`backend_out()`,
//!   act on `take_event()` (`Offload` → its core's `keyops::Admission::offer` to
//!   `shared.key_ops`, with a reply that wakes this core;
//!   `HandshakeDone` → connect to `backend_addr()` within the backend connect timeout), do the
//!   half-closes the `wants_*_shutdown()` ask for, call `on_timer` at `deadline()`, and close both
//!   sockets on `closed()` / `is_finished()`;
//! - keep the `Admitted` of each key op beside its connection, fail the handshake at its
//!   deadline, and give it back to `Admission::finish` exactly once (answer, deadline or close);
//!   the gate holds the per-core bound (`key_ops.max_in_flight_per_core`) and the counters;
//! - pause accept while `max_connections_per_core` or `max_handshakes_in_flight` is reached;
//! - count everything through `setup.recorder` and call `CoreRecorder::flush` once a
//!   `FLUSH_INTERVAL` on the driver's own clock (the recorder keeps no clock of its own);
//! - on `shared.shutdown` (it registers a waker), stop accepting (close the listener sockets),
//!   let open connections finish until the drain deadline, then return.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::DataplaneConfig;
use crate::keyops::KeyOpPool;
use crate::snapshot::Prepared;
use crate::stats::CoreRecorder;
use crate::Error;

/// Listen backlog of each per-core socket.
const LISTEN_BACKLOG: i32 = 1024;

/// State shared by all cores. Nothing here is touched per byte: the snapshot is loaded once per
/// accepted connection, the key-op pool once per offloaded handshake.
#[derive(Debug)]
pub(crate) struct Shared {
    pub cfg: DataplaneConfig,
    pub names: Vec<String>,
    pub snapshot: ArcSwap<Prepared>,
    pub key_ops: KeyOpPool,
    pub shutdown: ShutdownSignal,
}

/// One core's start-up kit.
#[derive(Debug)]
pub(crate) struct CoreSetup {
    pub index: usize,
    /// Listening sockets with the index of the listener each serves (usually one per listener;
    /// more or fewer when sockets were inherited from another process with another core count).
    pub listeners: Vec<(usize, TcpListener)>,
    pub shared: Arc<Shared>,
    pub recorder: CoreRecorder,
    pub ready: ReadySignal,
}

/// A core's word to [`crate::start`] that it serves: sent with [`ReadySignal::ready`] once its
/// event loop (ring or runtime) and every listening socket are set up. Dropped unsent — the core
/// failed or panicked before that — it tells `start` that this core never became ready, and
/// `start` then fails with that core's error instead of reporting a data plane that is not there.
#[derive(Debug)]
pub(crate) struct ReadySignal {
    core: usize,
    tx: Option<std::sync::mpsc::Sender<(usize, bool)>>,
    filter: Option<crate::seccomp::Filter>,
    thread_start: Option<crate::config::ThreadStart>,
}

impl ReadySignal {
    pub(crate) fn new(
        core: usize,
        tx: std::sync::mpsc::Sender<(usize, bool)>,
        filter: Option<crate::seccomp::Filter>,
        thread_start: Option<crate::config::ThreadStart>,
    ) -> Self {
        Self {
            core,
            tx: Some(tx),
            filter,
            thread_start,
        }
    }

    /// This core accepts connections from now on. Its set-up is over, so the thread-start hook
    /// (the caller's Landlock ruleset) and then the seccomp filter (when configured) go on the
    /// calling thread first; failing either, the core is not ready.
    pub(crate) fn ready(mut self) -> Result<(), crate::Error> {
        if let Some(hook) = self.thread_start.take() {
            hook.run(&format!("tlsgate-core-{}", self.core))?;
        }
        if let Some(filter) = self.filter.take() {
            crate::seccomp::install(self.core, &filter)?;
        }
        #[cfg(debug_assertions)]
        crate::seccomp::test_hook();
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.core, true));
        }
        Ok(())
    }
}

impl Drop for ReadySignal {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.core, false));
        }
    }
}

type Waker = Box<dyn Fn() + Send + Sync>;

/// Stop-accepting-and-drain request, with a waker per core so a core blocked in its event wait
/// (epoll or ring) notices.
#[derive(Default)]
pub(crate) struct ShutdownSignal {
    requested: AtomicBool,
    deadline: Mutex<Option<Instant>>,
    wakers: Mutex<Vec<Waker>>,
}

impl std::fmt::Debug for ShutdownSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownSignal")
            .field("requested", &self.is_requested())
            .finish_non_exhaustive()
    }
}

impl ShutdownSignal {
    /// Registers a core's waker; if shutdown is already requested it runs at once.
    pub(crate) fn register(&self, waker: Waker) {
        let mut w = self.wakers.lock();
        w.push(waker);
        if self.is_requested() {
            if let Some(last) = w.last() {
                last();
            }
        }
    }

    pub(crate) fn request(&self, deadline: Instant) {
        *self.deadline.lock() = Some(deadline);
        self.requested.store(true, Ordering::Release);
        let w = self.wakers.lock();
        for wake in w.iter() {
            wake();
        }
    }

    pub(crate) fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The drain deadline (now if none was set).
    pub(crate) fn deadline(&self) -> Instant {
        let d = *self.deadline.lock();
        d.unwrap_or_else(Instant::now)
    }
}

/// Makes one SO_REUSEPORT listening socket (non-blocking), with `TCP_NODELAY` set: Linux copies
/// it to every connection the socket accepts, so neither driver sets it per connection.
pub(crate) fn listen(name: &str, addr: SocketAddr) -> Result<TcpListener, Error> {
    let err = |op: &'static str| {
        move |source| Error::Listen {
            listener: name.to_owned(),
            addr,
            op,
            source,
        }
    };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(err("socket"))?;
    s.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
    s.set_reuse_port(true).map_err(err("SO_REUSEPORT"))?;
    s.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
    s.set_tcp_nodelay(true).map_err(err("TCP_NODELAY"))?;
    s.bind(&addr.into()).map_err(err("bind"))?;
    s.listen(LISTEN_BACKLOG).map_err(err("listen"))?;
    Ok(s.into())
}

/// The address a connection accepted by a listener bound to `bound` (with its real port) was
/// made to: `bound` itself when the listener has one address and port, so no `getsockname` per
/// connection; otherwise what `ask` (getsockname) says — a wildcard listener accepts on any of
/// the host's addresses — or `bound` if even that fails.
pub(crate) fn local_addr(
    bound: SocketAddr,
    ask: impl FnOnce() -> Option<SocketAddr>,
) -> SocketAddr {
    if bound.ip().is_unspecified() || bound.port() == 0 {
        ask().unwrap_or(bound)
    } else {
        bound
    }
}

/// Proves that no other socket listens on `addr` before this process binds it with
/// `SO_REUSEPORT`, which would otherwise quietly join that socket's group (of another process,
/// with whatever configuration and keys it has) and take part of its connections. A trial socket
/// without `SO_REUSEPORT` (with `SO_REUSEADDR`, so connections in TIME_WAIT do not count) binds the
/// address and is closed again; `EADDRINUSE` means someone listens there. Port 0 is always free.
pub(crate) fn ensure_unowned(name: &str, addr: SocketAddr) -> Result<(), Error> {
    if addr.port() == 0 {
        return Ok(());
    }
    let err = |op: &'static str| {
        move |source| Error::Listen {
            listener: name.to_owned(),
            addr,
            op,
            source,
        }
    };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(err("socket"))?;
    s.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
    match s.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Error::AddressInUse {
            listener: name.to_owned(),
            addr,
        }),
        Err(e) => Err(err("bind")(e)),
    }
}

/// Pins the calling thread; a CPU the process may not use is logged, not fatal (containers
/// often restrict the CPU set after the configuration was written).
pub(crate) fn pin(core: usize, cpu: usize) {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        tracing::warn!(
            core,
            cpu,
            "could not pin the worker thread to its CPU; running unpinned"
        );
    }
}

// Test code only: each `expect` here fails the test that reached it, never a running appliance.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_take_tcp_nodelay_from_the_listener() {
        let l = listen("t", "127.0.0.1:0".parse().expect("literal")).expect("listen");
        let to = l.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(to).expect("connect");
        // Nagle is on for a socket nobody configured: the client's is the control.
        let sock = socket2::SockRef::from(&client);
        assert!(!sock.tcp_nodelay().expect("getsockopt"));
        l.set_nonblocking(false).expect("blocking");
        let (accepted, _) = l.accept().expect("accept");
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().expect("getsockopt"));
    }

    #[test]
    fn the_local_address_is_asked_for_only_when_the_listener_does_not_know_it() {
        let asked = |bound: &str| {
            let mut n = 0;
            let bound: SocketAddr = bound.parse().expect("literal");
            let got = local_addr(bound, || {
                n += 1;
                Some("127.0.0.2:7".parse().expect("literal"))
            });
            (got.to_string(), n)
        };
        assert_eq!(asked("127.0.0.1:443"), ("127.0.0.1:443".into(), 0));
        assert_eq!(asked("[::1]:443"), ("[::1]:443".into(), 0));
        assert_eq!(asked("0.0.0.0:443"), ("127.0.0.2:7".into(), 1));
        assert_eq!(asked("[::]:443"), ("127.0.0.2:7".into(), 1));
        assert_eq!(asked("127.0.0.1:0"), ("127.0.0.2:7".into(), 1));
        // getsockname failing (the peer already reset): the listener's address.
        let bound: SocketAddr = "0.0.0.0:443".parse().expect("literal");
        assert_eq!(local_addr(bound, || None), bound);
    }
}
