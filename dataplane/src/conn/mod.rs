//! The sans-io connection core: bytes in, rustls, bytes out. It knows nothing of sockets, rings
//! or runtimes; a driver feeds it what it read, writes what it asks for and runs the key
//! operations it hands out.
//!
//! Life of a connection:
//!
//! ```text
//! Hello ──(ClientHello parsed)──┬─ inline into_connection() ───────────────┐
//!   │                           └─ Event::Offload → KeyOp ─ on_key_op_done ─┤
//!   └─ too large / not TLS / timeout → closed                               ▼
//!                                   Tls (handshaking) ─ Event::HandshakeDone → Tls (established)
//!                                                                             │ proxying, bounded
//!                                       close_notify/FIN ↔ FIN/close_notify   ▼
//!                                                                           finished
//! ```
//!
//! A TLS backend whose client key is on the token parks its `ClientConnection` the same way:
//! during the backend handshake, the backend's records go to a key-op worker
//! (`Event::Offload` with [`KeyOpJob::backend`]) and pumping resumes in `on_key_op_done`.

pub mod backend_tls;
mod buffer;
pub(crate) mod hello;
pub mod identity;
pub(crate) mod proxy_v2;
#[cfg(test)]
mod tests;

use std::io::{self, BufRead, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::ClientConnection;
use rustls::server::{Acceptor, ServerConnection};
use rustls::{HandshakeKind, ServerConfig};

pub use backend_tls::{BackendTls, BackendTlsCause};

use crate::config::Limits;
use crate::snapshot::{tripwire_reset, tripwire_tripped, InlineAttempt, PreparedListener};
use buffer::ByteQueue;

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

/// Why a connection ended. Handshake failures and post-handshake ends are both here so drivers
/// count them with one match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both directions finished cleanly.
    Done,
    /// The ClientHello flight exceeded `max_client_hello_bytes` (peer).
    ClientHelloTooLarge,
    /// The bytes were not an acceptable ClientHello (peer).
    BadClientHello,
    /// The client and the listener share no version, cipher suite, group or signature scheme
    /// (peer: a client or a scanner offering what the policy does not allow).
    NegotiationFailed,
    /// The SNI names no certificate of a listener that refuses unknown names (peer).
    UnknownSni,
    /// rustls refused the handshake or a record (peer, or our policy).
    TlsError,
    /// The client's certificate was missing (where required), not from the listener's CAs,
    /// expired or revoked (peer).
    ClientCertRejected,
    /// The client closed before the handshake finished (peer).
    ClientClosedEarly,
    /// The handshake did not finish in time (peer or us).
    HandshakeTimeout,
    /// The key-op queue was full (us: overload).
    KeyOpRejected,
    /// The key operation missed its deadline (us or the token).
    KeyOpTimeout,
    /// The key operation failed: a PKCS#11 call (the signature) failed (the token). Nothing the
    /// peer sends is counted here.
    KeyOpFailed,
    /// No traffic for `idle_timeout` (peer or backend).
    IdleTimeout,
    /// Connecting to the backend failed (backend).
    BackendConnectFailed,
    /// Connecting to the backend timed out (backend).
    BackendConnectTimeout,
    /// A socket error on the client side (peer).
    ClientIoError,
    /// A socket error on the backend side (backend).
    BackendIoError,
    /// TLS to the backend failed: its certificate, its alerts, or its handshake (backend).
    BackendTlsError(BackendTlsCause),
    /// The current snapshot has no such listener (configuration).
    ListenerGone,
    /// The data plane shut down before the connection finished (us).
    Shutdown,
}

