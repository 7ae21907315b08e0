//! One connection on the portable driver: a local task that owns both sockets and the `Conn`.

use std::future::pending;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::time::Instant;

use tokio::io::{Interest, Ready};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::Core;
use crate::conn::{CloseReason, Conn, Event, KeyOpFailure, KeyOpResult, Target};
use crate::keyops::{job, Admitted};
use crate::stats::KeyOpOutcome;

/// Accounting that must happen however the task ends, including being dropped at drain end.
struct Guard {
    core: Rc<Core>,
    listener: String,
    handshaking: bool,
    /// The key op this connection waits for, admitted by its core's gate.
    key_op: Option<Admitted>,
    done: bool,
}

impl Guard {
    fn handshake_done(&mut self) {
        if self.handshaking {
            self.handshaking = false;
            self.core.handshaking.set(self.core.handshaking.get() - 1);
            self.core.capacity.notify_one();
        }
    }

    fn key_op_finished(&mut self, outcome: KeyOpOutcome) {
        if let Some(admitted) = self.key_op.take() {
            let mut recorder = self.core.recorder.borrow_mut();
            self.core.key_ops.finish(admitted, outcome, &mut recorder);
        }
    }

    fn finish(&mut self, reason: CloseReason) {
        if self.done {
            return;
        }
        self.done = true;
        self.key_op_finished(KeyOpOutcome::Late);
        self.core
            .recorder
            .borrow_mut()
            .closed(&self.listener, reason, self.handshaking);
        self.handshake_done();
        self.core.open.set(self.core.open.get() - 1);
        self.core.capacity.notify_one();
        self.core.closed.notify_one();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.finish(CloseReason::Shutdown);
    }
}

enum Wake {
    ClientReadable(io::Result<Ready>),
    ClientWritable(io::Result<()>),
    BackendReadable(io::Result<Ready>),
    BackendWritable(io::Result<()>),
    Connected(Result<io::Result<TcpStream>, tokio::time::error::Elapsed>),
    KeyOp(Result<KeyOpResult, oneshot::error::RecvError>),
    Timer,
}

/// Waits until `s` can be read, with what the readiness says (`is_read_closed`: the peer's FIN
/// is in).
async fn readable(s: Option<&TcpStream>) -> io::Result<Ready> {
    match s {
        Some(s) => s.ready(Interest::READABLE).await,
        None => pending().await,
    }
}

async fn writable(s: Option<&TcpStream>) -> io::Result<()> {
    match s {
        Some(s) => s.writable().await,
        None => pending().await,
    }
}

pub(super) async fn run(
    core: Rc<Core>,
    listener_index: usize,
    client: TcpStream,
    peer: SocketAddr,
    bound: Option<SocketAddr>,
) {
    let now = Instant::now();
    let prepared = core.shared.snapshot.load();
    let listener = prepared.listeners.get(listener_index).cloned().flatten();
    let name = match &listener {
        Some(l) => l.snap.name.clone(),
        None => core
            .shared
            .names
            .get(listener_index)
            .cloned()
            .unwrap_or_default(),
    };
    core.open.set(core.open.get() + 1);
    core.handshaking.set(core.handshaking.get() + 1);
    core.recorder.borrow().accepted();
    let mut guard = Guard {
        core: core.clone(),
        listener: name,
        handshaking: true,
        key_op: None,
        done: false,
    };
    let Some(listener) = listener else {
        guard.finish(CloseReason::ListenerGone);
        return;
    };
    // TCP_NODELAY comes with the connection from the listener (`driver::listen`).
    let local = crate::driver::local_addr(bound.unwrap_or(listener.snap.bind), || {
        client.local_addr().ok()
    });
    let cfg = &core.shared.cfg;
    let mut conn = Conn::new(
        listener,
        &cfg.limits,
        cfg.danger_inline_key_ops,
        peer,
        local,
        now,
    );
    let reason = drive(&core, &mut conn, &client, &mut guard).await;
    conn.log_access(core.index, reason);
    if reason != CloseReason::Done {
        // Best effort: an alert rustls queued for the client.
        if !conn.client_out().is_empty() {
            if let Ok(n) = client.try_write(conn.client_out()) {
                core.recorder.borrow().client_out(n);
            }
        }
        crate::stats::log_closed(core.index, &guard.listener, Some(peer), reason);
    }
    guard.finish(reason);
}

