//! What a [`Handler`] acts through: sockets, listeners and the submissions they queue.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{opcode, squeue, types};

#[cfg(doc)]
use super::event_loop::Handler;
use super::event_loop::{ListenerId, LoopStats, SocketId, BUF_GROUP, LISTEN_BACKLOG};
use super::slab::{Key, Slab};
use super::sys::{self, RawAddr};
use super::UringError;

/// Send buffers a core keeps for reuse. A bulk response can queue up to its whole size for a
/// slow client (the backend's multishot receive delivers what the kernel holds before a pause
/// lands): grown afresh for every response, the buffer cost a copy per doubling and fresh pages
/// — in the io_uring driver's bulk profile, 93 % of its page faults. Kept buffers are at most
/// `SPARE_BUFFERS` × `SPARE_MAX_BYTES` per core; idle sockets hold none.
const SPARE_BUFFERS: usize = 8;
const SPARE_MIN_BYTES: usize = 16 * 1024;
const SPARE_MAX_BYTES: usize = 4 * 1024 * 1024;

/// One in-flight operation; owns every byte the kernel may read or write for it.
#[derive(Debug)]
pub(super) enum Op {
    Accept {
        listener: usize,
    },
    Recv {
        sock: Key,
    },
    /// `in_kernel`: the submission is built (at the end of the turn, from `buf[off..]`); until
    /// then `send` may still append to `buf`, so what one turn queues goes out in one send.
    Send {
        sock: Key,
        buf: Vec<u8>,
        off: usize,
        in_kernel: bool,
    },
    Connect {
        sock: Key,
        _addr: Box<RawAddr>,
    },
    LinkTimeout {
        _ts: Box<types::Timespec>,
    },
    Close,
    Tick {
        ts: Box<types::Timespec>,
    },
    EventFd {
        fd: RawFd,
        buf: Box<[u8; 8]>,
    },
    Cancel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SockState {
    Connecting,
    Open,
}

#[derive(Debug)]
pub(super) struct Socket {
    pub(super) fd: OwnedFd,
    pub(super) state: SockState,
    pub(super) recv_op: Option<Key>,
    pub(super) recv_wanted: bool,
    /// Set by the first [`Ctl::pause_recv`]. Where the kernel has no byte limit for multishot
    /// receives ([`Ctl::recv_limit`] is `None`), each receive on the socket is single-shot from
    /// then on (one buffer), re-armed only while the handler still wants data. An unbounded
    /// multishot receive hands over everything the peer can send while the core drains it — up
    /// to the whole buffer ring in one turn — which a slow reader on the other side must then
    /// wait for in memory.
    pub(super) bounded: bool,
    pub(super) send_op: Option<Key>,
    pub(super) connect_op: Option<Key>,
    /// Bytes accepted by `send` while a send was in flight.
    pub(super) queued: Vec<u8>,
    /// Set by `close`/`abort`: no more events for this socket; the fd closes once no operation
    /// names it any more.
    pub(super) closing: bool,
    /// Set by `abort`: a short write is not continued.
    pub(super) aborted: bool,
    /// `shutdown_write` was asked for; it runs once every queued byte is written.
    pub(super) shut_wr: ShutWr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ShutWr {
    No,
    Wanted,
    Done,
}

impl Socket {
    pub(super) fn new(fd: OwnedFd, state: SockState) -> Socket {
        Socket {
            fd,
            state,
            recv_op: None,
            recv_wanted: true,
            bounded: false,
            send_op: None,
            connect_op: None,
            queued: Vec::new(),
            closing: false,
            aborted: false,
            shut_wr: ShutWr::No,
        }
    }

