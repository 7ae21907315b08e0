//! The io_uring driver of the data plane: the contract of `crate::driver`, the same sans-io
//! [`Conn`] as the portable driver, one [`EventLoop`] per core.
//!
//! Bytes the core hands out (`client_out`/`backend_out`) are copied into the ring's send
//! operations (buffers the ring keeps per core for reuse) at once and acknowledged to the core; the ring's unsent bytes per socket then
//! stand in for the core's output buffer in the backpressure decision (read one side only while
//! the other side's unsent bytes are under `limits.buffer_bytes`).
//!
//! Key operations go to the shared pool; the reply closure queues the result on this core's
//! channel and signals the loop's eventfd, which the ring reads, so the ring never waits on a
//! signature.
// Reached once `crate::driver::choose` returns `IoDriverKind::Uring` and `start` calls
// `uring::driver::run_core`; until the core wires that in, nothing calls it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ConnectError, Ctl, EventLoopBuilder, Handler, ListenerId, SocketId, Waker};
use crate::conn::{CloseReason, Conn, Event, KeyOpFailure, KeyOpResult, Target};
use crate::driver::{CoreSetup, Shared};
use crate::keyops::{job, Admission, Admitted, KeyOpJob};
use crate::stats::{CoreRecorder, KeyOpOutcome, FLUSH_INTERVAL};
use crate::Error;

/// Period of the ring's timer: the resolution of handshake, idle and key-op deadlines.
const TICK: Duration = Duration::from_millis(20);

type ConnId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Conn,
    KeyOp,
    /// A backend connect's deadline (the pool's connect timeout).
    Connect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

struct ConnState {
    conn: Conn,
    listener: String,
    client: SocketId,
    backend: Option<SocketId>,
    backend_connected: bool,
    /// When the backend connect in flight is given up; `None` once it completed.
    connect_deadline: Option<Instant>,
    handshaking: bool,
    /// The key op this connection waits for, admitted by the core's gate.
    key_op: Option<Admitted>,
    client_reading: bool,
    backend_reading: bool,
}

/// One core's state; the loop's handler.
struct Core {
    index: usize,
    shared: Arc<Shared>,
    recorder: CoreRecorder,
    /// Each listening socket and the index of the listener it serves.
    listeners: Vec<(ListenerId, usize)>,
    conns: HashMap<ConnId, ConnState>,
    socks: HashMap<SocketId, (ConnId, Side)>,
    next_id: ConnId,
    /// One `Conn` entry per connection (its `Conn::deadline`, which only moves later) and one
    /// `KeyOp` entry per outstanding key op; entries are re-checked when popped, so stale ones
    /// are harmless.
    timers: BinaryHeap<Reverse<(Instant, ConnId, Timer)>>,
    handshaking: usize,
    /// The gate in front of the key-op pool for this core's connections.
    key_ops: Admission,
    accepting: bool,
    draining: Option<Instant>,
    replies_tx: Sender<(ConnId, KeyOpResult)>,
    replies_rx: Receiver<(ConnId, KeyOpResult)>,
    waker: Waker,
    last_flush: Instant,
}

