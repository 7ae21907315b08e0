//! The per-core reactor: one ring, its provided buffer ring, and the slab of in-flight
//! operations.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, squeue, types, IoUring};

use super::bufring::BufRing;
use super::ctl::{Ctl, Op, Pending, SockState, Socket};
use super::probe::{probe_recv_limit, probe_ring, Features};
use super::slab::{Key, Slab};
use super::sys;
use super::UringError;

/// Default submission queue depth; the completion queue gets twice as many entries because
/// multishot operations produce several completions per submission.
pub const DEFAULT_RING_ENTRIES: u32 = 1024;
/// Default number of receive buffers in the provided buffer ring (a power of two).
pub const DEFAULT_BUF_COUNT: u16 = 1024;
/// Default size of one receive buffer, in bytes: one full TLS record plus its header.
pub const DEFAULT_BUF_SIZE: u32 = 16 * 1024 + 512;
/// Default byte limit of one multishot receive ([`EventLoopBuilder::recv_quota`]).
pub const DEFAULT_RECV_QUOTA: u32 = 256 * 1024;
/// Default period of the timer tick that drives per-connection timeouts.
pub const DEFAULT_TICK: Duration = Duration::from_millis(100);
/// Default listen backlog.
pub(super) const LISTEN_BACKLOG: i32 = 1024;
/// The buffer group id of the loop's one buffer ring.
pub(super) const BUF_GROUP: u16 = 0;
/// How long dropping a loop waits for the kernel to give back cancelled operations.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

/// Builds an [`EventLoop`] on the thread that will run it.
#[derive(Debug, Clone)]
pub struct EventLoopBuilder {
    ring_entries: u32,
    buf_count: u16,
    buf_size: u32,
    tick: Duration,
    pin_core: Option<usize>,
    recv_quota: u32,
    recv_limit: bool,
}

impl Default for EventLoopBuilder {
    fn default() -> Self {
        EventLoopBuilder {
            ring_entries: DEFAULT_RING_ENTRIES,
            buf_count: DEFAULT_BUF_COUNT,
            buf_size: DEFAULT_BUF_SIZE,
            tick: DEFAULT_TICK,
            pin_core: None,
            recv_quota: DEFAULT_RECV_QUOTA,
            recv_limit: true,
        }
    }
}

impl EventLoopBuilder {
    /// A builder with the documented defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Submission queue depth ([`DEFAULT_RING_ENTRIES`]).
    pub fn ring_entries(mut self, entries: u32) -> Self {
        self.ring_entries = entries;
        self
    }

    /// Number of receive buffers, a power of two up to 32768 ([`DEFAULT_BUF_COUNT`]).
    pub fn buf_count(mut self, count: u16) -> Self {
        self.buf_count = count;
        self
    }

    /// Size of each receive buffer in bytes ([`DEFAULT_BUF_SIZE`]).
    pub fn buf_size(mut self, size: u32) -> Self {
        self.buf_size = size;
        self
    }

    /// Period of [`Handler::on_tick`] ([`DEFAULT_TICK`]).
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// What one multishot receive may deliver before it ends and is re-armed
    /// ([`DEFAULT_RECV_QUOTA`]), where the kernel takes a byte limit on a multishot recv (Linux
    /// 6.17); elsewhere receives on a socket once paused ([`Ctl::pause_recv`]) are single-shot.
    /// With the handler's pause threshold, the bound on what a fast peer can make the core
    /// hold for a slow reader on the other side.
    pub fn recv_quota(mut self, bytes: u32) -> Self {
        self.recv_quota = bytes;
        self
    }

    /// Never use the kernel's multishot byte limit, as on a kernel without it (for tests).
    #[cfg(test)]
    pub(super) fn without_recv_limit(mut self) -> Self {
        self.recv_limit = false;
        self
    }

    /// Pins the building thread to `core` (default: not pinned).
    pub fn pin_to_core(mut self, core: usize) -> Self {
        self.pin_core = Some(core);
        self
    }

