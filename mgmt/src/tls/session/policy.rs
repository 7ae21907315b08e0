//! The client-authentication policy a session was made under, and the refusal of sessions made
//! under another one.
//!
//! rustls resumes any session its ticketer decrypts or its cache returns; it never asks whether
//! the listener's client authentication is still the one the session was made under. A session
//! made while a listener did not ask for certificates (or made `optional` ones without one)
//! would otherwise reach the backend without a certificate after the operator set `required`.
//! So every ticket and cache entry carries the [`PolicyDigest`] of the policy it was made under
//! (sealed inside the ticket, so a client cannot change it), and a session whose digest is not
//! the listener's current one is not resumed: the client gets a full handshake under the
//! current policy, which asks for a certificate where one is required.
//!
//! The digest covers the mode and the trust anchors, not the CRLs: a new CRL must not end every
//! session of the zone (nor make fleet members that load it minutes apart refuse each other's
//! tickets). The data plane re-checks a resumed session's client chain against the current CAs
//! and CRLs instead (`ClientCertCheck`), and refuses a session without a chain where a
//! certificate is required.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use aws_lc_rs::digest::{Context, SHA256};
use rustls_pki_types::CertificateDer;

use crate::tls::client_auth::ClientAuthMode;

/// Counter: resumptions refused, by `listener` and `reason` ([`Refusal`]).
pub const METRIC_RESUMPTION_REFUSED: &str = "tlsgate_resumption_refused_total";

/// At most one log line per listener and reason in this interval (each refusal is counted).
const LOG_INTERVAL: Duration = Duration::from_secs(10);

const DIGEST_LABEL: &[u8] = b"tlsgate client-auth policy v1\0";

/// SHA-256 over a listener's client-authentication mode and trust anchors (DER, sorted, so the
/// order of the CA bundle does not matter). Deterministic: every process of a fleet with the
/// same settings computes the same digest, so fleet tickets cross appliances and restarts.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyDigest([u8; PolicyDigest::LEN]);

impl PolicyDigest {
    /// Bytes in a digest.
    pub const LEN: usize = 32;

    /// The digest of a listener that does not authenticate clients.
    pub fn no_client_auth() -> Self {
        Self::compute(0, &[])
    }