/// Runs one core until shutdown and drain complete. The thread is already pinned.
pub(crate) fn run_core(setup: CoreSetup) -> Result<(), Error> {
    let ready = setup.ready;
    let worker = |why: String| Error::Worker {
        core: setup.index,
        why,
    };
    let limits = &setup.shared.cfg.limits;
    let buf_size = u32::try_from(limits.read_chunk_bytes).unwrap_or(u32::MAX);
    // One receive brings at most four times the pause threshold before it is re-armed, so a
    // slow reader's connection holds at most about five times `buffer_bytes`: with 64 KiB,
    // 256 KiB, which costs bulk nothing measurable where 64 KiB cost 20 % (BENCHMARKING.md,
    // 2026-12-05).
    let recv_quota = u32::try_from(limits.buffer_bytes.saturating_mul(4)).unwrap_or(u32::MAX);
    let mut lp = EventLoopBuilder::new()
        .buf_size(buf_size)
        .recv_quota(recv_quota)
        .tick(TICK)
        .build()
        .map_err(|e| worker(format!("io_uring loop: {e}")))?;
    let mut listeners = Vec::new();
    for (index, l) in setup.listeners {
        let id = lp
            .ctl()
            .adopt_listener(OwnedFd::from(l))
            .map_err(|e| worker(format!("adopting listener: {e}")))?;
        listeners.push((id, index));
    }
    let waker = lp.waker();
    {
        let waker = waker.clone();
        setup.shared.shutdown.register(Box::new(move || {
            let _ = waker.wake();
        }));
    }
    let (replies_tx, replies_rx) = mpsc::channel();
    let key_ops = Admission::new(&setup.shared.cfg.key_ops);
    let mut core = Core {
        index: setup.index,
        shared: setup.shared,
        recorder: setup.recorder,
        listeners,
        conns: HashMap::new(),
        socks: HashMap::new(),
        next_id: 0,
        timers: BinaryHeap::new(),
        handshaking: 0,
        key_ops,
        accepting: true,
        draining: None,
        replies_tx,
        replies_rx,
        waker,
        last_flush: Instant::now(),
    };
    // Shutdown may have been requested before the waker was registered.
    core.check_shutdown(lp.ctl(), Instant::now());
    // The ring, its buffers and every listening socket are in place: accepts are armed on the
    // loop's first submission.
    ready.ready()?;
    let result = lp
        .run(&mut core)
        .map_err(|e| worker(format!("io_uring loop: {e}")));
    let now = Instant::now();
    let left: Vec<ConnId> = core.conns.keys().copied().collect();
    if !left.is_empty() {
        tracing::info!(
            core = core.index,
            open = left.len(),
            "drain deadline reached, closing the remaining connections"
        );
    }
    for id in left {
        core.finish(lp.ctl(), id, CloseReason::Shutdown, now);
    }
    core.recorder.flush();
    result
}

impl Core {
    fn check_shutdown(&mut self, ctl: &mut Ctl, now: Instant) {
        if self.draining.is_none() && self.shared.shutdown.is_requested() {
            self.draining = Some(self.shared.shutdown.deadline());
            for &(l, _) in &self.listeners {
                ctl.close_listener(l);
            }
        }
        if let Some(deadline) = self.draining {
            // Connections the cancelled accepts still deliver are served (drained) too.
            if (self.conns.is_empty() && ctl.accepts_settled()) || now >= deadline {
                ctl.stop();
            }
        }
    }

    fn update_accepting(&mut self, ctl: &mut Ctl) {
        if self.draining.is_some() {
            return;
        }
        let limits = &self.shared.cfg.limits;
        let full = self.conns.len() >= limits.max_connections_per_core
            || self.handshaking >= limits.max_handshakes_in_flight;
        if full == self.accepting {
            self.accepting = !full;
            if full {
                self.recorder.accept_paused();
            }
            for &(l, _) in &self.listeners {
                ctl.set_accepting(l, !full);
            }
        }
    }

    fn handshake_done(&mut self, id: ConnId) {
        if let Some(st) = self.conns.get_mut(&id) {
            if st.handshaking {
                st.handshaking = false;
                self.handshaking -= 1;
            }
        }
    }

    fn key_op_finished(&mut self, id: ConnId, outcome: KeyOpOutcome) {
        if let Some(st) = self.conns.get_mut(&id) {
            if let Some(admitted) = st.key_op.take() {
                self.key_ops.finish(admitted, outcome, &mut self.recorder);
            }
        }
    }

    /// Ends a connection: counts it, writes what the core still has for the client (an alert)
    /// and closes both sockets.
    fn finish(&mut self, ctl: &mut Ctl, id: ConnId, reason: CloseReason, now: Instant) {
        self.key_op_finished(id, KeyOpOutcome::Late);
        let Some(st) = self.conns.get(&id) else {
            return;
        };
        let handshaking = st.handshaking;
        self.recorder.closed(&st.listener, reason, handshaking);
        self.handshake_done(id);
        let Some(mut st) = self.conns.remove(&id) else {
            return;
        };
        self.socks.remove(&st.client);
        if let Some(b) = st.backend {
            self.socks.remove(&b);
        }
        let out = st.conn.client_out();
        if !out.is_empty() && reason != CloseReason::ClientIoError {
            let n = out.len();
            if ctl.send(st.client, out) {
                self.recorder.client_out(n);
                st.conn.client_written(n, now);
            }
        }
        match reason {
            CloseReason::ClientIoError | CloseReason::Shutdown => ctl.abort(st.client),
            _ => ctl.close(st.client),
        }
        if let Some(b) = st.backend {
            match reason {
                CloseReason::Done => ctl.close(b),
                _ => ctl.abort(b),
            }
        }
        st.conn.log_access(self.index, reason);
        if reason != CloseReason::Done {
            crate::stats::log_closed(self.index, &st.listener, None, reason);
        }
    }

