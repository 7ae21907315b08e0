//! The sans-io connection core: bytes in, rustls, bytes out. It knows nothing of sockets, rings
//! or runtimes; a driver feeds it what it read, writes what it asks for and runs the key
//! operations it hands out.
//!
//! Life of a connection (the variants of `Phase`):
//!
//! ```text
//! Hello ──(ClientHello parsed)──┬─ inline into_connection() ───────────────┐
//!   │                           └─ Event::Offload → KeyOp ─ on_key_op_done ─┤
//!   └─ too large / not TLS / timeout → Closed(reason)                      ▼
//!                                       Handshaking ─ Event::HandshakeDone → Established
//!                                                                             │ proxying, bounded
//!                                       close_notify/FIN ↔ FIN/close_notify   ▼
//!                                                                           finished
//! ```
//!
//! Any phase may end in `Closed(reason)`. Once established, each direction runs its own
//! `Closing` steps (stream read to the end → close_notify sent where that side speaks TLS → the
//! receiving socket's write side shut), and the two directions end independently, in either
//! order; the client's FIN (`ClientFin`) is kept apart, since a client may send close_notify
//! before it or not at all. The backend's TLS session is a `BackendSession`: none, here, or on
//! a key-op worker with the records that arrive meanwhile.
//!
//! A TLS backend whose client key is on the token parks its `ClientConnection` the same way:
//! during the backend handshake, the backend's records go to a key-op worker
//! (`Event::Offload` with [`KeyOpJob::backend`]) and pumping resumes in `on_key_op_done`.

mod backend_pump;
mod buffer;
mod handshake;
pub mod identity;
mod phase;
pub(crate) mod proxy_v2;
#[cfg(test)]
mod tests;
mod upstream;

use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::backend_tls::{self, BackendTls, BackendTlsCause};
pub use crate::keyops::{
    is_key_failure, run_key_op, KeyOpDone, KeyOpFailure, KeyOpJob, KeyOpResult,
};
pub use crate::outcome::{CloseReason, HandshakeInfo};
pub use upstream::Target;

use crate::config::Limits;
use crate::keyops::hint::awaiting_second_hello;
use crate::snapshot::PreparedListener;
use buffer::ByteQueue;
use handshake::{failure_bytes, tls_failure, write_failure};
use phase::{BackendSession, ClientFin, Closing, Phase};

/// A fatal `internal_error` alert in a plaintext record, for failures that happen before rustls
/// has a connection that could write one (key-op queue full or late).
const ALERT_INTERNAL_ERROR: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 80];

/// A fatal `decode_error` alert for a ClientHello larger than `max_client_hello_bytes` (what
/// rustls answers to a handshake message over its own size bound); RFC 8446 asks for an alert
/// rather than a bare close.
const ALERT_DECODE_ERROR: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50];

/// A fatal `unrecognized_name` alert (RFC 6066) for a ClientHello whose SNI the listener
/// refuses; sent in plaintext before any ServerHello.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// A fatal `no_application_protocol` alert (RFC 7301) for a client whose ALPN offer the routed
/// pool cannot speak; plaintext, before any ServerHello.
const ALERT_NO_APPLICATION_PROTOCOL: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120];

/// What the driver must act on, taken with [`Conn::take_event`].
#[derive(Debug)]
pub enum Event {
    /// Submit this to the key-op pool; answer with [`Conn::on_key_op_done`].
    Offload(KeyOpJob),
    /// The handshake completed: connect to the backend now, then call
    /// [`Conn::on_backend_connected`].
    HandshakeDone(HandshakeInfo),
}