/// One connect attempt, bounded by the attempt's share of the pool's deadline.
fn connect(t: Target) -> ConnectFuture {
    Box::pin(tokio::time::timeout(t.timeout, TcpStream::connect(t.addr)))
}

type ConnectFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
            Output = Result<io::Result<TcpStream>, tokio::time::error::Elapsed>,
        >,
    >,
>;

async fn drive(core: &Core, conn: &mut Conn, client: &TcpStream, guard: &mut Guard) -> CloseReason {
    let mut backend: Option<TcpStream> = None;
    let mut connecting: Option<ConnectFuture> = None;
    let mut key_op_rx: Option<oneshot::Receiver<KeyOpResult>> = None;
    loop {
        let now = Instant::now();
        while let Some(ev) = conn.take_event() {
            match ev {
                Event::Offload(job) => {
                    let (tx, rx) = oneshot::channel();
                    let reply = Box::new(move |r| {
                        let _ = tx.send(r);
                    });
                    let recorder = core.recorder.borrow();
                    match core
                        .key_ops
                        .offer(&core.shared.key_ops, &recorder, job, reply, now)
                    {
                        Ok(admitted) => {
                            guard.key_op = Some(admitted);
                            key_op_rx = Some(rx);
                        }
                        Err(refused) => conn.on_key_op_done(Err(refused), now),
                    }
                }
                Event::HandshakeDone(info) => {
                    core.recorder
                        .borrow_mut()
                        .handshake_ok(&guard.listener, &info);
                    guard.handshake_done();
                    if let Some(t) = conn.pick_backend(now) {
                        connecting = Some(connect(t));
                    }
                }
            }
        }
        flush(core, conn, client, backend.as_ref(), now);
        if let Some(reason) = conn.closed() {
            return reason;
        }
        if conn.wants_backend_shutdown() {
            if let Some(b) = &backend {
                let _ = socket2::SockRef::from(b).shutdown(Shutdown::Write);
            }
            conn.backend_write_shut();
        }
        if conn.wants_client_shutdown() {
            let _ = socket2::SockRef::from(client).shutdown(Shutdown::Write);
            conn.client_write_shut();
        }
        if conn.is_finished() {
            return CloseReason::Done;
        }

        let want_cr = conn.wants_client_read();
        let want_cw = !conn.client_out().is_empty();
        let want_br = backend.is_some() && conn.wants_backend_read();
        let want_bw = backend.is_some() && !conn.backend_out().is_empty();
        let mut deadline = conn.deadline();
        if let Some(admitted) = &guard.key_op {
            deadline = deadline.min(admitted.deadline());
        }
        let wake = tokio::select! {
            biased;
            r = async { match key_op_rx.as_mut() { Some(rx) => rx.await, None => pending().await } } => Wake::KeyOp(r),
            r = async { match connecting.as_mut() { Some(c) => c.await, None => pending().await } } => Wake::Connected(r),
            r = writable(Some(client)), if want_cw => Wake::ClientWritable(r),
            r = writable(backend.as_ref()), if want_bw => Wake::BackendWritable(r),
            r = readable(Some(client)), if want_cr => Wake::ClientReadable(r),
            r = readable(backend.as_ref()), if want_br => Wake::BackendReadable(r),
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => Wake::Timer,
        };
        let now = Instant::now();
        match wake {
            Wake::KeyOp(r) => {
                key_op_rx = None;
                let r = r.unwrap_or(Err(KeyOpFailure::Deadline));
                guard.key_op_finished(job::outcome(&r));
                conn.on_key_op_done(r, now);
            }
            Wake::Connected(r) => {
                connecting = None;
                match r {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        backend = Some(s);
                        conn.on_backend_connected(now);
                    }
                    Ok(Err(_)) | Err(_) => {
                        // Another server of the pool, within its connect deadline.
                        if let Some(t) = conn.on_backend_connect_failed(r.is_err(), now) {
                            connecting = Some(connect(t));
                        }
                    }
                }
            }
            Wake::ClientWritable(r) => {
                if r.is_err() {
                    conn.abort(CloseReason::ClientIoError);
                }
            }
            Wake::BackendWritable(r) => {
                if r.is_err() {
                    conn.abort(CloseReason::BackendIoError);
                }
            }
            Wake::ClientReadable(r) => {
                if r.is_err() {
                    conn.abort(CloseReason::ClientIoError);
                    continue;
                }
                let mut buf = core.scratch.borrow_mut();
                match client.try_read(&mut buf) {
                    Ok(0) => conn.on_client_eof(now),
                    Ok(n) => {
                        core.recorder.borrow().client_in(n);
                        conn.on_client_data(&buf[..n], now);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => conn.abort(CloseReason::ClientIoError),
                }
            }
            Wake::BackendReadable(r) => {
                let Some(b) = backend.as_ref() else { continue };
                let Ok(ready) = r else {
                    conn.abort(CloseReason::BackendIoError);
                    continue;
                };
                let mut buf = core.scratch.borrow_mut();
                let n = read_backend(core, conn, b, &mut buf, now);
                // The backend's FIN is in too (EPOLLRDHUP) and these bytes did not fill the
                // buffer: the next read is the end. Taken now, the close_notify joins these
                // bytes' records and the FIN in one segment to the client.
                if ready.is_read_closed() && n.is_some_and(|n| n > 0 && n < buf.len()) {
                    read_backend(core, conn, b, &mut buf, now);
                }
            }
            Wake::Timer => {
                if guard.key_op.as_ref().is_some_and(|a| now >= a.deadline()) {
                    // The worker may still answer; the receiver is dropped so that answer is
                    // discarded.
                    key_op_rx = None;
                    guard.key_op_finished(KeyOpOutcome::TimedOut);
                    conn.on_key_op_done(Err(KeyOpFailure::Deadline), now);
                } else {
                    conn.on_timer(now);
                }
            }
        }
    }
}