impl CloseReason {
    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Done => "done",
            CloseReason::ClientHelloTooLarge => "client_hello_too_large",
            CloseReason::BadClientHello => "bad_client_hello",
            CloseReason::NegotiationFailed => "negotiation_failed",
            CloseReason::UnknownSni => "unknown_sni",
            CloseReason::TlsError => "tls_error",
            CloseReason::ClientCertRejected => "client_cert_rejected",
            CloseReason::ClientClosedEarly => "client_closed_early",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::KeyOpRejected => "key_op_rejected",
            CloseReason::KeyOpTimeout => "key_op_timeout",
            CloseReason::KeyOpFailed => "key_op_failed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::BackendConnectFailed => "backend_connect_failed",
            CloseReason::BackendConnectTimeout => "backend_connect_timeout",
            CloseReason::ClientIoError => "client_io_error",
            CloseReason::BackendIoError => "backend_io_error",
            CloseReason::BackendTlsError(_) => "backend_tls_error",
            CloseReason::ListenerGone => "listener_gone",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// Facts about a completed handshake, for counters and logs.
#[derive(Debug, Clone)]
pub struct HandshakeInfo {
    /// "TLSv1_3" / "TLSv1_2".
    pub version: &'static str,
    /// IANA-ish suite name from rustls.
    pub suite: &'static str,
    /// Key-exchange group name from rustls.
    pub group: &'static str,
    /// The handshake resumed a session (no signature).
    pub resumed: bool,
    /// Accept to handshake complete.
    pub duration: Duration,
}

/// Work for a key-operation worker: replay the ClientHello flight through a fresh `Acceptor` and
/// run `into_connection()` (which signs) off the io thread; or, after a HelloRetryRequest,
/// process the second ClientHello (where a full handshake signs) on the connection itself; or
/// process the backend's handshake records on our backend `ClientConnection` (where a requested
/// client certificate is signed for).
#[derive(Debug)]
pub struct KeyOpJob {
    /// Every byte the client sent so far (the ClientHello records, and anything after them);
    /// empty when `connection` or `backend` is set.
    pub flight: Vec<u8>,
    /// The real (signing) configuration.
    pub config: Arc<ServerConfig>,
    /// A connection that answered with a HelloRetryRequest and has read, not processed, the
    /// client's next records.
    pub connection: Option<Box<ServerConnection>>,
    /// The backend side during its handshake, with the backend's records read, not processed.
    pub backend: Option<Box<ClientConnection>>,
}

/// What a key operation hands back: the connection the job carried, now processed.
#[derive(Debug)]
pub enum KeyOpDone {
    /// The client's session (a handshake job).
    Client(Box<ServerConnection>),
    /// The backend session (a [`KeyOpJob::backend`] job).
    Backend(Box<ClientConnection>),
}

/// How a key operation ended.
#[derive(Debug)]
pub enum KeyOpFailure {
    /// rustls (or the token, through `SigningKey`) refused; `alert` holds the bytes to send.
    Tls {
        /// The error from rustls.
        error: rustls::Error,
        /// Alert record bytes for the client.
        alert: Vec<u8>,
    },
    /// The queue (per core or total) was full.
    Rejected,
    /// The result came, or would come, after the deadline.
    Deadline,
}

/// The worker's answer.
pub type KeyOpResult = Result<KeyOpDone, KeyOpFailure>;

/// What the driver must act on, taken with [`Conn::take_event`].
#[derive(Debug)]
pub enum Event {
    /// Submit this to the key-op pool; answer with [`Conn::on_key_op_done`].
    Offload(KeyOpJob),
    /// The handshake completed: connect to the backend now, then call
    /// [`Conn::on_backend_connected`].
    HandshakeDone(HandshakeInfo),
}

/// Runs on a key-op worker: the same bytes, a fresh `Acceptor`, the real config; or the
/// connection a job carries, processing what it has read.
pub fn run_key_op(job: KeyOpJob) -> KeyOpResult {
    if let Some(backend) = job.backend {
        return process_backend_on_worker(backend);
    }
    if let Some(tls) = job.connection {
        return process_on_worker(tls);
    }
    let replay_failed = |e: String| KeyOpFailure::Tls {
        error: rustls::Error::General(format!("replaying ClientHello: {e}")),
        alert: Vec::new(),
    };
    let mut acceptor = Acceptor::default();
    let mut rd = &job.flight[..];
    // Read and accept in turns, as the io thread did (see `Conn::on_client_data`).
    let accepted = loop {
        if rd.is_empty() {
            return Err(replay_failed("incomplete".into()));
        }
        match acceptor.read_tls(&mut rd) {
            Ok(n) if n > 0 => {}
            Ok(_) => return Err(replay_failed("bytes refused".into())),
            Err(e) => return Err(replay_failed(e.to_string())),
        }
        match acceptor.accept() {
            Ok(Some(a)) => break a,
            Ok(None) => {}
            Err((error, mut alert)) => {
                let mut bytes = Vec::new();
                let _ = alert.write_all(&mut bytes);
                return Err(KeyOpFailure::Tls {
                    error,
                    alert: bytes,
                });
            }
        }
    };
    let mut tls = accepted
        .into_connection(job.config)
        .map_err(|(error, mut alert)| {
            let mut bytes = Vec::new();
            let _ = alert.write_all(&mut bytes);
            KeyOpFailure::Tls {
                error,
                alert: bytes,
            }
        })?;
    // What followed the hello in the flight, processed here: after a HelloRetryRequest a client
    // that guessed it may already have sent the second hello, and that one signs.
    while !rd.is_empty() {
        match tls.read_tls(&mut rd) {
            Ok(n) if n > 0 => {}
            Ok(_) => return Err(replay_failed("bytes after the hello refused".into())),
            Err(e) => return Err(replay_failed(e.to_string())),
        }
    }
    process_on_worker(Box::new(tls))
}

/// Processing is where rustls signs (a second ClientHello), so it happens here, off the io
/// thread; a failure hands back what rustls queued for the client.
fn process_on_worker(mut tls: Box<ServerConnection>) -> KeyOpResult {
    match tls.process_new_packets() {
        Ok(_) => Ok(KeyOpDone::Client(tls)),
        Err(error) => {
            let mut alert = Vec::new();
            let _ = tls.write_tls(&mut alert);
            Err(KeyOpFailure::Tls { error, alert })
        }
    }
}

/// The backend's handshake records, processed off the io thread: a CertificateRequest among
/// them makes rustls sign with the client key right here. A failure drops the session (the
/// client learns the backend is gone, not why, so no alert comes back).
fn process_backend_on_worker(mut backend: Box<ClientConnection>) -> KeyOpResult {
    match backend.process_new_packets() {
        Ok(_) => Ok(KeyOpDone::Backend(backend)),
        Err(error) => Err(KeyOpFailure::Tls {
            error,
            alert: Vec::new(),
        }),
    }
}

/// A TLS 1.3 connection that sent a HelloRetryRequest and has not answered the second
/// ClientHello yet (no key exchange done): processing that hello may sign.
fn awaiting_second_hello(tls: &ServerConnection) -> bool {
    matches!(
        tls.handshake_kind(),
        Some(HandshakeKind::FullWithHelloRetryRequest)
    ) && tls.negotiated_key_exchange_group().is_none()
}

/// What the client gets when a handshake fails before the io thread has a connection: the bytes
/// rustls queued when they are alerts only, else `internal_error`. A failed `into_connection()`
/// hands back everything it queued: after a signing failure that is the start of the server's
/// flight (ServerHello...) with no alert, which would leave the client with half a handshake
/// and a bare close.
fn failure_bytes(queued: &[u8]) -> &[u8] {
    let mut rest = queued;
    while let [typ, _, _, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if *typ != 0x15 || tail.len() < len {
            return &ALERT_INTERNAL_ERROR;
        }
        rest = &tail[len..];
    }
    if queued.is_empty() || !rest.is_empty() {
        return &ALERT_INTERNAL_ERROR;
    }
    queued
}

/// The close reason for an error from rustls: a server only ever verifies client certificates,
/// so certificate errors are the client's; nothing in common is a negotiation failure, a hello
/// rustls cannot parse or that breaks the protocol is a bad hello.
fn tls_failure(e: &rustls::Error) -> CloseReason {
    match e {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            CloseReason::ClientCertRejected
        }
        rustls::Error::PeerIncompatible(_) => CloseReason::NegotiationFailed,
        rustls::Error::InvalidMessage(_) | rustls::Error::PeerMisbehaved(_) => {
            CloseReason::BadClientHello
        }
        _ => CloseReason::TlsError,
    }
}