    /// Creates the ring on the calling thread, checks the required features and registers the
    /// buffer ring. Call it on the thread that will run the loop.
    pub fn build(self) -> Result<EventLoop, UringError> {
        if let Some(core) = self.pin_core {
            sys::pin_current_thread(core).map_err(|source| UringError::Pin { core, source })?;
        }
        // A linked connect + timeout pair must fit in the submission queue at once.
        let entries = self.ring_entries.max(8);
        // COOP_TASKRUN (Linux 5.19+): completions that arrive while the core computes (a
        // handshake) wait for its next io_uring_enter instead of interrupting it with an IPI and
        // a context switch; the loop enters the kernel every iteration anyway.
        let mut ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .setup_coop_taskrun()
            .build(entries)
            .map_err(|source| UringError::Setup {
                step: "io_uring_setup",
                source,
            })?;
        let mut features = probe_ring(&ring).map_err(|source| UringError::Setup {
            step: "register_probe",
            source,
        })?;
        let mut bufs = BufRing::register(&ring, BUF_GROUP, self.buf_count, self.buf_size).map_err(
            |source| UringError::Setup {
                step: "register_buf_ring",
                source,
            },
        )?;
        features.buf_ring = true;
        features.recv_limit = probe_recv_limit(&mut ring, &mut bufs);
        if let Some(what) = features.missing_required() {
            return Err(UringError::Unavailable {
                reason: super::Unavailable::MissingFeature(what),
            });
        }
        let waker_fd = sys::eventfd().map_err(|source| UringError::Setup {
            step: "eventfd",
            source,
        })?;
        let waker = Waker(Arc::new(waker_fd));
        tracing::info!(
            core = ?self.pin_core,
            ring_entries = self.ring_entries,
            buf_count = self.buf_count,
            buf_size = self.buf_size,
            "io_uring loop ready; {features}"
        );
        let mut ctl = Ctl {
            ops: Slab::with_capacity(self.ring_entries as usize),
            socks: Slab::with_capacity(256),
            listeners: Vec::new(),
            backlog: Vec::new(),
            accept_retry: Vec::new(),
            shutdown_failed: Vec::new(),
            stats: LoopStats::default(),
            stop: false,
            spare: Vec::new(),
            recv_limit: (features.recv_limit && self.recv_limit).then_some(self.recv_quota.max(1)),
        };
        ctl.arm_tick(Box::new(types::Timespec::from(self.tick)));
        ctl.arm_eventfd(waker.0.as_raw_fd(), Box::new([0; 8]));
        Ok(EventLoop {
            ring,
            bufs: ManuallyDrop::new(bufs),
            ctl,
            waker,
            features,
            watched: Vec::new(),
            cqes: Vec::with_capacity(self.ring_entries as usize * 2),
        })
    }
}

/// A listener of one loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(pub(super) usize);

/// A socket of one loop. Stale ids (the socket was closed) are ignored by every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketId(pub(super) Key);

/// Wakes a loop from another thread: [`Handler::on_wake`] runs on the loop's next turn.
#[derive(Debug, Clone)]
pub struct Waker(Arc<OwnedFd>);

impl Waker {
    /// Signals the loop's eventfd.
    pub fn wake(&self) -> io::Result<()> {
        sys::eventfd_signal(self.0.as_raw_fd())
    }
}

/// Why an outgoing connection failed. The loop closes the socket itself.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connect did not complete before its deadline (linked timeout fired).
    #[error("connect timed out")]
    TimedOut,
    /// The kernel refused or failed the connect.
    #[error("connect failed: {0}")]
    Failed(#[source] io::Error),
}

/// Counters of one loop, read by the driver for the per-core stats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Sends that wrote fewer bytes than asked and were resubmitted for the rest.
    pub partial_sends: u64,
    /// Multishot recvs that ended because the buffer ring ran dry and were re-armed.
    pub enobufs_rearms: u64,
    /// Multishot recvs re-armed for any reason (includes `enobufs_rearms`).
    pub recv_rearms: u64,
    /// Multishot accepts re-armed after the kernel ended them.
    pub accept_rearms: u64,
    /// Connects that hit their deadline.
    pub connect_timeouts: u64,
    /// Bytes received on all sockets.
    pub bytes_received: u64,
    /// Bytes sent on all sockets.
    pub bytes_sent: u64,
    /// Loop turns (one `io_uring_enter` each, plus extra ones when the queue filled).
    pub turns: u64,
    /// Completions handled.
    pub completions: u64,
}