/// Writes what each side can take without waiting.
fn flush(
    core: &Core,
    conn: &mut Conn,
    client: &TcpStream,
    backend: Option<&TcpStream>,
    now: Instant,
) {
    while !conn.client_out().is_empty() && conn.closed().is_none() {
        match write_client(client, conn.client_out(), conn.client_out_is_final()) {
            Ok(n) => {
                core.recorder.borrow().client_out(n);
                conn.client_written(n, now);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => conn.abort(CloseReason::ClientIoError),
        }
    }
    if let Some(b) = backend {
        while !conn.backend_out().is_empty() && conn.closed().is_none() {
            match b.try_write(conn.backend_out()) {
                Ok(n) => {
                    core.recorder.borrow().backend_out(n);
                    conn.backend_written(n, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => conn.abort(CloseReason::BackendIoError),
            }
        }
    }
}

/// Writes to the client; the bytes before the FIN (`last`) with `MSG_MORE`, which holds a
/// partial segment back (despite `TCP_NODELAY`) until the `shutdown(2)` that follows puts the
/// FIN on it: the client gets the close_notify and the FIN in one segment, not two.
fn write_client(client: &TcpStream, buf: &[u8], last: bool) -> io::Result<usize> {
    if !last {
        return client.try_write(buf);
    }
    client.try_io(Interest::WRITABLE, || {
        socket2::SockRef::from(client).send_with_flags(buf, libc::MSG_MORE | libc::MSG_NOSIGNAL)
    })
}

/// One read from the backend into `buf`, handed to `conn`; `Some(n)` when it read `n` bytes
/// (0: the backend's FIN).
fn read_backend(
    core: &Core,
    conn: &mut Conn,
    b: &TcpStream,
    buf: &mut [u8],
    now: Instant,
) -> Option<usize> {
    match b.try_read(buf) {
        Ok(0) => {
            conn.on_backend_eof(now);
            Some(0)
        }
        Ok(n) => {
            core.recorder.borrow().backend_in(n);
            conn.on_backend_data(&buf[..n], now);
            Some(n)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(_) => {
            conn.abort(CloseReason::BackendIoError);
            None
        }
    }
}