    fn submit_key_op(&mut self, id: ConnId, job: KeyOpJob, now: Instant) {
        let tx = self.replies_tx.clone();
        let waker = self.waker.clone();
        let reply = Box::new(move |r| {
            // The core may have shut down; then nobody waits for this answer.
            if tx.send((id, r)).is_ok() {
                let _ = waker.wake();
            }
        });
        let offered = self
            .key_ops
            .offer(&self.shared.key_ops, &self.recorder, job, reply, now);
        let Some(st) = self.conns.get_mut(&id) else {
            if let Ok(admitted) = offered {
                self.key_ops
                    .finish(admitted, KeyOpOutcome::Late, &mut self.recorder);
            }
            return;
        };
        match offered {
            Ok(admitted) => {
                let at = admitted.deadline();
                st.key_op = Some(admitted);
                self.timers.push(Reverse((at, id, Timer::KeyOp)));
            }
            Err(refused) => st.conn.on_key_op_done(Err(refused), now),
        }
    }

    /// Everything the portable driver does between two waits, for one connection.
    fn progress(&mut self, ctl: &mut Ctl, id: ConnId, now: Instant) {
        loop {
            let Some(st) = self.conns.get_mut(&id) else {
                return;
            };
            let Some(ev) = st.conn.take_event() else {
                break;
            };
            match ev {
                Event::Offload(job) => self.submit_key_op(id, job, now),
                Event::HandshakeDone(info) => {
                    self.recorder.handshake_ok(&st.listener, &info);
                    let target = st.conn.pick_backend(now);
                    self.handshake_done(id);
                    if let Some(t) = target {
                        self.start_backend(ctl, id, t, now);
                    }
                }
            }
        }
        let cap = self.shared.cfg.limits.buffer_bytes;
        let Some(st) = self.conns.get_mut(&id) else {
            return;
        };
        // Hand the core's output to the ring.
        if st.conn.closed().is_none() {
            let out = st.conn.client_out();
            if !out.is_empty() {
                let n = out.len();
                if ctl.send(st.client, out) {
                    self.recorder.client_out(n);
                    st.conn.client_written(n, now);
                } else {
                    st.conn.abort(CloseReason::ClientIoError);
                }
            }
        }
        if let (Some(b), true, None) = (st.backend, st.backend_connected, st.conn.closed()) {
            let out = st.conn.backend_out();
            if !out.is_empty() {
                let n = out.len();
                if ctl.send(b, out) {
                    self.recorder.backend_out(n);
                    st.conn.backend_written(n, now);
                } else {
                    st.conn.abort(CloseReason::BackendIoError);
                }
            }
        }
        if let Some(reason) = st.conn.closed() {
            self.finish(ctl, id, reason, now);
            return;
        }
        if st.conn.wants_backend_shutdown() {
            if let Some(b) = st.backend {
                ctl.shutdown_write(b);
            }
            st.conn.backend_write_shut();
        }
        if st.conn.wants_client_shutdown() {
            ctl.shutdown_write(st.client);
            st.conn.client_write_shut();
        }
        if st.conn.is_finished() {
            self.finish(ctl, id, CloseReason::Done, now);
            return;
        }
        let backend_unsent = st.backend.map_or(0, |b| ctl.unsent_bytes(b));
        let want_cr = st.conn.wants_client_read() && backend_unsent < cap;
        if want_cr != st.client_reading {
            st.client_reading = want_cr;
            if want_cr {
                ctl.resume_recv(st.client);
            } else {
                ctl.pause_recv(st.client);
            }
        }
        if let (Some(b), true) = (st.backend, st.backend_connected) {
            let want_br = st.conn.wants_backend_read() && ctl.unsent_bytes(st.client) < cap;
            if want_br != st.backend_reading {
                st.backend_reading = want_br;
                if want_br {
                    ctl.resume_recv(b);
                } else {
                    ctl.pause_recv(b);
                }
            }
        }
    }