/// One client connection's TLS and proxy state. See the module docs.
pub struct Conn {
    phase: Phase,
    listener: Arc<PreparedListener>,
    danger_inline: bool,
    max_hello: usize,
    cap: usize,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    backend_connect_timeout: Duration,
    peer: SocketAddr,
    local: SocketAddr,
    accepted_at: Instant,
    last_activity: Instant,
    client_in: ByteQueue,
    to_client: ByteQueue,
    /// Plaintext for the backend (before encryption when the backend speaks TLS).
    to_backend: ByteQueue,
    /// TLS backends only: what goes on the backend socket (PROXY header, then TLS records).
    backend_wire: ByteQueue,
    backend_session: BackendSession,
    /// When the backend TLS handshake started (backend connected); bounds it.
    backend_tls_since: Option<Instant>,
    /// The driver reported the backend socket connected.
    backend_connected: bool,
    /// The client's FIN (client → backend).
    client_fin: ClientFin,
    /// Client → backend: the client's stream over, close_notify to a TLS backend, the backend
    /// socket's write side shut.
    client_to_backend: Closing,
    /// Backend → client: the backend's stream over, close_notify to the client, the client
    /// socket's write side shut.
    backend_to_client: Closing,
    events: Vec<Event>,
    upstream: upstream::Upstream,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("listener", &self.listener.snap.name)
            .field("closed", &self.closed())
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// A connection accepted at `now` from `peer` on `local`.
    pub(crate) fn new(
        listener: Arc<PreparedListener>,
        limits: &Limits,
        danger_inline: bool,
        peer: SocketAddr,
        local: SocketAddr,
        now: Instant,
    ) -> Self {
        Self {
            phase: Phase::Hello {
                acceptor: Box::default(),
                flight: Vec::new(),
            },
            listener,
            danger_inline,
            max_hello: limits.max_client_hello_bytes,
            cap: limits.buffer_bytes,
            handshake_timeout: limits.handshake_timeout(),
            idle_timeout: limits.idle_timeout(),
            backend_connect_timeout: limits.backend_connect_timeout(),
            peer,
            local,
            accepted_at: now,
            last_activity: now,
            client_in: ByteQueue::default(),
            to_client: ByteQueue::default(),
            to_backend: ByteQueue::default(),
            backend_wire: ByteQueue::default(),
            backend_session: BackendSession::None,
            backend_tls_since: None,
            backend_connected: false,
            client_fin: ClientFin::NotYet,
            client_to_backend: Closing::Open,
            backend_to_client: Closing::Open,
            events: Vec::new(),
            upstream: upstream::Upstream::default(),
        }
    }

    /// The listener this connection was accepted on (its snapshot at accept time).
    pub fn listener_name(&self) -> &str {
        &self.listener.snap.name
    }

    /// Next thing the driver must act on.
    pub fn take_event(&mut self) -> Option<Event> {
        if self.events.is_empty() {
            None
        } else {
            Some(self.events.remove(0))
        }
    }

    /// Why the connection ended, once it has. The driver then writes what
    /// [`Conn::client_out`] still holds (an alert) if it can, and closes both sockets.
    pub fn closed(&self) -> Option<CloseReason> {
        match self.phase {
            Phase::Closed(reason) => Some(reason),
            _ => None,
        }
    }

    /// Still in the handshake (for per-core handshake-in-flight accounting).
    pub fn is_handshaking(&self) -> bool {
        match &self.phase {
            Phase::Hello { .. } | Phase::KeyOp | Phase::Handshaking(_) => true,
            Phase::Established(_) | Phase::Closed(_) => false,
        }
    }

    /// Waiting for a key-op result (the client's handshake or the backend's).
    pub fn awaiting_key_op(&self) -> bool {
        matches!(self.phase, Phase::KeyOp) || self.backend_session.on_worker()
    }

    /// The listener's backend speaks TLS and its session exists (here or on a key-op worker).
    fn backend_speaks_tls(&self) -> bool {
        !matches!(self.backend_session, BackendSession::None)
    }

    /// The driver should read from the client now.
    pub fn wants_client_read(&self) -> bool {
        if self.closed().is_some()
            || self.client_to_backend >= Closing::ReadClosed
            || self.client_fin != ClientFin::NotYet
        {
            return false;
        }
        match &self.phase {
            Phase::Hello { .. } => true,
            Phase::KeyOp | Phase::Closed(_) => false,
            Phase::Handshaking(_) | Phase::Established(_) => {
                self.to_backend.len() < self.cap && self.client_in.len() < self.cap
            }
        }
    }

    /// The driver should read from the backend now.
    pub fn wants_backend_read(&self) -> bool {
        self.closed().is_none()
            && self.backend_connected
            && self.backend_to_client == Closing::Open
            && !self.backend_session.on_worker()
            && self.to_client.len() < self.cap
    }

    /// TLS bytes to write to the client.
    pub fn client_out(&self) -> &[u8] {
        self.to_client.as_slice()
    }

    /// [`Conn::client_out`] ends with the close_notify: nothing follows it but the FIN (see
    /// [`Conn::wants_client_shutdown`]), so the driver may send it with `MSG_MORE` and let the
    /// FIN share its last segment.
    pub fn client_out_is_final(&self) -> bool {
        self.closed().is_none() && self.backend_to_client == Closing::CloseNotifySent
    }