    pub(super) fn idle(&self) -> bool {
        self.recv_op.is_none() && self.send_op.is_none() && self.connect_op.is_none()
    }
}

#[derive(Debug)]
pub(super) struct Listener {
    /// `None` once closed.
    pub(super) fd: Option<OwnedFd>,
    pub(super) addr: SocketAddr,
    pub(super) accept_op: Option<Key>,
    /// False while paused or closed: a finished multishot accept is not re-armed.
    pub(super) accepting: bool,
    /// Close the fd once the accept operation has completed.
    pub(super) closing: bool,
}

/// Submissions not yet in the ring; a linked pair goes in together or not at all.
#[derive(Debug)]
pub(super) enum Pending {
    One(squeue::Entry),
    Linked([squeue::Entry; 2]),
    /// A send, built when the turn's submissions go to the ring ([`Ctl::send_entry`]).
    Send(Key),
}

/// The part of the loop a [`Handler`] acts through.
#[derive(Debug)]
pub struct Ctl {
    pub(super) ops: Slab<Op>,
    pub(super) socks: Slab<Socket>,
    pub(super) listeners: Vec<Listener>,
    pub(super) backlog: Vec<Pending>,
    /// Listeners whose accept ended with an error, re-armed on the next tick.
    pub(super) accept_retry: Vec<usize>,
    /// Sockets whose `shutdown(2)` failed, reported to the handler at the end of the turn.
    pub(super) shutdown_failed: Vec<(Key, io::Error)>,
    pub(super) stats: LoopStats,
    pub(super) stop: bool,
    /// Cleared send buffers for reuse (see [`SPARE_BUFFERS`]).
    pub(super) spare: Vec<Vec<u8>>,
    /// What one multishot receive may deliver before it ends and is re-armed (if the handler
    /// still wants data): `Some(bytes)` where the kernel takes a byte limit on a multishot recv
    /// (Linux 6.17); `None` where it does not, and receives on a socket once paused are
    /// single-shot instead (see [`Socket::bounded`]).
    pub(super) recv_limit: Option<u32>,
}

impl Ctl {
    /// Binds a `SO_REUSEPORT` listener and arms a multishot accept on it.
    pub fn listen(&mut self, addr: SocketAddr) -> Result<ListenerId, UringError> {
        let fd =
            sys::reuseport_listener(addr, LISTEN_BACKLOG).map_err(|source| UringError::Socket {
                op: "listen",
                addr,
                source,
            })?;
        let bound = sys::local_addr(fd.as_raw_fd()).map_err(|source| UringError::Socket {
            op: "getsockname",
            addr,
            source,
        })?;
        Ok(self.add_listener(fd, bound))
    }

