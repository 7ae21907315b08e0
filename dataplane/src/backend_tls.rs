//! TLS to the backend: the settings a listener carries and the names of what can go wrong.
//!
//! The connection core wraps the backend side in a `rustls::ClientConnection` (see
//! [`crate::conn::Conn`]); drivers only ever see bytes, so neither io driver knows whether the
//! backend speaks TLS. The handshake to the backend starts once the client's handshake is done
//! and the backend socket is connected; a PROXY v2 header, when on, goes in clear first (as
//! HAProxy does). Client plaintext waits in the same bounded queue as for a plain backend until
//! the backend handshake completes.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig};

/// How a listener reaches its backend over TLS.
#[derive(Clone)]
pub struct BackendTls {
    /// Trust anchors (the backend zone's CA), optional client certificate (whose key may be on
    /// the token), versions and suites. Its resumption store lets later backend connections
    /// resume instead of signing again with the client key.
    pub config: Arc<ClientConfig>,
    /// The name the backend's certificate must carry (SNI is sent for DNS names).
    pub server_name: ServerName<'static>,
    /// The client certificate's key is slow (on a token): while the backend handshake runs, the
    /// backend's records are processed — and so the client signature made — on a key-op worker
    /// instead of the io thread. `false` for a software key or no client certificate.
    pub offload_key_ops: bool,
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("server_name", &self.server_name)
            .field("offload_key_ops", &self.offload_key_ops)
            .finish_non_exhaustive()
    }
}

/// Why a backend TLS session failed; the `reason` label of
/// `tlsgate_backend_tls_errors_total` and the cause named in the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendTlsCause {
    /// The backend's certificate is past its notAfter.
    CertificateExpired,
    /// The backend's certificate is before its notBefore.
    CertificateNotYetValid,
    /// The certificate does not name the configured `server_name`.
    NameMismatch,
    /// The chain does not lead to the configured CA.
    UnknownIssuer,
    /// A signature in the chain is wrong or uses an algorithm we do not accept.
    BadSignature,
    /// The certificate is revoked.
    CertificateRevoked,
    /// Any other certificate problem (bad encoding, critical extension, wrong usage...).
    BadCertificate,
    /// The backend sent a fatal alert (for example: it wanted a client certificate we lack or
    /// refused ours).
    AlertReceived,
    /// The backend broke the TLS protocol (or spoke something else).
    ProtocolError,
    /// The backend handshake did not finish within the backend connect timeout.
    HandshakeTimeout,
    /// The backend closed the connection before its handshake finished.
    ClosedDuringHandshake,
}

impl BackendTlsCause {
    /// Every cause, in counter order.
    pub const ALL: [BackendTlsCause; 11] = [
        BackendTlsCause::CertificateExpired,
        BackendTlsCause::CertificateNotYetValid,
        BackendTlsCause::NameMismatch,
        BackendTlsCause::UnknownIssuer,
        BackendTlsCause::BadSignature,
        BackendTlsCause::CertificateRevoked,
        BackendTlsCause::BadCertificate,
        BackendTlsCause::AlertReceived,
        BackendTlsCause::ProtocolError,
        BackendTlsCause::HandshakeTimeout,
        BackendTlsCause::ClosedDuringHandshake,
    ];

    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendTlsCause::CertificateExpired => "certificate_expired",
            BackendTlsCause::CertificateNotYetValid => "certificate_not_yet_valid",
            BackendTlsCause::NameMismatch => "name_mismatch",
            BackendTlsCause::UnknownIssuer => "unknown_issuer",
            BackendTlsCause::BadSignature => "bad_signature",
            BackendTlsCause::CertificateRevoked => "certificate_revoked",
            BackendTlsCause::BadCertificate => "bad_certificate",
            BackendTlsCause::AlertReceived => "alert_received",
            BackendTlsCause::ProtocolError => "protocol_error",
            BackendTlsCause::HandshakeTimeout => "handshake_timeout",
            BackendTlsCause::ClosedDuringHandshake => "closed_during_handshake",
        }
    }

    /// Words for the log line.
    pub fn describe(self) -> &'static str {
        match self {
            BackendTlsCause::CertificateExpired => "backend certificate expired",
            BackendTlsCause::CertificateNotYetValid => "backend certificate not yet valid",
            BackendTlsCause::NameMismatch => {
                "name mismatch: the backend certificate does not name server_name"
            }
            BackendTlsCause::UnknownIssuer => {
                "unknown issuer: the backend certificate does not chain to the configured CA"
            }
            BackendTlsCause::BadSignature => "bad signature in the backend certificate chain",
            BackendTlsCause::CertificateRevoked => "backend certificate revoked",
            BackendTlsCause::BadCertificate => "bad backend certificate",
            BackendTlsCause::AlertReceived => "the backend sent a fatal alert",
            BackendTlsCause::ProtocolError => "TLS protocol error from the backend",
            BackendTlsCause::HandshakeTimeout => "backend TLS handshake timed out",
            BackendTlsCause::ClosedDuringHandshake => {
                "the backend closed the connection during the TLS handshake"
            }
        }
    }

    /// Classifies a rustls error from the backend side.
    pub fn of(error: &rustls::Error) -> Self {
        match error {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    BackendTlsCause::CertificateExpired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    BackendTlsCause::CertificateNotYetValid
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => BackendTlsCause::NameMismatch,
                CertificateError::UnknownIssuer => BackendTlsCause::UnknownIssuer,
                CertificateError::BadSignature
                | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
                | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                    BackendTlsCause::BadSignature
                }
                CertificateError::Revoked => BackendTlsCause::CertificateRevoked,
                _ => BackendTlsCause::BadCertificate,
            },
            rustls::Error::AlertReceived(_) => BackendTlsCause::AlertReceived,
            _ => BackendTlsCause::ProtocolError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_errors_map_to_named_causes() {
        let cases = [
            (CertificateError::Expired, "certificate_expired"),
            (CertificateError::NotValidYet, "certificate_not_yet_valid"),
            (CertificateError::NotValidForName, "name_mismatch"),
            (CertificateError::UnknownIssuer, "unknown_issuer"),
            (CertificateError::BadSignature, "bad_signature"),
            (CertificateError::Revoked, "certificate_revoked"),
            (CertificateError::BadEncoding, "bad_certificate"),
        ];
        for (err, label) in cases {
            let cause = BackendTlsCause::of(&rustls::Error::InvalidCertificate(err));
            assert_eq!(cause.as_str(), label);
        }
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert_eq!(BackendTlsCause::of(&alert), BackendTlsCause::AlertReceived);
        let labels: std::collections::HashSet<_> =
            BackendTlsCause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels.len(), BackendTlsCause::ALL.len());
    }
}