/// What the loop reports. Every call gets the [`Ctl`] to act on sockets from inside it.
pub trait Handler {
    /// A listener accepted `sock`; its multishot recv is already armed.
    fn on_accept(&mut self, ctl: &mut Ctl, listener: ListenerId, sock: SocketId);
    /// Bytes arrived on `sock`; copy what you keep, the buffer goes back to the ring after.
    fn on_data(&mut self, ctl: &mut Ctl, sock: SocketId, data: &[u8]);
    /// The peer closed its sending side.
    fn on_eof(&mut self, ctl: &mut Ctl, sock: SocketId);
    /// A recv or send on `sock` failed (reset, broken pipe); close the socket.
    fn on_error(&mut self, ctl: &mut Ctl, sock: SocketId, err: io::Error);
    /// An outgoing connection completed; on error the id is already dead.
    fn on_connected(&mut self, ctl: &mut Ctl, sock: SocketId, result: Result<(), ConnectError>);
    /// Every byte handed to [`Ctl::send`] on `sock` has been written to the socket.
    fn on_send_drained(&mut self, _ctl: &mut Ctl, _sock: SocketId) {}
    /// The periodic tick.
    fn on_tick(&mut self, _ctl: &mut Ctl) {}
    /// Accepting on `listener` failed in the kernel with `errno` (EMFILE, ENFILE, ...); the loop
    /// re-arms it only at the next tick.
    fn on_accept_error(&mut self, _ctl: &mut Ctl, _listener: ListenerId, _errno: i32) {}
    /// A [`Waker`] or a watched eventfd fired.
    fn on_wake(&mut self, _ctl: &mut Ctl) {}
}

/// One core's reactor. Build it with [`EventLoopBuilder`] on the thread that runs it.
pub struct EventLoop {
    // Field order matters for drop: the ring goes before the memory it points into.
    ring: IoUring,
    /// Dropped by hand in `Drop`, and only once no operation can write into it.
    bufs: ManuallyDrop<BufRing>,
    ctl: Ctl,
    waker: Waker,
    features: Features,
    watched: Vec<OwnedFd>,
    cqes: Vec<(u64, i32, u32)>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("features", &self.features)
            .field("ctl", &self.ctl)
            .finish_non_exhaustive()
    }
}

impl EventLoop {
    /// The control surface, for set-up before [`EventLoop::run`].
    pub fn ctl(&mut self) -> &mut Ctl {
        &mut self.ctl
    }

    /// A handle that wakes this loop from any thread.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// What the kernel offered when the loop was built.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Reads `fd` (an eventfd owned by someone else, e.g. the key-op pool's completion
    /// signal for this core) in the ring; each signal runs [`Handler::on_wake`].
    pub fn watch_eventfd(&mut self, fd: OwnedFd) {
        self.ctl.arm_eventfd(fd.as_raw_fd(), Box::new([0; 8]));
        self.watched.push(fd);
    }

    /// Runs turns until a handler calls [`Ctl::stop`].
    pub fn run<H: Handler>(&mut self, handler: &mut H) -> Result<(), UringError> {
        self.ctl.stop = false;
        while !self.ctl.stop {
            self.turn(handler)?;
        }
        Ok(())
    }