    /// Takes over a listening socket made elsewhere (blocking or not) and arms a multishot
    /// accept on it.
    pub fn adopt_listener(&mut self, fd: OwnedFd) -> Result<ListenerId, UringError> {
        let addr = sys::local_addr(fd.as_raw_fd()).map_err(|source| UringError::Socket {
            op: "getsockname",
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        Ok(self.add_listener(fd, addr))
    }

    pub(super) fn add_listener(&mut self, fd: OwnedFd, addr: SocketAddr) -> ListenerId {
        let id = self.listeners.len();
        self.listeners.push(Listener {
            fd: Some(fd),
            addr,
            accept_op: None,
            accepting: true,
            closing: false,
        });
        self.arm_accept(id);
        ListenerId(id)
    }

    /// Pauses (false) or resumes (true) accepting on a listener, for the per-core connection
    /// and handshake bounds. Connections the kernel completed meanwhile wait in its backlog;
    /// a few accepted before the cancel lands are still reported.
    pub fn set_accepting(&mut self, listener: ListenerId, accepting: bool) {
        let Some(l) = self.listeners.get_mut(listener.0) else {
            return;
        };
        if l.closing || l.accepting == accepting {
            return;
        }
        l.accepting = accepting;
        match (accepting, l.accept_op) {
            (false, Some(op)) => self.cancel(op),
            (true, None) => self.arm_accept(listener.0),
            _ => {}
        }
    }

    /// Stops accepting and closes the listening socket (for drain on shutdown).
    pub fn close_listener(&mut self, listener: ListenerId) {
        let Some(l) = self.listeners.get_mut(listener.0) else {
            return;
        };
        l.accepting = false;
        l.closing = true;
        match l.accept_op {
            Some(op) => self.cancel(op),
            None => l.fd = None,
        }
    }

    /// The address a listener is bound to (with the real port when bound to port 0).
    pub fn listener_addr(&self, listener: ListenerId) -> Option<SocketAddr> {
        self.listeners.get(listener.0).map(|l| l.addr)
    }

    /// Starts an outgoing connection; [`Handler::on_connected`] reports the outcome. With a
    /// timeout, a linked `IORING_OP_LINK_TIMEOUT` cancels the connect at the deadline.
    pub fn connect(
        &mut self,
        addr: SocketAddr,
        timeout: Option<Duration>,
    ) -> Result<SocketId, UringError> {
        let fd = sys::connect_socket(&addr).map_err(|source| UringError::Socket {
            op: "socket",
            addr,
            source,
        })?;
        let raw_fd = fd.as_raw_fd();
        let sock = self.socks.insert(Socket::new(fd, SockState::Connecting));
        let raw = Box::new(sys::from_socket_addr(addr));
        let connect = opcode::Connect::new(
            types::Fd(raw_fd),
            &raw.storage as *const _ as *const libc::sockaddr,
            raw.len,
        )
        .build();
        let op = self.ops.insert(Op::Connect { sock, _addr: raw });
        let connect = connect.user_data(op.to_u64());
        if let Some(s) = self.socks.get_mut(sock) {
            s.connect_op = Some(op);
        }
        match timeout {
            Some(timeout) => {
                let ts = Box::new(types::Timespec::from(timeout));
                let entry = opcode::LinkTimeout::new(&*ts as *const types::Timespec).build();
                let tok = self.ops.insert(Op::LinkTimeout { _ts: ts });
                self.backlog.push(Pending::Linked([
                    connect.flags(squeue::Flags::IO_LINK),
                    entry.user_data(tok.to_u64()),
                ]));
            }
            None => self.backlog.push(Pending::One(connect)),
        }
        Ok(SocketId(sock))
    }

    /// Queues bytes for `sock`. One send is in flight per socket at a time so bytes leave in
    /// order; a short write is resubmitted for the rest before anything queued later.
    /// Returns false when the socket is closed or closing.
    pub fn send(&mut self, sock: SocketId, data: &[u8]) -> bool {
        let Some(s) = self.socks.get_mut(sock.0) else {
            return false;
        };
        if s.closing || s.shut_wr != ShutWr::No {
            return false;
        }
        if data.is_empty() {
            return true;
        }
        if let (Some(op), true) = (s.send_op, s.queued.is_empty()) {
            if let Some(Op::Send {
                buf,
                in_kernel: false,
                ..
            }) = self.ops.get_mut(op)
            {
                // Not handed to the kernel yet: these bytes join it (one send, one segment
                // where they fit, instead of a second send after the first completes).
                buf.extend_from_slice(data);
                return true;
            }
        }
        if s.send_op.is_some() || s.state == SockState::Connecting {
            if s.queued.capacity() == 0 {
                s.queued = self.spare.pop().unwrap_or_default();
            }
            s.queued.extend_from_slice(data);
            return true;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.extend_from_slice(data);
        let op = self.ops.insert(Op::Send {
            sock: sock.0,
            buf,
            off: 0,
            in_kernel: false,
        });
        if let Some(s) = self.socks.get_mut(sock.0) {
            s.send_op = Some(op);
        }
        self.submit_send(op);
        true
    }

    /// Bytes accepted by [`Ctl::send`] and not yet written; the driver's backpressure signal.
    pub fn unsent_bytes(&self, sock: SocketId) -> usize {
        let Some(s) = self.socks.get(sock.0) else {
            return 0;
        };
        let in_flight = s
            .send_op
            .and_then(|op| match self.ops.get(op) {
                Some(Op::Send { buf, off, .. }) => Some(buf.len() - off),
                _ => None,
            })
            .unwrap_or(0);
        in_flight + s.queued.len()
    }

    /// Stops delivering data for `sock` (backpressure): the multishot recv is cancelled;
    /// bytes already received may still arrive in this turn. What a resumed receive delivers
    /// is bounded (see [`Ctl::recv_limit`] and [`Socket::bounded`]).
    pub fn pause_recv(&mut self, sock: SocketId) {
        let Some(s) = self.socks.get_mut(sock.0) else {
            return;
        };
        s.recv_wanted = false;
        s.bounded = true;
        if let Some(op) = s.recv_op {
            self.cancel(op);
        }
    }

    /// Re-arms the recv stopped by [`Ctl::pause_recv`], bounded (see [`Socket::bounded`]).
    pub fn resume_recv(&mut self, sock: SocketId) {
        let Some(s) = self.socks.get_mut(sock.0) else {
            return;
        };
        if s.closing {
            return;
        }
        s.recv_wanted = true;
        if s.recv_op.is_none() && s.state == SockState::Open {
            self.arm_recv(sock.0);
        }
    }

    /// Gives up a connect in flight: it completes as `ConnectError::TimedOut` (through
    /// [`Handler::on_connected`]), or as it would have if it already finished.
    pub fn cancel_connect(&mut self, sock: SocketId) {
        if let Some(op) = self.socks.get(sock.0).and_then(|s| s.connect_op) {
            self.cancel(op);
        }
    }

    /// Closes `sock` after every queued byte is written. No more events arrive for it.
    pub fn close(&mut self, sock: SocketId) {
        let Some(s) = self.socks.get_mut(sock.0) else {
            return;
        };
        s.closing = true;
        s.recv_wanted = false;
        let (recv, connect) = (s.recv_op, s.connect_op);
        for op in [recv, connect].into_iter().flatten() {
            self.cancel(op);
        }
        self.maybe_finish_close(sock.0);
    }

    /// Closes `sock` now, dropping unsent bytes. No more events arrive for it.
    pub fn abort(&mut self, sock: SocketId) {
        let Some(s) = self.socks.get_mut(sock.0) else {
            return;
        };
        let queued = std::mem::take(&mut s.queued);
        s.aborted = true;
        let send = s.send_op;
        self.recycle(queued);
        if let Some(op) = send {
            self.cancel(op);
        }
        self.close(sock);
    }

    /// Shuts the write side (FIN) once every byte queued so far is written; later sends are
    /// refused. Reading goes on.
    pub fn shutdown_write(&mut self, sock: SocketId) {
        let Some(s) = self.socks.get_mut(sock.0) else {
            return;
        };
        if s.closing || s.shut_wr != ShutWr::No {
            return;
        }
        s.shut_wr = ShutWr::Wanted;
        self.maybe_shutdown(sock.0);
    }

    pub(super) fn maybe_shutdown(&mut self, sock: Key) {
        let Some(s) = self.socks.get_mut(sock) else {
            return;
        };
        if s.shut_wr != ShutWr::Wanted
            || s.send_op.is_some()
            || s.state != SockState::Open
            || s.closing
        {
            return;
        }
        s.shut_wr = ShutWr::Done;
        // A plain `shutdown(2)`, not `IORING_OP_SHUTDOWN`: the kernel runs that opcode only on
        // an io-wq worker thread, so each one cost a thread wake-up and two context switches on
        // the core (measured: 13 % of the process's CPU in handshake runs). No send is in
        // flight here, so every byte queued before the FIN has been written.
        match socket2::SockRef::from(&s.fd).shutdown(std::net::Shutdown::Write) {
            // ENOTCONN: the peer reset meanwhile; the recv side reports that.
            Err(e) if e.raw_os_error() != Some(libc::ENOTCONN) => {
                self.shutdown_failed.push((sock, e));
            }
            _ => {}
        }
    }

    /// The local address of a socket.
    pub fn local_addr(&self, sock: SocketId) -> Option<SocketAddr> {
        self.socks
            .get(sock.0)
            .and_then(|s| sys::local_addr(s.fd.as_raw_fd()).ok())
    }

    /// The peer address of a connected socket.
    pub fn peer_addr(&self, sock: SocketId) -> Option<SocketAddr> {
        self.socks
            .get(sock.0)
            .and_then(|s| sys::peer_addr(s.fd.as_raw_fd()).ok())
    }

    /// Number of live sockets, closing ones included.
    pub fn socket_count(&self) -> usize {
        self.socks.len()
    }

    /// Whether no listener has an accept in flight: after [`Ctl::close_listener`], once the
    /// cancelled multishot accept has delivered its last completion, every connection it
    /// accepted has reached the handler. Stopping before that would close connections the
    /// kernel already accepted for us (a reset for a client that another process, taking the
    /// same sockets over, would have served).
    pub fn accepts_settled(&self) -> bool {
        self.listeners.iter().all(|l| l.accept_op.is_none())
    }

    /// Makes [`EventLoop::run`] return after this turn.
    pub fn stop(&mut self) {
        self.stop = true;
    }

    /// The loop's counters.
    pub fn stats(&self) -> &LoopStats {
        &self.stats
    }

    /// Queues send `op` (new, or the rest of a short write); its submission is built at the end
    /// of the turn by [`Ctl::send_entry`].
    pub(super) fn submit_send(&mut self, op: Key) {
        if let Some(Op::Send { in_kernel, .. }) = self.ops.get_mut(op) {
            *in_kernel = false;
            self.backlog.push(Pending::Send(op));
        }
    }

    /// The submission for send `op`, built as the turn's submissions go to the ring; from now on
    /// its buffer is the kernel's until the completion. `None` (the op dropped) if its socket is
    /// gone, which cannot happen while the op names it (`maybe_finish_close` waits for it).
    pub(super) fn send_entry(&mut self, op: Key) -> Option<squeue::Entry> {
        let Some(Op::Send {
            sock,
            buf,
            off,
            in_kernel,
        }) = self.ops.get_mut(op)
        else {
            return None;
        };
        let Some(s) = self.socks.get(*sock) else {
            if let Some(Op::Send { buf, .. }) = self.ops.remove(op) {
                self.recycle(buf);
            }
            return None;
        };
        let rest = &buf[*off..];
        let len = rest.len().min(u32::MAX as usize) as u32;
        // MSG_NOSIGNAL: a peer that went away must be an EPIPE completion, not a SIGPIPE.
        let mut flags = libc::MSG_NOSIGNAL;
        if s.shut_wr == ShutWr::Wanted && s.queued.is_empty() {
            // The last bytes before the FIN: MSG_MORE keeps a partial segment back (despite
            // TCP_NODELAY) until `shutdown(2)` right after this completes, which puts the FIN
            // on it, so the peer gets the bytes and the FIN in one segment instead of two. An
            // ACK or a close pushes it as well; nothing stays behind.
            flags |= libc::MSG_MORE;
        }
        *in_kernel = true;
        Some(
            opcode::Send::new(types::Fd(s.fd.as_raw_fd()), rest.as_ptr(), len)
                .flags(flags)
                .build()
                .user_data(op.to_u64()),
        )
    }

    pub(super) fn arm_recv(&mut self, sock: Key) {
        let Some(s) = self.socks.get(sock) else {
            return;
        };
        let (fd, bounded) = (s.fd.as_raw_fd(), s.bounded);
        let op = self.ops.insert(Op::Recv { sock });
        if let Some(s) = self.socks.get_mut(sock) {
            s.recv_op = Some(op);
        }
        let entry = if let Some(limit) = self.recv_limit {
            sys::with_recv_limit(
                opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP).build(),
                limit,
            )
        } else if bounded {
            // Length 0 with a selected buffer: the kernel fills at most that one buffer.
            opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), 0)
                .buf_group(BUF_GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        } else {
            opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP).build()
        }
        .user_data(op.to_u64());
        self.backlog.push(Pending::One(entry));
    }