    /// The digest of `mode` over these CA certificates.
    pub fn client_auth(mode: ClientAuthMode, anchors: &[CertificateDer<'_>]) -> Self {
        let tag = match mode {
            ClientAuthMode::Optional => 1,
            ClientAuthMode::Required => 2,
        };
        Self::compute(tag, anchors)
    }

    fn compute(mode: u8, anchors: &[CertificateDer<'_>]) -> Self {
        let mut ders: Vec<&[u8]> = anchors.iter().map(|c| c.as_ref()).collect();
        ders.sort_unstable();
        ders.dedup();
        let mut ctx = Context::new(&SHA256);
        ctx.update(DIGEST_LABEL);
        ctx.update(&[mode]);
        ctx.update(&(ders.len() as u64).to_be_bytes());
        for der in ders {
            ctx.update(&(der.len() as u64).to_be_bytes());
            ctx.update(der);
        }
        let mut out = [0u8; Self::LEN];
        out.copy_from_slice(ctx.finish().as_ref());
        Self(out)
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// Reads a digest from the start of `bytes`.
    pub(super) fn read(bytes: &[u8]) -> Option<(Self, &[u8])> {
        let head = bytes.get(..Self::LEN)?;
        let mut out = [0u8; Self::LEN];
        out.copy_from_slice(head);
        Some((Self(out), &bytes[Self::LEN..]))
    }
}

impl fmt::Debug for PolicyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyDigest(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Why a session was not resumed (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Made under another client-authentication mode or other trust anchors: the client gets a
    /// full handshake under the current policy.
    PolicyChanged,
    /// Resumed without a client certificate on a listener that requires one (the data plane
    /// closes the connection).
    NoClientCertificate,
    /// Its client certificate no longer passes the listener's CAs and CRLs (revoked, expired,
    /// CA removed; the data plane closes the connection).
    ClientCertificateRejected,
}

impl Refusal {
    /// Every reason, for series created at zero.
    pub const ALL: [Refusal; 3] = [
        Refusal::PolicyChanged,
        Refusal::NoClientCertificate,
        Refusal::ClientCertificateRejected,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PolicyChanged => "policy_changed",
            Refusal::NoClientCertificate => "no_client_certificate",
            Refusal::ClientCertificateRejected => "client_certificate_rejected",
        }
    }

    fn why(self) -> &'static str {
        match self {
            Refusal::PolicyChanged => {
                "session not resumed: made under another client-auth policy (mode or CAs); full handshake"
            }
            Refusal::NoClientCertificate => {
                "resumed session refused: it has no client certificate and the listener requires one"
            }
            Refusal::ClientCertificateRejected => {
                "resumed session refused: its client certificate no longer passes the listener's CAs and CRLs"
            }
        }
    }
}

/// When each (listener, reason) was last logged, and refusals not logged since.
type LogState = Mutex<HashMap<(String, Refusal), (Instant, u64)>>;

fn log_state() -> &'static LogState {
    // Process-wide by nature: it throttles lines of the process's one log.
    static STATE: OnceLock<LogState> = OnceLock::new();
    STATE.get_or_init(Default::default)
}

/// Counts a refused resumption and logs it at info, at most once per [`LOG_INTERVAL`] per
/// listener and reason. Not during the data plane's inline attempt for an offloaded listener:
/// the same hello is replayed on a key-op worker, which counts it once.
pub fn refused(listener: &str, reason: Refusal) {
    if tlsgate_dataplane::inline_resumption_attempt() {
        return;
    }
    metrics::counter!(METRIC_RESUMPTION_REFUSED, "listener" => listener.to_owned(), "reason" => reason.as_str())
        .increment(1);
    let now = Instant::now();
    let mut state = log_state().lock();
    let suppressed = match state.get_mut(&(listener.to_owned(), reason)) {
        Some((last, skipped)) if now.duration_since(*last) < LOG_INTERVAL => {
            *skipped += 1;
            return;
        }
        Some((last, skipped)) => {
            *last = now;
            std::mem::take(skipped)
        }
        None => {
            state.insert((listener.to_owned(), reason), (now, 0));
            0
        }
    };
    drop(state);
    tracing::info!(
        listener,
        reason = reason.as_str(),
        not_logged_since_last = suppressed,
        "{}",
        reason.why()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_covers_mode_and_anchors_but_not_their_order() {
        let a = CertificateDer::from(vec![1u8, 2, 3]);
        let b = CertificateDer::from(vec![4u8, 5]);
        let req = PolicyDigest::client_auth(ClientAuthMode::Required, &[a.clone(), b.clone()]);
        assert_eq!(
            req,
            PolicyDigest::client_auth(ClientAuthMode::Required, &[b.clone(), a.clone()])
        );
        assert_ne!(
            req,
            PolicyDigest::client_auth(ClientAuthMode::Optional, &[a.clone(), b.clone()])
        );
        assert_ne!(
            req,
            PolicyDigest::client_auth(ClientAuthMode::Required, std::slice::from_ref(&a))
        );
        assert_ne!(req, PolicyDigest::no_client_auth());
        assert_ne!(
            PolicyDigest::no_client_auth(),
            PolicyDigest::client_auth(ClientAuthMode::Optional, &[])
        );
        let (back, rest) = PolicyDigest::read(&[req.as_bytes(), &b"tail"[..]].concat())
            .map(|(d, r)| (d, r.to_vec()))
            .expect("read");
        assert_eq!((back, &rest[..]), (req, &b"tail"[..]));
        assert!(PolicyDigest::read(&[0; 31]).is_none());
    }
}