/// Queues what rustls has for the client after `e`. One correction: a TLS 1.2 client that sent
/// no certificate where one is required gets `handshake_failure` (40), the alert TLS 1.2 defines
/// for it (RFC 5246 §7.4.6), not rustls's `certificate_required` (116), which only TLS 1.3 has.
/// The alert is still in plaintext then (the server has not sent ChangeCipherSpec).
fn write_failure(tls: &mut ServerConnection, e: &rustls::Error, out: &mut ByteQueue) {
    let mut bytes = Vec::new();
    let _ = tls.write_tls(&mut bytes);
    if matches!(e, rustls::Error::NoCertificatesPresented)
        && tls.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_2)
    {
        const CERTIFICATE_REQUIRED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 116];
        if bytes.ends_with(&CERTIFICATE_REQUIRED) {
            let last = bytes.len() - 1;
            bytes[last] = 40;
        }
    }
    out.push(&bytes);
}

/// Whether a failed key-op step failed in the key rather than in the peer's handshake. A
/// `SigningKey` reports a failed PKCS#11 call as `rustls::Error::Other` (rustls passes a
/// signer's error through unchanged); everything else rustls decides about the peer's hello.
pub fn is_key_failure(e: &rustls::Error) -> bool {
    matches!(e, rustls::Error::Other(_))
}