    fn start_backend(&mut self, ctl: &mut Ctl, id: ConnId, t: Target, now: Instant) {
        let Some(st) = self.conns.get_mut(&id) else {
            return;
        };
        // The connect's deadline is this core's timer, not a linked timeout in the ring: that
        // cost every connection a submission, a completion and a kernel timer armed and
        // cancelled, for a timeout that almost never fires.
        match ctl.connect(t.addr, None) {
            Ok(b) => {
                let at = now + t.timeout;
                st.connect_deadline = Some(at);
                self.timers.push(Reverse((at, id, Timer::Connect)));
                st.backend = Some(b);
                // The loop arms the recv on connect; our view must match.
                st.backend_reading = true;
                self.socks.insert(b, (id, Side::Backend));
            }
            Err(e) => {
                tracing::debug!(core = self.index, error = %e, "backend socket");
                st.conn.abort(CloseReason::BackendConnectFailed);
            }
        }
    }

    fn on_timers(&mut self, ctl: &mut Ctl, now: Instant) {
        while let Some(&Reverse((at, id, kind))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(st) = self.conns.get_mut(&id) else {
                continue;
            };
            match kind {
                Timer::KeyOp => {
                    if st.key_op.as_ref().map(Admitted::deadline) != Some(at) {
                        continue;
                    }
                    // The worker may still answer; key_op_finished makes that answer a no-op.
                    self.key_op_finished(id, KeyOpOutcome::TimedOut);
                    if let Some(st) = self.conns.get_mut(&id) {
                        st.conn.on_key_op_done(Err(KeyOpFailure::Deadline), now);
                    }
                    self.progress(ctl, id, now);
                }
                Timer::Connect => {
                    if st.connect_deadline != Some(at) || st.backend_connected {
                        continue;
                    }
                    st.connect_deadline = None;
                    // The connect completes as cancelled and is reported as timed out
                    // (`on_connected`), unless it completed meanwhile.
                    if let Some(b) = st.backend {
                        ctl.cancel_connect(b);
                    }
                }
                Timer::Conn => {
                    if st.conn.deadline() <= now {
                        st.conn.on_timer(now);
                        self.progress(ctl, id, now);
                    }
                    if let Some(st) = self.conns.get(&id) {
                        // At least one tick later, so a deadline that did not close the
                        // connection cannot spin here.
                        let next = st.conn.deadline().max(now + TICK);
                        self.timers.push(Reverse((next, id, Timer::Conn)));
                    }
                }
            }
        }
    }
}

impl Handler for Core {
    fn on_accept_error(&mut self, _ctl: &mut Ctl, _l: ListenerId, errno: i32) {
        self.recorder.accept_error(Some(errno), Instant::now());
    }

    fn on_accept(&mut self, ctl: &mut Ctl, l: ListenerId, sock: SocketId) {
        let now = Instant::now();
        let index = self
            .listeners
            .iter()
            .find(|&&(x, _)| x == l)
            .map_or(usize::MAX, |&(_, index)| index);
        let prepared = self.shared.snapshot.load();
        let listener = prepared.listeners.get(index).cloned().flatten();
        let name = match &listener {
            Some(pl) => pl.snap.name.clone(),
            None => self.shared.names.get(index).cloned().unwrap_or_default(),
        };
        self.recorder.accepted();
        let Some(listener) = listener else {
            self.recorder.closed(&name, CloseReason::ListenerGone, true);
            ctl.abort(sock);
            return;
        };
        let bind = listener.snap.bind;
        let peer = ctl.peer_addr(sock).unwrap_or(bind);
        let local = crate::driver::local_addr(ctl.listener_addr(l).unwrap_or(bind), || {
            ctl.local_addr(sock)
        });
        let cfg = &self.shared.cfg;
        let conn = Conn::new(
            listener,
            &cfg.limits,
            cfg.danger_inline_key_ops,
            peer,
            local,
            now,
        );
        let id = self.next_id;
        self.next_id += 1;
        self.timers
            .push(Reverse((conn.deadline(), id, Timer::Conn)));
        self.conns.insert(
            id,
            ConnState {
                conn,
                listener: name,
                client: sock,
                backend: None,
                backend_connected: false,
                connect_deadline: None,
                handshaking: true,
                key_op: None,
                client_reading: true,
                backend_reading: false,
            },
        );
        self.socks.insert(sock, (id, Side::Client));
        self.handshaking += 1;
        self.update_accepting(ctl);
        self.progress(ctl, id, now);
    }

