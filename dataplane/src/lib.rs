//! tlsgate's TLS terminator.
//!
//! # Shape
//!
//! - **Thread per core.** [`start`] makes, for every listener, one `SO_REUSEPORT` socket per
//!   configured core (the first binds, port 0 included; the others bind the port it got), then
//!   starts one worker thread per core, pinned to its CPU. The kernel spreads connections over the
//!   sockets and a connection lives its whole life on the core that accepted it. Nothing on the
//!   per-connection path takes a lock: per-core counters are relaxed atomics written only by their
//!   core, the snapshot is an `arc-swap` load per accepted connection.
//! - **Sans-io core** ([`conn::Conn`]): bytes in → rustls → bytes out, with bounded buffers each
//!   way (`limits.buffer_bytes`) and `wants_client_read()` / `wants_backend_read()` as the
//!   backpressure signals, TLS close_notify ↔ TCP FIN half-close mapping, PROXY v2 header. It
//!   knows no sockets, so both drivers share it and it is tested in memory.
//! - **Drivers** (`driver` module docs give the contract): the portable driver (tokio
//!   current-thread runtime per core, epoll) is the reference; the io_uring driver follows the
//!   same contract. `io = "auto"` picks io_uring when it can run and says in the log and in the
//!   `tlsgate_io_driver` gauge which one runs.
//! - **Key operations never block an io thread.** rustls signs inside
//!   `Accepted::into_connection()`. For a listener with `offload_key_ops` the core keeps the raw
//!   ClientHello flight (bounded by `max_client_hello_bytes`) and:
//!   - if the hello may resume (PSK / ticket), runs `into_connection()` inline with a *tripwire*
//!     twin of the config whose keys refuse to sign: a resumption completes inline with no
//!     signature; a full handshake trips the wire, the attempt is discarded (nothing was sent);
//!   - otherwise, or when the wire tripped, hands the flight and the real config to a key-op
//!     worker ([`keyops::KeyOpPool`]) that replays it through a fresh `Acceptor` and runs
//!     `into_connection()` there; the `ServerConnection` comes back through the driver's reply
//!     closure (a oneshot into the core's runtime; a channel and the ring's eventfd for io_uring).
//!
//!   After a TLS 1.3 HelloRetryRequest the second ClientHello is where a full handshake signs:
//!   the connection itself goes to a worker to process it (an inline tripwire attempt that ends
//!   in a retry is discarded unsent).
//!
//!   Replaying the flight rather than sending `Accepted` across lets the tripwire attempt consume
//!   `Accepted` inline and keeps the job a plain byte vector. Software-key listeners sign inline.
//!   `danger_inline_key_ops` forces inline signing for comparisons.
//! - **Bounded key-op queue**: per core (`key_ops.max_in_flight_per_core`, held by the one
//!   admission gate each core of either driver puts in front of the pool,
//!   `keyops::admission`) and in total (`key_ops.queue_depth`); each request has a deadline
//!   (`key_ops.deadline_ms`). Full or late fails that handshake with an `internal_error` alert,
//!   a counter and a debug log line; the per-core handshake bound pauses accept instead of
//!   letting memory grow.
//! - **Reload**: [`Dataplane::update`] publishes a new snapshot; cores use it for connections
//!   accepted afterwards, live connections keep the config they started with.
//! - **Counters**: [`Dataplane::stats`] sums the per-core counters; each core also flushes deltas
//!   to the `metrics` facade about once a second (names in [`metrics`]).
#![deny(unsafe_code)]

pub mod backend_tls;
pub mod config;
pub mod conn;
mod driver;
mod error;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod keyops;
pub mod metrics;
pub mod outcome;
pub mod pool;
mod portable;
mod seccomp;
mod snapshot;
mod stats;
pub mod testing;
pub mod uring;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

pub use config::{DataplaneConfig, IoDriver, IoDriverKind, KeyOpConfig, Limits, ThreadStart};
pub use error::Error;
pub use keyops::{inline_resumption_attempt, KeyOpCounters};
pub use outcome::CloseReason;
pub use snapshot::{
    AcmeTlsAlpn, ClientCertCheck, ListenerSnapshot, Snapshot, SniFilter, ACME_TLS_ALPN,
};
pub use stats::StatsSnapshot;

use driver::{CoreSetup, Shared, ShutdownSignal};
use snapshot::Prepared;
use stats::{CoreRecorder, CoreStats};