impl KeyOpFailure {
    /// The key-op outcome this failure counts as: only a key failure is `failed`.
    pub(crate) fn outcome(&self) -> crate::stats::KeyOpOutcome {
        use crate::stats::KeyOpOutcome;
        match self {
            KeyOpFailure::Tls { error, .. } if is_key_failure(error) => KeyOpOutcome::Failed,
            KeyOpFailure::Tls { .. } => KeyOpOutcome::PeerRefused,
            KeyOpFailure::Rejected => KeyOpOutcome::Failed,
            KeyOpFailure::Deadline => KeyOpOutcome::TimedOut,
        }
    }
}

enum Phase {
    Hello {
        acceptor: Box<Acceptor>,
        flight: Vec<u8>,
    },
    KeyOp,
    Tls {
        tls: Box<ServerConnection>,
        established: bool,
    },
    Closed,
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
    backend_tls: Option<Box<ClientConnection>>,
    /// The backend session is on a key-op worker (`backend_tls` is `None` meanwhile); the
    /// backend is not read, and what a driver still delivers waits in `backend_in`.
    backend_key_op: bool,
    /// Backend records that arrived while `backend_key_op`, processed when the session is back.
    backend_in: ByteQueue,
    /// When the backend TLS handshake started (backend connected); bounds it.
    backend_tls_since: Option<Instant>,
    backend_close_notify_sent: bool,
    backend_connected: bool,
    client_eof: bool,
    eof_signaled: bool,
    client_read_closed: bool,
    backend_read_closed: bool,
    backend_write_shut: bool,
    client_write_shut: bool,
    close_notify_sent: bool,
    events: Vec<Event>,
    closed: Option<CloseReason>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("listener", &self.listener.snap.name)
            .field("closed", &self.closed)
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
            backend_tls: None,
            backend_key_op: false,
            backend_in: ByteQueue::default(),
            backend_tls_since: None,
            backend_close_notify_sent: false,
            backend_connected: false,
            client_eof: false,
            eof_signaled: false,
            client_read_closed: false,
            backend_read_closed: false,
            backend_write_shut: false,
            client_write_shut: false,
            close_notify_sent: false,
            events: Vec::new(),
            closed: None,
        }
    }

    /// The listener this connection was accepted on (its snapshot at accept time).
    pub fn listener_name(&self) -> &str {
        &self.listener.snap.name
    }

    /// The backend to connect to after the handshake.
    pub fn backend_addr(&self) -> SocketAddr {
        self.listener.snap.backend
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
        self.closed
    }

    /// Still in the handshake (for per-core handshake-in-flight accounting).
    pub fn is_handshaking(&self) -> bool {
        match &self.phase {
            Phase::Hello { .. } | Phase::KeyOp => true,
            Phase::Tls { established, .. } => !established,
            Phase::Closed => false,
        }
    }

    /// Waiting for a key-op result (the client's handshake or the backend's).
    pub fn awaiting_key_op(&self) -> bool {
        matches!(self.phase, Phase::KeyOp) || self.backend_key_op
    }

    /// The listener's backend speaks TLS and its session exists (here or on a key-op worker).
    fn backend_speaks_tls(&self) -> bool {
        self.backend_tls.is_some() || self.backend_key_op
    }

    /// The driver should read from the client now.
    pub fn wants_client_read(&self) -> bool {
        if self.closed.is_some() || self.client_read_closed || self.client_eof {
            return false;
        }
        match &self.phase {
            Phase::Hello { .. } => true,
            Phase::KeyOp | Phase::Closed => false,
            Phase::Tls { .. } => {
                self.to_backend.len() < self.cap && self.client_in.len() < self.cap
            }
        }
    }

    /// The driver should read from the backend now.
    pub fn wants_backend_read(&self) -> bool {
        self.closed.is_none()
            && self.backend_connected
            && !self.backend_read_closed
            && !self.close_notify_sent
            && !self.backend_key_op
            && self.to_client.len() < self.cap
    }

    /// TLS bytes to write to the client.
    pub fn client_out(&self) -> &[u8] {
        self.to_client.as_slice()
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
            if matches!(self.phase, Phase::Tls { .. }) {
                self.pump_client(now);
                return;
            }
        }
        self.after_progress();
    }

    /// The driver should now shut down the write side of the backend socket (client finished
    /// sending and everything reached the backend), then call [`Conn::backend_write_shut`].
    pub fn wants_backend_shutdown(&self) -> bool {
        self.closed.is_none()
            && self.backend_connected
            && self.client_read_closed
            && !self.backend_write_shut
            && self.to_backend.is_empty()
            && self.backend_wire.is_empty()
            && (!self.backend_speaks_tls() || self.backend_close_notify_sent)
    }

    /// The backend socket's write side is shut.
    pub fn backend_write_shut(&mut self) {
        self.backend_write_shut = true;
        self.after_progress();
    }

    /// The driver should shut down the write side of the client socket (close_notify sent and
    /// flushed), then call [`Conn::client_write_shut`].
    pub fn wants_client_shutdown(&self) -> bool {
        self.closed.is_none()
            && self.close_notify_sent
            && !self.client_write_shut
            && self.to_client.is_empty()
    }

    /// The client socket's write side is shut.
    pub fn client_write_shut(&mut self) {
        self.client_write_shut = true;
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
        let handshaking = self.backend_key_op || self.backend_tls.as_ref()?.is_handshaking();
        handshaking.then(|| since + self.backend_connect_timeout)
    }

    /// Fires the handshake or idle timeout if due.
    pub fn on_timer(&mut self, now: Instant) {
        if self.closed.is_some() {
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
        if self.closed.is_none() {
            self.fail(reason);
        }
    }

    /// The backend is connected: plaintext may flow to it.
    pub fn on_backend_connected(&mut self, now: Instant) {
        self.backend_connected = true;
        self.last_activity = now;
        if self.backend_tls.is_some() {
            self.backend_tls_since = Some(now);
        }
    }

    /// Bytes read from the client.
    pub fn on_client_data(&mut self, data: &[u8], now: Instant) {
        if self.closed.is_some() || data.is_empty() {
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
                        if matches!(self.phase, Phase::Tls { .. }) && !rd.is_empty() {
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
            Phase::KeyOp | Phase::Tls { .. } => {
                self.client_in.push(data);
                self.pump_client(now);
            }
            Phase::Closed => {}
        }
    }

    /// The client sent FIN.
    pub fn on_client_eof(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        match &mut self.phase {
            Phase::Hello { .. } | Phase::KeyOp => self.fail(CloseReason::ClientClosedEarly),
            Phase::Tls { established, .. } => {
                if !*established {
                    self.fail(CloseReason::ClientClosedEarly);
                    return;
                }
                self.client_eof = true;
                self.pump_client(now);
            }
            Phase::Closed => {}
        }
    }

    /// Bytes read from the backend.
    pub fn on_backend_data(&mut self, data: &[u8], now: Instant) {
        if self.closed.is_some() || data.is_empty() {
            return;
        }
        self.last_activity = now;
        if self.backend_speaks_tls() {
            self.on_backend_tls_data(data);
            return;
        }
        if let Phase::Tls { tls, .. } = &mut self.phase {
            if tls.writer().write_all(data).is_err() {
                self.fail(CloseReason::TlsError);
                return;
            }
            self.flush_tls();
        }
    }

    /// The backend sent FIN: send close_notify to the client after what is queued.
    pub fn on_backend_eof(&mut self, _now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self.backend_key_op {
            // Only a handshake goes to a worker.
            self.fail_backend_tls(BackendTlsCause::ClosedDuringHandshake, None);
            return;
        }
        if let Some(bt) = self.backend_tls.as_mut() {
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
            if self.closed.is_some() || self.backend_read_closed {
                return;
            }
        }
        self.backend_read_closed = true;
        if let Phase::Tls { tls, .. } = &mut self.phase {
            tls.send_close_notify();
            self.close_notify_sent = true;
        }
        self.flush_tls();
        self.after_progress();
    }

    /// The key-op worker's answer for this connection.
    pub fn on_key_op_done(&mut self, result: KeyOpResult, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self.backend_key_op {
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
        self.closed.is_none()
            && self.client_read_closed
            && self.backend_read_closed
            && self.to_client.is_empty()
            && self.to_backend.is_empty()
            && self.backend_wire.is_empty()
            && self.backend_write_shut
            && self.client_write_shut
    }

    fn fail(&mut self, reason: CloseReason) {
        self.closed = Some(reason);
        self.phase = Phase::Closed;
        self.to_backend = ByteQueue::default();
        self.backend_wire = ByteQueue::default();
        self.backend_tls = None;
        self.backend_key_op = false;
        self.backend_in = ByteQueue::default();
        self.client_in = ByteQueue::default();
    }

    fn try_accept(&mut self, now: Instant) {
        let Phase::Hello { acceptor, flight } = &mut self.phase else {
            return;
        };
        let accepted = match acceptor.accept() {
            Ok(None) => return,
            Ok(Some(a)) => a,
            Err((_, mut alert)) => {
                let _ = alert.write_all(&mut self.to_client);
                self.fail(CloseReason::BadClientHello);
                return;
            }
        };
        if let Some(filter) = &self.listener.snap.sni_filter {
            if !filter.allows(accepted.client_hello().server_name()) {
                self.to_client.push(&ALERT_UNRECOGNIZED_NAME);
                self.fail(CloseReason::UnknownSni);
                return;
            }
        }
        let flight = std::mem::take(flight);
        let real = self.listener.snap.tls.clone();
        let tripwire = match (&self.listener.tripwire_tls, self.danger_inline) {
            (Some(t), false) => Some(t.clone()),
            _ => None,
        };
        let Some(tripwire) = tripwire else {
            match accepted.into_connection(real) {
                Ok(tls) => self.enter_tls(Box::new(tls), now),
                Err((e, mut alert)) => {
                    let mut queued = Vec::new();
                    let _ = alert.write_all(&mut queued);
                    self.to_client.push(failure_bytes(&queued));
                    self.fail(tls_failure(&e));
                }
            }
            return;
        };
        // What the session store and ticketer see from here on, the replay sees again.
        let attempt = InlineAttempt::begin();
        if hello::may_resume(&flight, &*self.listener.snap.tls.session_storage) {
            tripwire_reset();
            match accepted.into_connection(tripwire) {
                // A HelloRetryRequest decides nothing: the second hello may still need a
                // signature the tripwire cannot give. Discarded unsent; a worker answers both.
                Ok(tls) if awaiting_second_hello(&tls) => {}
                Ok(tls) => {
                    drop(attempt);
                    self.enter_tls(Box::new(tls), now);
                    return;
                }
                Err((e, mut alert)) => {
                    if !tripwire_tripped() {
                        let mut queued = Vec::new();
                        let _ = alert.write_all(&mut queued);
                        self.to_client.push(failure_bytes(&queued));
                        self.fail(tls_failure(&e));
                        return;
                    }
                }
            }
        }
        drop(attempt);
        self.phase = Phase::KeyOp;
        self.events.push(Event::Offload(KeyOpJob {
            flight,
            config: real,
            connection: None,
            backend: None,
        }));
    }

    /// Key operations of this connection run on workers (see [`KeyOpJob`]).
    fn offloads(&self) -> bool {
        self.listener.tripwire_tls.is_some() && !self.danger_inline
    }

    /// Hands the connection to a worker to process what it has read: the second ClientHello
    /// after a HelloRetryRequest, on an offloaded listener.
    fn offload_second_hello(&mut self) {
        self.flush_tls();
        let Phase::Tls { tls, .. } = std::mem::replace(&mut self.phase, Phase::KeyOp) else {
            return;
        };
        self.events.push(Event::Offload(KeyOpJob {
            flight: Vec::new(),
            config: self.listener.snap.tls.clone(),
            connection: Some(tls),
            backend: None,
        }));
    }

    /// The backend handshake's records go through a key-op worker: its client key is on the
    /// token, and rustls signs for a CertificateRequest inside `process_new_packets`. Which
    /// flight holds one is not visible from outside rustls (TLS 1.3 encrypts it; TLS 1.2 may send
    /// it in the ServerHello's record), so every flight of the backend handshake goes.
    fn backend_offloads(&self) -> bool {
        !self.danger_inline
            && self
                .listener
                .snap
                .backend_tls
                .as_ref()
                .is_some_and(|b| b.offload_key_ops)
    }

    /// Parks the backend session on a worker with the records it has read.
    fn offload_backend(&mut self) {
        let Some(backend) = self.backend_tls.take() else {
            return;
        };
        self.backend_key_op = true;
        self.events.push(Event::Offload(KeyOpJob {
            flight: Vec::new(),
            config: self.listener.snap.tls.clone(),
            connection: None,
            backend: Some(backend),
        }));
    }

    /// The worker's answer for the backend session: pumping resumes (with the records that
    /// arrived meanwhile), or the connection ends. A token that failed or answered late ends it
    /// as for a client handshake (`key_op_failed`, `key_op_timeout`, `key_op_rejected`); what
    /// rustls refused in the backend's records is a backend TLS error, as inline.
    fn on_backend_key_op_done(&mut self, result: KeyOpResult) {
        self.backend_key_op = false;
        let reason = match result {
            Ok(KeyOpDone::Backend(backend)) => {
                self.backend_tls = Some(backend);
                self.drain_backend_plaintext();
                let pending = std::mem::take(&mut self.backend_in);
                // Also flushes the client's flight to the backend and the plaintext that waited.
                self.on_backend_tls_data(pending.as_slice());
                return;
            }
            Ok(KeyOpDone::Client(_)) => CloseReason::KeyOpFailed,
            Err(KeyOpFailure::Tls { error, .. }) if !is_key_failure(&error) => {
                self.fail_backend_tls(BackendTlsCause::of(&error), Some(&error));
                return;
            }
            Err(KeyOpFailure::Tls { error, .. }) => {
                tracing::warn!(listener = %self.listener.snap.name, backend = %self.listener.snap.backend, error = %error, "backend TLS client signature failed");
                CloseReason::KeyOpFailed
            }
            Err(KeyOpFailure::Rejected) => CloseReason::KeyOpRejected,
            Err(KeyOpFailure::Deadline) => CloseReason::KeyOpTimeout,
        };
        // The client's session is established: it learns the backend is gone, not why.
        if let Phase::Tls { tls, .. } = &mut self.phase {
            tls.send_close_notify();
        }
        self.flush_tls();
        self.fail(reason);
    }

    fn enter_tls(&mut self, mut tls: Box<ServerConnection>, now: Instant) {
        // Plaintext flow is bounded by our own queues and read pausing, not by rustls's limit.
        tls.set_buffer_limit(None);
        self.phase = Phase::Tls {
            tls,
            established: false,
        };
        // Records that arrived with the hello sit in rustls's buffer until processed.
        if let Phase::Tls { tls, .. } = &mut self.phase {
            if let Err(e) = tls.process_new_packets() {
                write_failure(tls, &e, &mut self.to_client);
                self.fail(tls_failure(&e));
                return;
            }
        }
        self.pump_client(now);
    }

    /// Moves client bytes through rustls into the backend queue, as far as the bounds allow.
    fn pump_client(&mut self, now: Instant) {
        let offloads = self.offloads();
        loop {
            let Phase::Tls { tls, .. } = &mut self.phase else {
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
                        self.client_read_closed = true;
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
                        self.client_read_closed = true;
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
            } else if self.client_in.is_empty() && self.client_eof && !self.eof_signaled {
                // An empty read tells rustls about EOF once every byte before it went in; a
                // missing close_notify is a truncation the backend sees as an ordinary FIN.
                self.eof_signaled = true;
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

    fn check_established(&mut self, now: Instant) {
        let Phase::Tls { tls, established } = &mut self.phase else {
            return;
        };
        if *established || tls.is_handshaking() {
            return;
        }
        *established = true;
        // A resumed session carries the client certificate it was made with (or none); the
        // listener's trust (CRLs) or mode may have changed since, so check it again before any
        // byte moves on.
        if matches!(tls.handshake_kind(), Some(HandshakeKind::Resumed)) {
            if let Some(check) = &self.listener.snap.client_cert_check {
                if !check.allows_resumed(tls.peer_certificates()) {
                    self.fail(CloseReason::ClientCertRejected);
                    return;
                }
            }
        }
        let version = match tls.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1_3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1_2",
            _ => "other",
        };
        let suite = tls
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown");
        let group = tls
            .negotiated_key_exchange_group()
            .and_then(|g| g.name().as_str())
            .unwrap_or("none");
        let resumed = matches!(tls.handshake_kind(), Some(HandshakeKind::Resumed));
        self.events.push(Event::HandshakeDone(HandshakeInfo {
            version,
            suite,
            group,
            resumed,
            duration: now.saturating_duration_since(self.accepted_at),
        }));
        // The backend connect starts now, so the PROXY header (and the client identity in it)
        // is built here, when the identity is known.
        let header = self.listener.snap.proxy_protocol.then(|| {
            let facts = identity::Facts {
                version: tls.protocol_version(),
                suite: tls.negotiated_cipher_suite(),
                sni: tls.server_name(),
                alpn: tls.alpn_protocol(),
                peer_certs: tls.peer_certificates(),
                resumed,
            };
            match identity::tlvs(&facts) {
                Some(tlvs) => proxy_v2::header_with_tlvs(self.peer, self.local, &tlvs),
                None => proxy_v2::header(self.peer, self.local),
            }
        });
        self.start_backend_stream(header);
    }

    /// Queues what the backend must see first: the PROXY header in clear, then (TLS backends)
    /// the ClientHello.
    fn start_backend_stream(&mut self, header: Option<Vec<u8>>) {
        let Some(bt) = self.listener.snap.backend_tls.clone() else {
            if let Some(h) = header {
                self.to_backend.prepend(&h);
            }
            return;
        };
        if let Some(h) = header {
            self.backend_wire.push(&h);
        }
        match ClientConnection::new(bt.config, bt.server_name) {
            Ok(mut c) => {
                // Bounded by our own queues, as on the client side.
                c.set_buffer_limit(None);
                self.backend_tls = Some(Box::new(c));
                self.pump_backend_tls();
            }
            Err(e) => self.fail_backend_tls(BackendTlsCause::of(&e), Some(&e)),
        }
    }

    /// Encrypts queued client plaintext for the backend (once its handshake is done, as far as
    /// the wire queue's bound allows), sends close_notify after the client's last byte, and
    /// moves rustls's records to the wire queue.
    fn pump_backend_tls(&mut self) {
        let Some(bt) = self.backend_tls.as_mut() else {
            return;
        };
        if !bt.is_handshaking() {
            while !self.to_backend.is_empty() && self.backend_wire.len() < self.cap {
                let room = self.cap - self.backend_wire.len();
                let chunk = &self.to_backend.as_slice()[..self.to_backend.len().min(room)];
                match bt.writer().write(chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.to_backend.consume(n),
                }
                while bt.wants_write() {
                    match bt.write_tls(&mut self.backend_wire) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            if self.client_read_closed
                && self.to_backend.is_empty()
                && !self.backend_close_notify_sent
            {
                bt.send_close_notify();
                self.backend_close_notify_sent = true;
            }
        }
        while bt.wants_write() {
            match bt.write_tls(&mut self.backend_wire) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// TLS records from the backend: through rustls, plaintext on to the client.
    fn on_backend_tls_data(&mut self, data: &[u8]) {
        if self.backend_key_op {
            self.backend_in.push(data);
            return;
        }
        let offloads = self.backend_offloads();
        let mut rd = data;
        while !rd.is_empty() && self.closed.is_none() {
            let Some(bt) = self.backend_tls.as_mut() else {
                return;
            };
            match bt.read_tls(&mut rd) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    let err = rustls::Error::General(format!("reading backend records: {e}"));
                    self.fail_backend_tls(BackendTlsCause::ProtocolError, Some(&err));
                    return;
                }
            }
            if offloads && bt.is_handshaking() {
                // As much of the flight as rustls buffers unprocessed goes along; the rest
                // waits in `backend_in` for the session to come back.
                while !rd.is_empty() && matches!(bt.read_tls(&mut rd), Ok(n) if n > 0) {}
                self.backend_in.push(rd);
                self.offload_backend();
                self.flush_tls();
                return;
            }
            if let Err(e) = bt.process_new_packets() {
                self.fail_backend_tls(BackendTlsCause::of(&e), Some(&e));
                return;
            }
            // Drained after every record batch so rustls's own plaintext buffer stays small.
            self.drain_backend_plaintext();
        }
        if self.closed.is_none() {
            self.pump_backend_tls();
            self.flush_tls();
            self.after_progress();
        }
    }

    /// Moves decrypted backend bytes into the client's TLS session; the backend's close_notify
    /// becomes ours to the client.
    fn drain_backend_plaintext(&mut self) {
        let (Some(bt), Phase::Tls { tls, .. }) = (self.backend_tls.as_mut(), &mut self.phase)
        else {
            return;
        };
        let mut buf = [0u8; 8192];
        let mut finished = false;
        loop {
            match bt.reader().read(&mut buf) {
                Ok(0) => {
                    finished = true;
                    break;
                }
                Ok(n) => {
                    if tls.writer().write_all(&buf[..n]).is_err() {
                        self.fail(CloseReason::TlsError);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The backend closed without close_notify.
                    finished = true;
                    break;
                }
            }
        }
        if finished && !self.backend_read_closed {
            self.backend_read_closed = true;
            tls.send_close_notify();
            self.close_notify_sent = true;
        }
        self.flush_tls();
    }

    /// Ends the connection for a backend TLS failure: log line naming the cause, counted by
    /// the driver under `backend_tls_error` and per cause.
    fn fail_backend_tls(&mut self, cause: BackendTlsCause, error: Option<&rustls::Error>) {
        let backend = self.listener.snap.backend;
        let server_name = self
            .listener
            .snap
            .backend_tls
            .as_ref()
            .map(|b| b.server_name.to_str().into_owned())
            .unwrap_or_default();
        match error {
            Some(e) => {
                tracing::warn!(listener = %self.listener.snap.name, %backend, %server_name, reason = cause.as_str(), error = %e, "backend TLS failed: {}", cause.describe())
            }
            None => {
                tracing::warn!(listener = %self.listener.snap.name, %backend, %server_name, reason = cause.as_str(), "backend TLS failed: {}", cause.describe())
            }
        }
        // The client's session ends cleanly: it learns the backend is gone, not why.
        if let Phase::Tls { tls, .. } = &mut self.phase {
            tls.send_close_notify();
        }
        self.flush_tls();
        self.fail(CloseReason::BackendTlsError(cause));
    }

    fn flush_tls(&mut self) {
        if let Phase::Tls { tls, .. } = &mut self.phase {
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