    fn on_data(&mut self, ctl: &mut Ctl, sock: SocketId, data: &[u8]) {
        let Some(&(id, side)) = self.socks.get(&sock) else {
            return;
        };
        let now = Instant::now();
        let Some(st) = self.conns.get_mut(&id) else {
            return;
        };
        match side {
            Side::Client => {
                self.recorder.client_in(data.len());
                st.conn.on_client_data(data, now);
            }
            Side::Backend => {
                self.recorder.backend_in(data.len());
                st.conn.on_backend_data(data, now);
            }
        }
        self.progress(ctl, id, now);
        self.update_accepting(ctl);
    }

    fn on_eof(&mut self, ctl: &mut Ctl, sock: SocketId) {
        let Some(&(id, side)) = self.socks.get(&sock) else {
            return;
        };
        let now = Instant::now();
        let Some(st) = self.conns.get_mut(&id) else {
            return;
        };
        match side {
            Side::Client => {
                st.client_reading = false;
                st.conn.on_client_eof(now);
            }
            Side::Backend => {
                st.backend_reading = false;
                st.conn.on_backend_eof(now);
            }
        }
        self.progress(ctl, id, now);
        self.update_accepting(ctl);
    }

    fn on_error(&mut self, ctl: &mut Ctl, sock: SocketId, _err: std::io::Error) {
        let Some(&(id, side)) = self.socks.get(&sock) else {
            return;
        };
        let now = Instant::now();
        let reason = match side {
            Side::Client => CloseReason::ClientIoError,
            Side::Backend => CloseReason::BackendIoError,
        };
        if let Some(st) = self.conns.get_mut(&id) {
            st.conn.abort(reason);
        }
        self.progress(ctl, id, now);
        self.update_accepting(ctl);
    }

    fn on_connected(&mut self, ctl: &mut Ctl, sock: SocketId, r: Result<(), ConnectError>) {
        let Some(&(id, _)) = self.socks.get(&sock) else {
            return;
        };
        let now = Instant::now();
        let Some(st) = self.conns.get_mut(&id) else {
            return;
        };
        match r {
            Ok(()) => {
                st.backend_connected = true;
                st.connect_deadline = None;
                st.conn.on_backend_connected(now);
            }
            Err(e) => {
                // The loop already closed the socket.
                self.socks.remove(&sock);
                st.backend = None;
                st.connect_deadline = None;
                st.backend_reading = false;
                // Another server of the pool, within its connect deadline.
                let timed_out = matches!(e, ConnectError::TimedOut);
                if let Some(t) = st.conn.on_backend_connect_failed(timed_out, now) {
                    self.start_backend(ctl, id, t, now);
                }
            }
        }
        self.progress(ctl, id, now);
        self.update_accepting(ctl);
    }

    fn on_send_drained(&mut self, ctl: &mut Ctl, sock: SocketId) {
        // Backpressure released: the other side may be read again.
        if let Some(&(id, _)) = self.socks.get(&sock) {
            self.progress(ctl, id, Instant::now());
        }
    }

    fn on_tick(&mut self, ctl: &mut Ctl) {
        let now = Instant::now();
        self.on_timers(ctl, now);
        self.update_accepting(ctl);
        if now.duration_since(self.last_flush) >= FLUSH_INTERVAL {
            self.last_flush = now;
            self.recorder.flush();
        }
        self.check_shutdown(ctl, now);
    }

    fn on_wake(&mut self, ctl: &mut Ctl) {
        let now = Instant::now();
        while let Ok((id, r)) = self.replies_rx.try_recv() {
            let waiting = self.conns.get(&id).is_some_and(|st| st.key_op.is_some());
            if !waiting {
                // Late: the deadline already failed this handshake, or the connection is gone.
                continue;
            }
            self.key_op_finished(id, job::outcome(&r));
            if let Some(st) = self.conns.get_mut(&id) {
                st.conn.on_key_op_done(r, now);
            }
            self.progress(ctl, id, now);
        }
        self.update_accepting(ctl);
        self.check_shutdown(ctl, now);
    }
}