    pub(super) fn arm_accept(&mut self, listener: usize) {
        let Some(fd) = self
            .listeners
            .get(listener)
            .and_then(|l| l.fd.as_ref())
            .map(|fd| fd.as_raw_fd())
        else {
            return;
        };
        let op = self.ops.insert(Op::Accept { listener });
        if let Some(l) = self.listeners.get_mut(listener) {
            l.accept_op = Some(op);
        }
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(op.to_u64());
        self.backlog.push(Pending::One(entry));
    }

    pub(super) fn arm_tick(&mut self, ts: Box<types::Timespec>) {
        let entry = opcode::Timeout::new(&*ts as *const types::Timespec).build();
        let op = self.ops.insert(Op::Tick { ts });
        self.backlog
            .push(Pending::One(entry.user_data(op.to_u64())));
    }

    pub(super) fn arm_eventfd(&mut self, fd: RawFd, mut buf: Box<[u8; 8]>) {
        let entry = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8).build();
        let op = self.ops.insert(Op::EventFd { fd, buf });
        self.backlog
            .push(Pending::One(entry.user_data(op.to_u64())));
    }

    pub(super) fn cancel(&mut self, target: Key) {
        let op = self.ops.insert(Op::Cancel);
        let entry = opcode::AsyncCancel::new(target.to_u64())
            .build()
            .user_data(op.to_u64());
        self.backlog.push(Pending::One(entry));
    }

    /// Keeps `buf` for a later send when there is room and it is worth keeping. Only buffers no
    /// operation in flight points at may come here.
    pub(super) fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS
            && (SPARE_MIN_BYTES..=SPARE_MAX_BYTES).contains(&buf.capacity())
        {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Hands the fd to an `IORING_OP_CLOSE` once no operation names the socket any more.
    pub(super) fn maybe_finish_close(&mut self, sock: Key) {
        let ready = self.socks.get(sock).is_some_and(|s| s.closing && s.idle());
        if !ready {
            return;
        }
        let Some(s) = self.socks.remove(sock) else {
            return;
        };
        self.recycle(s.queued);
        let fd = s.fd.into_raw_fd();
        let op = self.ops.insert(Op::Close);
        let entry = opcode::Close::new(types::Fd(fd))
            .build()
            .user_data(op.to_u64());
        self.backlog.push(Pending::One(entry));
    }
}