/// A running data plane. Dropping it shuts down with no drain; prefer [`Dataplane::shutdown`].
#[derive(Debug)]
pub struct Dataplane {
    shared: Arc<Shared>,
    kind: IoDriverKind,
    addrs: Vec<(String, SocketAddr)>,
    cores: Vec<Arc<CoreStats>>,
    threads: Vec<JoinHandle<Result<(), Error>>>,
    /// A duplicate of every listening socket, by listener, for [`Dataplane::listening_sockets`];
    /// dropped when shutdown starts, so a plain stop refuses new connections as before.
    handover: parking_lot::Mutex<Vec<Vec<std::os::fd::OwnedFd>>>,
}

type PerCore = Vec<Vec<(usize, std::net::TcpListener)>>;

/// Sockets per core, per listener; the first core's bound address fixes the port.
fn bind_all(
    cfg: &DataplaneConfig,
    snapshot: &Snapshot,
) -> Result<(PerCore, Vec<(String, SocketAddr)>), Error> {
    let mut per_core: PerCore = cfg.cores.iter().map(|_| Vec::new()).collect();
    let mut addrs = Vec::new();
    for (index, l) in snapshot.listeners.iter().enumerate() {
        driver::ensure_unowned(&l.name, l.bind)?;
        let first = driver::listen(&l.name, l.bind)?;
        let bound = first.local_addr().map_err(|source| Error::Listen {
            listener: l.name.clone(),
            addr: l.bind,
            op: "getsockname",
            source,
        })?;
        addrs.push((l.name.clone(), bound));
        per_core[0].push((index, first));
        for sockets in per_core.iter_mut().skip(1) {
            sockets.push((index, driver::listen(&l.name, bound)?));
        }
    }
    Ok((per_core, addrs))
}

/// Spreads inherited sockets over the cores (see [`start_inherited`]).
fn spread_inherited(
    cfg: &DataplaneConfig,
    snapshot: &Snapshot,
    inherited: Vec<Vec<std::net::TcpListener>>,
) -> Result<(PerCore, Vec<(String, SocketAddr)>), Error> {
    if inherited.len() != snapshot.listeners.len() {
        return Err(Error::Config {
            key: "listeners",
            why: "the inherited sockets do not match the listeners",
        });
    }
    let cores = cfg.cores.len();
    let mut per_core: PerCore = cfg.cores.iter().map(|_| Vec::new()).collect();
    let mut addrs = Vec::new();
    for (index, (l, sockets)) in snapshot.listeners.iter().zip(inherited).enumerate() {
        let err = |op: &'static str| {
            let (name, addr) = (l.name.clone(), l.bind);
            move |source| Error::Listen {
                listener: name,
                addr,
                op,
                source,
            }
        };
        let Some(first) = sockets.first() else {
            return Err(Error::Config {
                key: "listeners",
                why: "a listener was handed over without a socket",
            });
        };
        // Accepted connections take TCP_NODELAY from their listener (see `driver::listen`); a
        // socket handed over by an older process may not have it.
        for s in &sockets {
            socket2::SockRef::from(s)
                .set_tcp_nodelay(true)
                .map_err(err("TCP_NODELAY"))?;
        }
        addrs.push((
            l.name.clone(),
            first.local_addr().map_err(err("getsockname"))?,
        ));
        let count = sockets.len();
        if count < cores {
            // Fewer sockets than cores: core c shares socket c % count.
            let dups = (count..cores)
                .map(|c| sockets[c % count].try_clone().map_err(err("dup")))
                .collect::<Result<Vec<_>, _>>()?;
            for (c, s) in sockets.into_iter().chain(dups).enumerate() {
                s.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
                per_core[c].push((index, s));
            }
        } else {
            // As many or more: socket s goes to core s % cores.
            for (i, s) in sockets.into_iter().enumerate() {
                s.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
                per_core[i % cores].push((index, s));
            }
        }
    }
    Ok((per_core, addrs))
}

/// Binds every listener on every core, starts the key-op pool and the pinned core threads.
/// Returns once every core has its event loop and listening sockets set up and is accepting
/// (connections made before that wait in the backlog). A core that fails to set up makes the
/// whole start fail with that core's error (`Error::Worker { core, .. }`); the other cores are
/// stopped first.
pub fn start(cfg: DataplaneConfig, snapshot: Arc<Snapshot>) -> Result<Dataplane, Error> {
    start_with(cfg, snapshot, None)
}