    /// One turn: submit everything queued, wait for at least one completion, handle them all.
    pub fn turn<H: Handler>(&mut self, handler: &mut H) -> Result<(), UringError> {
        self.flush()?;
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            // EINTR: a signal; EBUSY: the completion queue overflowed and must be drained
            // first, which is what we do next.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
            Err(source) => return Err(UringError::Submit { source }),
        }
        self.ctl.stats.turns += 1;
        self.cqes.clear();
        self.cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        let mut cqes = std::mem::take(&mut self.cqes);
        for &(user_data, result, flags) in &cqes {
            self.dispatch(handler, Key::from_u64(user_data), result, flags);
        }
        cqes.clear();
        self.cqes = cqes;
        for (sock, err) in std::mem::take(&mut self.ctl.shutdown_failed) {
            if self.ctl.socks.get(sock).is_some_and(|s| !s.closing) {
                handler.on_error(&mut self.ctl, SocketId(sock), err);
            }
        }
        self.bufs.publish();
        Ok(())
    }

    fn flush(&mut self) -> Result<(), UringError> {
        let backlog = std::mem::take(&mut self.ctl.backlog);
        for pending in &backlog {
            let built;
            let entries: &[squeue::Entry] = match pending {
                Pending::One(e) => std::slice::from_ref(e),
                Pending::Linked(pair) => pair,
                Pending::Send(op) => match self.ctl.send_entry(*op) {
                    Some(e) => {
                        built = e;
                        std::slice::from_ref(&built)
                    }
                    None => continue,
                },
            };
            loop {
                // SAFETY: every pointer in these entries points into memory owned by the op
                // named by the entry's user_data (boxed or a Vec's heap part, so it does not
                // move with the slab), into the buffer ring, or at an fd owned by a socket,
                // listener or watched eventfd; none of them is freed before the op's final
                // completion (see dispatch and Drop). A send's Vec is not grown once its entry
                // is built (`Ctl::send` appends only to sends not yet `in_kernel`).
                let pushed = unsafe { self.ring.submission().push_multiple(entries) };
                if pushed.is_ok() {
                    break;
                }
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                    Err(source) => return Err(UringError::Submit { source }),
                }
                self.ctl.stats.turns += 1;
            }
        }
        let mut backlog = backlog;
        backlog.clear();
        // Keep the allocation unless handlers queued more meanwhile (they cannot: no handler
        // runs during flush).
        if self.ctl.backlog.is_empty() {
            self.ctl.backlog = backlog;
        }
        Ok(())
    }

    fn dispatch<H: Handler>(&mut self, handler: &mut H, key: Key, res: i32, flags: u32) {
        self.ctl.stats.completions += 1;
        let more = cqueue::more(flags);
        let Some(op) = self.ctl.ops.get_mut(key) else {
            tracing::warn!(
                user_data = key.to_u64(),
                "completion for an unknown operation"
            );
            return;
        };
        match op {
            Op::Accept { listener } => {
                let listener = *listener;
                if !more {
                    self.ctl.ops.remove(key);
                    if let Some(l) = self.ctl.listeners.get_mut(listener) {
                        l.accept_op = None;
                        if l.closing {
                            l.fd = None;
                        } else if l.accepting {
                            self.ctl.stats.accept_rearms += 1;
                            if res < 0 && res != -libc::ECANCELED {
                                // EMFILE and friends leave the connection in the backlog, so
                                // re-arming now would spin; the next tick re-arms.
                                self.ctl.accept_retry.push(listener);
                            } else {
                                self.ctl.arm_accept(listener);
                            }
                        }
                    }
                }
                if res < 0 {
                    if res != -libc::ECANCELED {
                        handler.on_accept_error(&mut self.ctl, ListenerId(listener), -res);
                    }
                    return;
                }
                // TCP_NODELAY comes with it from the listener (`driver::listen`).
                // SAFETY: a non-negative accept result is a new fd that only we own.
                let fd = unsafe { OwnedFd::from_raw_fd(res) };
                self.ctl.stats.accepted += 1;
                let sock = self.ctl.socks.insert(Socket::new(fd, SockState::Open));
                self.ctl.arm_recv(sock);
                handler.on_accept(&mut self.ctl, ListenerId(listener), SocketId(sock));
            }
            Op::Recv { sock } => {
                let sock = *sock;
                if !more {
                    self.ctl.ops.remove(key);
                    if let Some(s) = self.ctl.socks.get_mut(sock) {
                        s.recv_op = None;
                    }
                }
                let bid = cqueue::buffer_select(flags);
                let live = self.ctl.socks.get(sock).is_some_and(|s| !s.closing);
                let mut rearm = !more;
                if res > 0 {
                    self.ctl.stats.bytes_received += res as u64;
                    if let (Some(bid), true) = (bid, live) {
                        let data = self.bufs.get(bid, res as usize);
                        handler.on_data(&mut self.ctl, SocketId(sock), data);
                    }
                } else if res == 0 {
                    rearm = false;
                    if live {
                        handler.on_eof(&mut self.ctl, SocketId(sock));
                    }
                } else if res == -libc::ENOBUFS {
                    self.ctl.stats.enobufs_rearms += 1;
                } else if res == -libc::ECANCELED {
                    // pause_recv or close; resume_recv may since have asked for more.
                } else {
                    rearm = false;
                    if live {
                        handler.on_error(
                            &mut self.ctl,
                            SocketId(sock),
                            io::Error::from_raw_os_error(-res),
                        );
                    }
                }
                if let Some(bid) = bid {
                    self.bufs.push(bid);
                }
                if rearm {
                    // The buffer just went back; publish so the re-armed recv can use it.
                    self.bufs.publish();
                    let want = self.ctl.socks.get(sock).is_some_and(|s| {
                        !s.closing
                            && s.recv_wanted
                            && s.recv_op.is_none()
                            && s.state == SockState::Open
                    });
                    if want {
                        self.ctl.stats.recv_rearms += 1;
                        self.ctl.arm_recv(sock);
                    }
                }
                self.ctl.maybe_finish_close(sock);
            }
            Op::Send { sock, buf, off, .. } => {
                let sock = *sock;
                if res > 0 {
                    self.ctl.stats.bytes_sent += res as u64;
                    *off += res as usize;
                }
                let aborted = self.ctl.socks.get(sock).is_none_or(|s| s.aborted);
                if res <= 0 || aborted {
                    // Error, zero-length write, or the socket is gone: this send is over.
                    if let Some(Op::Send { buf, .. }) = self.ctl.ops.remove(key) {
                        self.ctl.recycle(buf);
                    }
                    let mut report = false;
                    if let Some(s) = self.ctl.socks.get_mut(sock) {
                        s.send_op = None;
                        let queued = std::mem::take(&mut s.queued);
                        report = !s.closing;
                        self.ctl.recycle(queued);
                    }
                    if report {
                        let err = if res < 0 {
                            io::Error::from_raw_os_error(-res)
                        } else {
                            io::Error::from(io::ErrorKind::WriteZero)
                        };
                        handler.on_error(&mut self.ctl, SocketId(sock), err);
                    }
                    self.ctl.maybe_finish_close(sock);
                    return;
                }
                if *off < buf.len() {
                    self.ctl.stats.partial_sends += 1;
                    self.ctl.submit_send(key);
                    return;
                }
                let queued = self
                    .ctl
                    .socks
                    .get_mut(sock)
                    .map(|s| std::mem::take(&mut s.queued))
                    .unwrap_or_default();
                if !queued.is_empty() {
                    // Reuse this op and its allocation for what queued up meanwhile.
                    if let Some(Op::Send { buf, off, .. }) = self.ctl.ops.get_mut(key) {
                        let mut spent = std::mem::replace(buf, queued);
                        *off = 0;
                        spent.clear();
                        if let Some(s) = self.ctl.socks.get_mut(sock) {
                            s.queued = spent;
                        }
                    }
                    self.ctl.submit_send(key);
                    return;
                }
                // Drained: the socket holds no send buffer while it waits for more (`queued`
                // is its empty queue, taken above).
                if let Some(Op::Send { buf, .. }) = self.ctl.ops.remove(key) {
                    self.ctl.recycle(buf);
                }
                self.ctl.recycle(queued);
                let mut report = false;
                if let Some(s) = self.ctl.socks.get_mut(sock) {
                    s.send_op = None;
                    report = !s.closing;
                }
                self.ctl.maybe_shutdown(sock);
                if report {
                    handler.on_send_drained(&mut self.ctl, SocketId(sock));
                }
                self.ctl.maybe_finish_close(sock);
            }
            Op::Connect { sock, .. } => {
                let sock = *sock;
                self.ctl.ops.remove(key);
                let Some(s) = self.ctl.socks.get_mut(sock) else {
                    return;
                };
                s.connect_op = None;
                if s.closing {
                    self.ctl.maybe_finish_close(sock);
                    return;
                }
                if res == 0 {
                    s.state = SockState::Open;
                    let queued = std::mem::take(&mut s.queued);
                    if s.recv_wanted {
                        self.ctl.arm_recv(sock);
                    }
                    if !queued.is_empty() {
                        let op = self.ctl.ops.insert(Op::Send {
                            sock,
                            buf: queued,
                            off: 0,
                            in_kernel: false,
                        });
                        if let Some(s) = self.ctl.socks.get_mut(sock) {
                            s.send_op = Some(op);
                        }
                        self.ctl.submit_send(op);
                    }
                    self.ctl.maybe_shutdown(sock);
                    handler.on_connected(&mut self.ctl, SocketId(sock), Ok(()));
                    return;
                }
                let err = if res == -libc::ECANCELED {
                    self.ctl.stats.connect_timeouts += 1;
                    ConnectError::TimedOut
                } else {
                    ConnectError::Failed(io::Error::from_raw_os_error(-res))
                };
                s.closing = true;
                let queued = std::mem::take(&mut s.queued);
                self.ctl.recycle(queued);
                self.ctl.maybe_finish_close(sock);
                handler.on_connected(&mut self.ctl, SocketId(sock), Err(err));
            }
            Op::LinkTimeout { .. } | Op::Close | Op::Cancel => {
                self.ctl.ops.remove(key);
            }
            Op::Tick { .. } => {
                let Some(Op::Tick { ts }) = self.ctl.ops.remove(key) else {
                    return;
                };
                self.ctl.arm_tick(ts);
                for listener in std::mem::take(&mut self.ctl.accept_retry) {
                    let rearm = self
                        .ctl
                        .listeners
                        .get(listener)
                        .is_some_and(|l| l.accepting && l.accept_op.is_none());
                    if rearm {
                        self.ctl.arm_accept(listener);
                    }
                }
                handler.on_tick(&mut self.ctl);
            }
            Op::EventFd { .. } => {
                let Some(Op::EventFd { fd, buf }) = self.ctl.ops.remove(key) else {
                    return;
                };
                self.ctl.arm_eventfd(fd, buf);
                if res >= 0 {
                    handler.on_wake(&mut self.ctl);
                }
            }
        }
    }

    /// Cancels every operation and waits for the kernel to give back the memory they use.
    pub(super) fn drain(&mut self) -> bool {
        // Queued submissions go in first (their ops are in the slab and only complete once
        // submitted), then a cancel for each of them.
        let keys: Vec<Key> = self.ctl.ops.keys().collect();
        for key in keys {
            if !matches!(self.ctl.ops.get(key), Some(Op::Cancel | Op::Close)) {
                self.ctl.cancel(key);
            }
        }
        let deadline = Instant::now() + DRAIN_DEADLINE;
        while !self.ctl.ops.is_empty() && Instant::now() < deadline {
            if self.flush().is_err() {
                return false;
            }
            let ts = types::Timespec::from(Duration::from_millis(50));
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(_) => return false,
            }
            let done: Vec<(u64, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.flags()))
                .collect();
            for (user_data, flags) in done {
                let key = Key::from_u64(user_data);
                if !cqueue::more(flags) {
                    self.ctl.ops.remove(key);
                }
            }
        }
        self.ctl.ops.is_empty()
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        if !self.drain() {
            // The kernel may still write into these buffers: leaking them is the only sound
            // choice left.
            tracing::error!(
                ops = self.ctl.ops.len(),
                "io_uring operations still in flight at shutdown; leaking their buffers"
            );
            let ops = std::mem::replace(&mut self.ctl.ops, Slab::with_capacity(0));
            std::mem::forget(ops);
            return;
        }
        let _ = self.ring.submitter().unregister_buf_ring(self.bufs.group);
        // SAFETY: every operation has completed and the buffer ring is unregistered, so the
        // kernel no longer reads the descriptors or writes the buffers; `bufs` is not used
        // after this.
        unsafe { ManuallyDrop::drop(&mut self.bufs) };
    }
}
