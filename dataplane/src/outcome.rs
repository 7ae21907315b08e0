//! How a connection ended and what its handshake was: the facts the connection core reports
//! and the counters ([`crate::stats`]) and logs read. Kept apart from `conn` so that what
//! counts connections does not depend on the connection core.

use std::time::Duration;

use crate::backend_tls::BackendTlsCause;

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
    /// No server of the routed pool could take the connection: all down, ejected, drained or
    /// full (backend).
    NoHealthyBackend,
    /// The client offered only ALPN protocols the routed pool does not speak (peer).
    NoApplicationProtocol,
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
            CloseReason::NoHealthyBackend => "no_healthy_backend",
            CloseReason::NoApplicationProtocol => "no_application_protocol",
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