/// [`start`] on listening sockets another process made (a binary upgrade hands them over):
/// `inherited[i]` are the sockets of `snapshot.listeners[i]`, every one of them already bound
/// and listening (the other process's per-core `SO_REUSEPORT` group). Nothing is bound and the
/// port-ownership probe is skipped: the sockets *are* the ones that own the port. With as many
/// sockets as cores, each core takes one; with more sockets than cores, a core accepts on
/// several (every socket of the group is served, or the connections the kernel queues on it
/// would wait until the other process closes it, and be reset then); with fewer, cores share a
/// socket (duplicated; the kernel hands each connection to one of them).
pub fn start_inherited(
    cfg: DataplaneConfig,
    snapshot: Arc<Snapshot>,
    inherited: Vec<Vec<std::net::TcpListener>>,
) -> Result<Dataplane, Error> {
    start_with(cfg, snapshot, Some(inherited))
}

fn start_with(
    cfg: DataplaneConfig,
    snapshot: Arc<Snapshot>,
    inherited: Option<Vec<Vec<std::net::TcpListener>>>,
) -> Result<Dataplane, Error> {
    cfg.validate()?;
    let kind = choose_driver(cfg.io)?;
    let names: Vec<String> = snapshot.listeners.iter().map(|l| l.name.clone()).collect();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(Error::Config {
                key: "listeners.name",
                why: "listener names must be unique",
            });
        }
    }
    let (per_core, addrs) = match inherited {
        None => bind_all(&cfg, &snapshot)?,
        Some(inherited) => spread_inherited(&cfg, &snapshot, inherited)?,
    };
    // Duplicates kept for a later hand-over (the cores own and close the originals).
    let mut handover: Vec<Vec<std::os::fd::OwnedFd>> =
        snapshot.listeners.iter().map(|_| Vec::new()).collect();
    for sockets in &per_core {
        for (index, l) in sockets {
            use std::os::fd::AsFd;
            let dup = l
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| Error::Listen {
                    listener: names[*index].clone(),
                    addr: addrs[*index].1,
                    op: "dup",
                    source,
                })?;
            handover[*index].push(dup);
        }
    }
    let filter = if cfg.seccomp && !cfg.danger_inline_key_ops {
        seccomp::warm_up();
        Some(seccomp::build(cfg.switch_to)?)
    } else {
        None
    };
    let key_ops = keyops::KeyOpPool::start(&cfg.key_ops, cfg.thread_start.as_ref())?;
    let prepared = Prepared::new(&snapshot, &names);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        names,
        snapshot: ArcSwap::from_pointee(prepared),
        key_ops,
        shutdown: ShutdownSignal::default(),
    });
    ::metrics::gauge!(metrics::IO_DRIVER, "driver" => kind.as_str()).set(1.0);
    tracing::info!(driver = kind.as_str(), cores = ?cfg.cores, "data plane starting");

    let mut cores = Vec::new();
    let mut threads = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, bool)>();
    for (index, (cpu, listeners)) in cfg.cores.iter().copied().zip(per_core).enumerate() {
        let stats = Arc::new(CoreStats::default());
        cores.push(stats.clone());
        let setup = CoreSetup {
            index,
            listeners,
            shared: shared.clone(),
            recorder: CoreRecorder::new(index, stats),
            ready: driver::ReadySignal::new(
                index,
                ready_tx.clone(),
                filter.clone(),
                cfg.thread_start.clone(),
            ),
        };
        let name = format!("tlsgate-core-{index}");
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                driver::pin(index, cpu);
                match kind {
                    IoDriverKind::Portable => portable::run_core(setup),
                    IoDriverKind::Uring => uring::driver::run_core(setup),
                }
            });
        match spawned {
            Ok(h) => threads.push(h),
            Err(source) => {
                let mut dp = Dataplane {
                    shared,
                    kind,
                    addrs,
                    cores,
                    threads,
                    handover: parking_lot::Mutex::new(handover),
                };
                let _ = dp.stop(Duration::ZERO);
                return Err(Error::Spawn { name, source });
            }
        }
    }
    drop(ready_tx);
    let mut not_ready = None;
    for _ in 0..threads.len() {
        match ready_rx.recv() {
            Ok((_, true)) => {}
            Ok((core, false)) => {
                not_ready = Some(core);
                break;
            }
            // Every core's signal sends on drop, so this means every sender is gone.
            Err(_) => {
                not_ready = Some(usize::MAX);
                break;
            }
        }
    }
    let mut dp = Dataplane {
        shared,
        kind,
        addrs,
        cores,
        threads,
        handover: parking_lot::Mutex::new(handover),
    };
    if let Some(core) = not_ready {
        // Joining the cores yields the failed core's own error (the others stop cleanly).
        let err = dp.stop(Duration::ZERO).err().unwrap_or(Error::Worker {
            core,
            why: "stopped before it was ready".into(),
        });
        return Err(err);
    }
    Ok(dp)
}