    /// `n` bytes of [`Conn::client_out`] were written.
    pub fn client_written(&mut self, n: usize, now: Instant) {
        self.to_client.consume(n);
        if n > 0 {
            self.last_activity = now;
        }
        self.after_progress();
    }

    /// Plaintext to write to the backend (empty until connected).
    /// TLS records instead when the listener's backend speaks TLS.
    pub fn backend_out(&self) -> &[u8] {
        if !self.backend_connected {
            &[]
        } else if self.backend_speaks_tls() {
            self.backend_wire.as_slice()
        } else {
            self.to_backend.as_slice()
        }
    }

    /// `n` bytes of [`Conn::backend_out`] were written.
    pub fn backend_written(&mut self, n: usize, now: Instant) {
        if self.backend_speaks_tls() {
            self.backend_wire.consume(n);
            // Room on the wire: encrypt more of the plaintext queue.
            self.pump_backend_tls();
        } else {
            self.to_backend.consume(n);
        }
        if n > 0 {
            self.last_activity = now;
            // Room in the plaintext queue: client records (or plaintext rustls already holds)
            // that waited for it move on now; nothing else would wake them once the client has
            // sent its last byte.
            if self.phase.has_tls() {
                self.pump_client(now);
                return;
            }
        }
        self.after_progress();
    }

    /// The driver should now shut down the write side of the backend socket (client finished
    /// sending and everything reached the backend), then call [`Conn::backend_write_shut`].
    pub fn wants_backend_shutdown(&self) -> bool {
        self.closed().is_none()
            && self.backend_connected
            && self.to_backend.is_empty()
            && self.backend_wire.is_empty()
            && match self.client_to_backend {
                Closing::ReadClosed => !self.backend_speaks_tls(),
                Closing::CloseNotifySent => true,
                Closing::Open | Closing::WriteShut => false,
            }
    }

    /// The backend socket's write side is shut.
    pub fn backend_write_shut(&mut self) {
        self.client_to_backend.reach(Closing::WriteShut);
        self.after_progress();
    }

    /// The driver should shut down the write side of the client socket (close_notify sent and
    /// flushed), then call [`Conn::client_write_shut`].
    pub fn wants_client_shutdown(&self) -> bool {
        self.closed().is_none()
            && self.backend_to_client == Closing::CloseNotifySent
            && self.to_client.is_empty()
    }

    /// The client socket's write side is shut.
    pub fn client_write_shut(&mut self) {
        self.backend_to_client.reach(Closing::WriteShut);
        self.after_progress();
    }

    /// When the driver must next call [`Conn::on_timer`].
    pub fn deadline(&self) -> Instant {
        let idle = self.last_activity + self.idle_timeout;
        if self.is_handshaking() {
            idle.min(self.accepted_at + self.handshake_timeout)
        } else if let Some(at) = self.backend_tls_deadline() {
            idle.min(at)
        } else {
            idle
        }
    }

    /// While the backend TLS handshake runs: when it must be done (the backend connect timeout
    /// covers connect and handshake alike).
    fn backend_tls_deadline(&self) -> Option<Instant> {
        let since = self.backend_tls_since?;
        let handshaking = match &self.backend_session {
            BackendSession::None => return None,
            BackendSession::Here(bt) => bt.is_handshaking(),
            BackendSession::OnWorker { .. } => true,
        };
        handshaking.then(|| since + self.backend_connect_timeout)
    }

    /// Fires the handshake or idle timeout if due.
    pub fn on_timer(&mut self, now: Instant) {
        if self.closed().is_some() {
            return;
        }
        if self.is_handshaking() && now >= self.accepted_at + self.handshake_timeout {
            self.fail(CloseReason::HandshakeTimeout);
        } else if self.backend_tls_deadline().is_some_and(|at| now >= at) {
            self.fail_backend_tls(BackendTlsCause::HandshakeTimeout, None);
        } else if now >= self.last_activity + self.idle_timeout {
            self.fail(CloseReason::IdleTimeout);
        }
    }

    /// Ends the connection for a reason found by the driver (socket error, backend connect
    /// failure, shutdown).
    pub fn abort(&mut self, reason: CloseReason) {
        if self.closed().is_none() {
            self.fail(reason);
        }
    }

    /// The backend is connected: plaintext may flow to it.
    pub fn on_backend_connected(&mut self, now: Instant) {
        self.upstream_connected(now);
        self.backend_connected = true;
        self.last_activity = now;
        if matches!(self.backend_session, BackendSession::Here(_)) {
            self.backend_tls_since = Some(now);
        }
    }

    /// Bytes read from the client.
    pub fn on_client_data(&mut self, data: &[u8], now: Instant) {
        if self.closed().is_some() || data.is_empty() {
            return;
        }
        self.last_activity = now;
        match &mut self.phase {
            Phase::Hello { flight, .. } => {
                if flight.len() + data.len() > self.max_hello {
                    self.to_client.push(&ALERT_DECODE_ERROR);
                    self.fail(CloseReason::ClientHelloTooLarge);
                    return;
                }
                flight.extend_from_slice(data);
                let mut rd = data;
                // An accept attempt after every read: rustls buffers one record's worth until
                // processing has seen the start of a handshake message, so a ClientHello that
                // spans records is refused ("message buffer full") if it is read in one go.
                loop {
                    let Phase::Hello { acceptor, .. } = &mut self.phase else {
                        // Bytes that followed the hello in this read; in the key-op phase they
                        // are already part of the flight the worker replays.
                        if self.phase.has_tls() && !rd.is_empty() {
                            self.client_in.push(rd);
                            self.pump_client(now);
                        }
                        return;
                    };
                    if rd.is_empty() {
                        return;
                    }
                    match acceptor.read_tls(&mut rd) {
                        Ok(n) if n > 0 => self.try_accept(now),
                        _ => {
                            self.fail(CloseReason::BadClientHello);
                            return;
                        }
                    }
                }
            }
            Phase::KeyOp | Phase::Handshaking(_) | Phase::Established(_) => {
                self.client_in.push(data);
                self.pump_client(now);
            }
            Phase::Closed(_) => {}
        }
    }

    /// The client sent FIN.
    pub fn on_client_eof(&mut self, now: Instant) {
        if self.closed().is_some() {
            return;
        }
        match &self.phase {
            Phase::Hello { .. } | Phase::KeyOp | Phase::Handshaking(_) => {
                self.fail(CloseReason::ClientClosedEarly)
            }
            Phase::Established(_) => {
                if self.client_fin == ClientFin::NotYet {
                    self.client_fin = ClientFin::Received;
                }
                self.pump_client(now);
            }
            Phase::Closed(_) => {}
        }
    }

    /// Bytes read from the backend.
    pub fn on_backend_data(&mut self, data: &[u8], now: Instant) {
        if self.closed().is_some() || data.is_empty() {
            return;
        }
        self.last_activity = now;
        if self.backend_speaks_tls() {
            self.on_backend_tls_data(data);
            return;
        }
        if let Some(tls) = self.phase.tls() {
            if tls.writer().write_all(data).is_err() {
                self.fail(CloseReason::TlsError);
                return;
            }
            self.flush_tls();
        }
    }

    /// The backend sent FIN: send close_notify to the client after what is queued.
    pub fn on_backend_eof(&mut self, _now: Instant) {
        if self.closed().is_some() {
            return;
        }
        if self.backend_session.on_worker() {
            // Only a handshake goes to a worker.
            self.fail_backend_tls(BackendTlsCause::ClosedDuringHandshake, None);
            return;
        }
        if let Some(bt) = self.backend_session.here() {
            let _ = bt.read_tls(&mut io::empty());
            if let Err(e) = bt.process_new_packets() {
                self.fail_backend_tls(BackendTlsCause::of(&e), Some(&e));
                return;
            }
            if bt.is_handshaking() {
                self.fail_backend_tls(BackendTlsCause::ClosedDuringHandshake, None);
                return;
            }
            // Whatever plaintext came before the FIN goes to the client first; a FIN without
            // close_notify is a truncation the client sees as an ordinary close_notify.
            self.drain_backend_plaintext();
            if self.closed().is_some() || self.backend_to_client >= Closing::ReadClosed {
                return;
            }
        }
        self.backend_to_client.reach(Closing::ReadClosed);
        if let Some(tls) = self.phase.tls() {
            tls.send_close_notify();
            self.backend_to_client.reach(Closing::CloseNotifySent);
        }
        self.flush_tls();
        self.after_progress();
    }