impl Dataplane {
    /// The actual bound address of each listener (port 0 resolved), in snapshot order.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.addrs.clone()
    }

    /// Duplicates of every listening socket, by listener name (each listener's per-core
    /// `SO_REUSEPORT` sockets), for handing them to another process (a binary upgrade). Empty
    /// once shutdown has started.
    pub fn listening_sockets(&self) -> Result<Vec<(String, Vec<std::os::fd::OwnedFd>)>, Error> {
        let held = self.handover.lock();
        let mut out = Vec::new();
        for ((name, addr), fds) in self.addrs.iter().zip(held.iter()) {
            let dups = fds
                .iter()
                .map(|fd| fd.try_clone())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| Error::Listen {
                    listener: name.clone(),
                    addr: *addr,
                    op: "dup",
                    source,
                })?;
            out.push((name.clone(), dups));
        }
        Ok(out)
    }

    /// The driver that runs.
    pub fn driver(&self) -> IoDriverKind {
        self.kind
    }

    /// Publishes a new snapshot for connections accepted from now on. Listeners are matched by
    /// name; a listener missing from `snapshot` refuses new connections (counted as
    /// `listener_gone`) until a later snapshot has it again; a new name is ignored (sockets are
    /// made at start only) and logged.
    pub fn update(&self, snapshot: Arc<Snapshot>) {
        for l in &snapshot.listeners {
            if !self.shared.names.contains(&l.name) {
                tracing::warn!(listener = %l.name, "snapshot names a listener that was not bound at start; ignored");
            }
        }
        let prepared = Prepared::new(&snapshot, &self.shared.names);
        self.shared.snapshot.store(Arc::new(prepared));
    }

    /// The key-op pool's depth now and its counters (expired in the queue, finished late), with
    /// the requests the cores refused (in-flight bound or queue full) as `shed`.
    pub fn key_op_counters(&self) -> KeyOpCounters {
        KeyOpCounters {
            shed: self.stats().key_ops_rejected,
            ..self.shared.key_ops.counters()
        }
    }

    /// Each core's heartbeat: a counter its own loop advances about once a second (with its
    /// metrics flush). One that stops moving belongs to a core that makes no progress; the
    /// systemd watchdog in `tlsgate serve` watches these.
    pub fn core_heartbeats(&self) -> Vec<u64> {
        self.cores
            .iter()
            .map(|c| c.heartbeat.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// The route tables of the published snapshot by listener (a plain `backend` shows as a
    /// one-pool table), for health checks, metrics and the management API.
    pub fn routes(&self) -> Vec<(String, Arc<pool::RouteTable>)> {
        self.shared
            .snapshot
            .load()
            .listeners
            .iter()
            .flatten()
            .map(|l| (l.snap.name.clone(), l.routes.clone()))
            .collect()
    }

    /// Counters of all cores, summed now.
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::sum(&self.cores)
    }

    /// Stops accepting, lets open connections finish for up to `drain`, closes the rest and joins
    /// the core threads.
    pub fn shutdown(mut self, drain: Duration) -> Result<(), Error> {
        self.stop(drain)
    }

    fn stop(&mut self, drain: Duration) -> Result<(), Error> {
        self.handover.lock().clear();
        self.shared.shutdown.request(Instant::now() + drain);
        let mut first_err = None;
        for (core, t) in self.threads.drain(..).enumerate() {
            let r = match t.join() {
                Ok(r) => r,
                Err(_) => Err(Error::Worker {
                    core,
                    why: "thread panicked".into(),
                }),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        self.shared.key_ops.close();
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let _ = self.stop(Duration::ZERO);
        }
    }
}

/// Picks the driver. `auto` runs io_uring when the kernel and sandbox allow it, else the
/// portable driver, and says why.
fn choose_driver(io: IoDriver) -> Result<IoDriverKind, Error> {
    match io {
        IoDriver::Portable => Ok(IoDriverKind::Portable),
        IoDriver::Uring => match uring::check_available() {
            Ok(features) => {
                tracing::info!(driver = "uring", "io = uring; {features}");
                Ok(IoDriverKind::Uring)
            }
            Err(why) => Err(Error::UringUnavailable {
                why: why.to_string(),
            }),
        },
        IoDriver::Auto => match uring::check_available() {
            Ok(features) => {
                tracing::info!(driver = "uring", "io = auto: running io_uring; {features}");
                Ok(IoDriverKind::Uring)
            }
            Err(why) => {
                tracing::info!(driver = "portable", reason = %why, "io = auto: io_uring unavailable, running the portable driver");
                Ok(IoDriverKind::Portable)
            }
        },
    }
}