    /// The key-op worker's answer for this connection.
    pub fn on_key_op_done(&mut self, result: KeyOpResult, now: Instant) {
        if self.closed().is_some() {
            return;
        }
        if self.backend_session.on_worker() {
            self.on_backend_key_op_done(result);
            return;
        }
        if !matches!(self.phase, Phase::KeyOp) {
            return;
        }
        match result {
            Ok(KeyOpDone::Client(tls)) => self.enter_tls(tls, now),
            Ok(KeyOpDone::Backend(_)) => {
                // Not what this connection asked for; cannot happen (one job at a time).
                self.to_client.push(&ALERT_INTERNAL_ERROR);
                self.fail(CloseReason::KeyOpFailed);
            }
            Err(KeyOpFailure::Tls { error, alert }) => {
                self.to_client.push(failure_bytes(&alert));
                let reason = if is_key_failure(&error) {
                    CloseReason::KeyOpFailed
                } else {
                    tls_failure(&error)
                };
                self.fail(reason);
            }
            Err(KeyOpFailure::Rejected) => {
                self.to_client.push(&ALERT_INTERNAL_ERROR);
                self.fail(CloseReason::KeyOpRejected);
            }
            Err(KeyOpFailure::Deadline) => {
                self.to_client.push(&ALERT_INTERNAL_ERROR);
                self.fail(CloseReason::KeyOpTimeout);
            }
        }
    }

    /// Both directions are finished: the driver closes the sockets and counts `Done`.
    pub fn is_finished(&self) -> bool {
        self.closed().is_none()
            && self.client_to_backend == Closing::WriteShut
            && self.backend_to_client == Closing::WriteShut
            && self.to_client.is_empty()
            && self.to_backend.is_empty()
            && self.backend_wire.is_empty()
    }

    fn fail(&mut self, reason: CloseReason) {
        self.phase = Phase::Closed(reason);
        self.to_backend = ByteQueue::default();
        self.backend_wire = ByteQueue::default();
        self.backend_session = BackendSession::None;
        self.client_in = ByteQueue::default();
    }

    /// Moves client bytes through rustls into the backend queue, as far as the bounds allow.
    fn pump_client(&mut self, now: Instant) {
        let offloads = self.offloads();
        loop {
            let Some(tls) = self.phase.tls() else {
                return;
            };
            let mut progressed = false;
            // Drain decrypted bytes first so rustls's own plaintext buffer never overflows.
            // Copied straight from rustls's buffer (`fill_buf`): reading into `spare(room)`
            // grew and zero-filled up to `buffer_bytes` (64 KiB) per call, for requests of a
            // few hundred bytes.
            while self.to_backend.len() < self.cap {
                let room = self.cap - self.to_backend.len();
                let mut reader = tls.reader();
                let taken = match reader.fill_buf() {
                    Ok([]) => {
                        self.client_to_backend.reach(Closing::ReadClosed);
                        break;
                    }
                    Ok(chunk) => {
                        let n = chunk.len().min(room);
                        self.to_backend.push(&chunk[..n]);
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        // Unexpected EOF: the client closed without close_notify.
                        self.client_to_backend.reach(Closing::ReadClosed);
                        break;
                    }
                };
                reader.consume(taken);
                progressed = true;
            }
            if !self.client_in.is_empty() && self.to_backend.len() < self.cap {
                let mut rd = self.client_in.as_slice();
                let n = match tls.read_tls(&mut rd) {
                    Ok(n) => n,
                    Err(_) => {
                        self.fail(CloseReason::TlsError);
                        return;
                    }
                };
                self.client_in.consume(n);
                if n > 0 && offloads && awaiting_second_hello(tls) {
                    self.offload_second_hello();
                    return;
                }
                if let Err(e) = tls.process_new_packets() {
                    write_failure(tls, &e, &mut self.to_client);
                    self.fail(tls_failure(&e));
                    return;
                }
                progressed |= n > 0;
            } else if self.client_in.is_empty() && self.client_fin == ClientFin::Received {
                // An empty read tells rustls about EOF once every byte before it went in; a
                // missing close_notify is a truncation the backend sees as an ordinary FIN.
                self.client_fin = ClientFin::Signaled;
                let _ = tls.read_tls(&mut io::empty());
                if tls.process_new_packets().is_err() {
                    let _ = tls.write_tls(&mut self.to_client);
                    self.fail(CloseReason::TlsError);
                    return;
                }
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        self.check_established(now);
        self.pump_backend_tls();
        self.flush_tls();
        self.after_progress();
    }

    fn flush_tls(&mut self) {
        if let Some(tls) = self.phase.tls() {
            while tls.wants_write() {
                match tls.write_tls(&mut self.to_client) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }

    fn after_progress(&mut self) {
        // Idle connections should not pin 64 KiB buffers each.
        self.to_client.shrink_if_empty();
        self.to_backend.shrink_if_empty();
    }
}
