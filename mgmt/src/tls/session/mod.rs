//! Session resumption planned for forward secrecy: per-listener `[listener.session]` settings,
//! stateless tickets under rotating keys (local, or derived from a secret on the token so a fleet
//! shares them), and a bounded, expiring session cache.
//!
//! # What resumption costs forward secrecy, and the defaults that follow
//!
//! A TLS 1.2 ticket (and a TLS 1.2 cache entry) holds the session's master secret: whoever gets
//! the ticket key and a recording of the traffic decrypts that session and every resumption of
//! it. A TLS 1.3 ticket holds a resumption secret; rustls resumes TLS 1.3 only with a fresh
//! ECDHE exchange (`psk_dhe_ke`) and we never enable 0-RTT, so a stolen ticket key lets an
//! attacker impersonate either side of a resumption but not read recorded TLS 1.3 traffic. So the
//! quantity to bound is how long a ticket key (and a cached secret) exists.
//!
//! The key of epoch `e` encrypts tickets during `[e·R, (e+1)·R)` (`R` = `ticket_rotation_secs`)
//! and decrypts them until the last of them reaches `lifetime_secs` (`L`); then it is erased.
//! One key therefore lives at most `R + L` (plus one maintenance tick), and a recorded TLS 1.2
//! session is exposed through its ticket for at most that long. The defaults, `R` = 1 h and
//! `L` = 2 h, keep every key for at most 3 h while a client that comes back within the usual
//! length of a visit (2 h) still resumes; rustls's own default would keep a key for 12 h.
//! A ticket carries its epoch and issue time (authenticated), and a ticket older than `L` is
//! refused even while its key is still held. Cache entries expire after `L` as well.
//!
//! A TLS 1.2 client resuming with a ticket gets a new ticket for the same master secret. That
//! ticket keeps the issue time of the first (rustls decrypts the old ticket and encrypts the
//! new one in one call on one thread; see `ticketer`), so the whole chain of TLS 1.2
//! resumptions ends `L` after the full handshake. TLS 1.3 derives a new secret on every
//! resumption, so its new tickets start a new lifetime.
//!
//! # Fleet tickets
//!
//! With `fleet_secret`, the key of epoch `e` is
//! `HMAC-SHA256(secret, "tlsgate ticket key v1" ‖ 0 ‖ len(label) ‖ label ‖ R ‖ e)`, computed by
//! the token (`C_Sign` with `CKM_SHA256_HMAC`): every appliance that reaches the same secret
//! (the same token, or a cluster of network HSMs) issues and accepts the same tickets, and no
//! key file is ever copied. The label (the listener name unless `fleet_label` says otherwise)
//! keeps zones apart: a ticket from one listener never resumes on another. The derived key lives
//! in process memory like any ticket key and is wiped when dropped. Derivation never happens on
//! a handshake: a maintenance thread derives the next epoch's key ahead of time and erases
//! expired ones; if the token fails, the keys already held keep working and the failure is
//! logged and counted.
//!
//! # The session cache: bounded and sharded, not per core
//!
//! The kernel spreads connections over the cores by a hash of the 4-tuple (`SO_REUSEPORT`), so a
//! returning client lands on a random core: with a cache per core, a TLS 1.2 session id would be
//! found only one time in N. The cache is therefore shared by the cores of a listener and split
//! into shards by a keyed hash of the session id, each a small mutex-protected map with FIFO
//! eviction: lookups happen only on handshakes (never on the data path), hold the lock for a
//! hash-map operation, and land on different shards. Its size is the whole listener's bound.
//!
//! # Sessions and client authentication
//!
//! A session is only as strong as the client authentication it was made under. Every ticket and
//! cache entry carries the digest of that policy (the listener's client-auth mode and trust
//! anchors, [`PolicyDigest`]), besides the client chain rustls keeps in the session; a session
//! made under another policy does not resume (the client gets a full handshake under the
//! current one), and the data plane re-checks the chain of a resumed session against the current
//! CAs and CRLs. Each refusal is counted in `tlsgate_resumption_refused_total` ([`policy`]).

mod cache;
pub mod handover;
pub mod policy;
mod registry;
mod ticketer;

pub use registry::Registry;

use std::sync::Arc;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::server::{NoServerSessionStorage, ProducesTickets};
use rustls::ServerConfig;
use serde::Deserialize;
use tlsgate_keystore::token::Token;
use tlsgate_keystore::uri::{ObjectType, Pkcs11Uri};

pub use cache::{BoundCache, SessionCache};
pub use policy::{PolicyDigest, Refusal, METRIC_RESUMPTION_REFUSED};
pub use ticketer::{
    derivation_input, BoundTicketer, EpochTicketer, METRIC_TICKETS, METRIC_TICKET_KEYS,
    METRIC_TICKET_KEYS_HELD,
};

/// Default `ticket_rotation_secs`: a new ticket key every hour.
pub const DEFAULT_TICKET_ROTATION_SECS: u64 = 3600;
/// Default `lifetime_secs`: a session resumes for two hours after the handshake that made it.
pub const DEFAULT_LIFETIME_SECS: u64 = 7200;
/// Default `cache_size`: session-cache entries per listener (TLS 1.2 session ids, and TLS 1.3
/// tickets when stateless tickets are off).
pub const DEFAULT_CACHE_SIZE: usize = 8192;
/// The longest ticket lifetime TLS 1.3 allows (RFC 8446, 4.6.1).
pub const MAX_LIFETIME_SECS: u64 = 604_800;
/// At most this many epochs within one lifetime, so the keys held stay few.
pub const MAX_EPOCHS_PER_LIFETIME: u64 = 64;
/// A ticket whose issue time is this far ahead of our clock is still taken (fleet clock skew).
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// The largest `cache_size` accepted.
pub const MAX_CACHE_SIZE: usize = 1 << 22;

/// TLS 1.3 tickets sent after each full handshake (rustls's default: one spare for a client
/// that opens two connections at once).
pub const TLS13_TICKETS_PER_HANDSHAKE: usize = 2;

/// `[listener.session]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Stateless session tickets (TLS 1.2 and 1.3).
    #[serde(default = "yes")]
    pub tickets: bool,
    /// Seconds between ticket-key rotations.
    #[serde(default = "default_rotation")]
    pub ticket_rotation_secs: u64,
    /// Seconds a session may be resumed after the handshake that made it (tickets and cache).
    #[serde(default = "default_lifetime")]
    pub lifetime_secs: u64,
    /// Session-cache entries for the listener; 0 turns the cache off.
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
    /// `pkcs11:` URI of a secret key on the token from which ticket keys are derived.
    pub fleet_secret: Option<String>,
    /// Label mixed into the fleet derivation; the listener name when absent.
    pub fleet_label: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_rotation() -> u64 {
    DEFAULT_TICKET_ROTATION_SECS
}
fn default_lifetime() -> u64 {
    DEFAULT_LIFETIME_SECS
}
fn default_cache_size() -> usize {
    DEFAULT_CACHE_SIZE
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            tickets: true,
            ticket_rotation_secs: DEFAULT_TICKET_ROTATION_SECS,
            lifetime_secs: DEFAULT_LIFETIME_SECS,
            cache_size: DEFAULT_CACHE_SIZE,
            fleet_secret: None,
            fleet_label: None,
        }
    }
}

impl SessionConfig {
    /// Checks the values; the error is `(key under [listener.session], what is wrong)`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.ticket_rotation_secs == 0 || self.ticket_rotation_secs > MAX_LIFETIME_SECS {
            return Err((
                "ticket_rotation_secs",
                format!("must be 1 to {MAX_LIFETIME_SECS} seconds"),
            ));
        }
        if self.lifetime_secs == 0 || self.lifetime_secs > MAX_LIFETIME_SECS {
            return Err((
                "lifetime_secs",
                format!("must be 1 to {MAX_LIFETIME_SECS} seconds (7 days, the TLS 1.3 limit)"),
            ));
        }
        if self.lifetime_secs / self.ticket_rotation_secs > MAX_EPOCHS_PER_LIFETIME {
            return Err((
                "ticket_rotation_secs",
                format!(
                    "a lifetime of {} s would span more than {MAX_EPOCHS_PER_LIFETIME} rotations; \
                     rotate less often than every {} s",
                    self.lifetime_secs,
                    self.lifetime_secs / MAX_EPOCHS_PER_LIFETIME
                ),
            ));
        }
        if self.cache_size > MAX_CACHE_SIZE {
            return Err(("cache_size", format!("at most {MAX_CACHE_SIZE} entries")));
        }
        if let Some(label) = &self.fleet_label {
            if label.is_empty() || label.len() > 255 {
                return Err(("fleet_label", "must be 1 to 255 bytes".into()));
            }
            if self.fleet_secret.is_none() {
                return Err((
                    "fleet_label",
                    "has no effect without fleet_secret: add fleet_secret or remove fleet_label"
                        .into(),
                ));
            }
        }
        if let Some(secret) = &self.fleet_secret {
            if !self.tickets {
                return Err((
                    "fleet_secret",
                    "fleet tickets need `tickets = true` (or remove fleet_secret)".into(),
                ));
            }
            self.fleet_uri_of(secret).map_err(|e| ("fleet_secret", e))?;
        }
        Ok(())
    }

    fn fleet_uri_of(&self, secret: &str) -> Result<Pkcs11Uri, String> {
        let uri: Pkcs11Uri = secret
            .parse()
            .map_err(|e| format!("{e}; e.g. pkcs11:token=lab;object=tickets;type=secret-key"))?;
        if !uri.has_object_selector() {
            return Err("name the secret with object= or id=".into());
        }
        match uri.object_type {
            None | Some(ObjectType::SecretKey) => Ok(uri),
            Some(t) => Err(format!(
                "type={t}: the fleet secret is a secret key (type=secret-key), made with \
                 `tlsgate token generate --type ticket-secret`"
            )),
        }
    }

    /// The fleet secret's URI, when one is configured and valid.
    pub fn fleet_uri(&self) -> Option<Result<Pkcs11Uri, String>> {
        self.fleet_secret.as_deref().map(|s| self.fleet_uri_of(s))
    }
}

/// Why a listener's session state could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// `fleet_secret` is set but no token is open.
    #[error("listener {listener:?}: session.fleet_secret needs a [pkcs11] token")]
    NoToken {
        /// The listener.
        listener: String,
    },
    /// A bad setting (normally caught when the file is loaded).
    #[error("listener {listener:?}: session.{key}: {why}")]
    Invalid {
        /// The listener.
        listener: String,
        /// The key under `[listener.session]`.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The first ticket keys could not be made (for a fleet: the token refused the derivation).
    #[error("listener {listener:?}: cannot make ticket keys: {reason}")]
    Keys {
        /// The listener.
        listener: String,
        /// The cause, with the PKCS#11 function and CKR for a token failure.
        reason: String,
    },
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Stateless tickets off.
#[derive(Debug)]
struct NoTickets;

impl ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// A listener's resumption state: kept across reloads while its settings do not change, so
/// tickets and cached sessions issued before a reload still resume after it.
#[derive(Debug)]
pub struct ListenerSessions {
    listener: String,
    config: SessionConfig,
    /// Stateless tickets, when on.
    pub ticketer: Option<Arc<EpochTicketer>>,
    /// The session cache, when on.
    pub cache: Option<Arc<SessionCache>>,
}

impl ListenerSessions {
    /// Builds the state for `listener`; a fleet ticketer derives its first keys now, so a
    /// missing or unusable secret fails here and not in a handshake.
    pub fn new(
        listener: &str,
        config: &SessionConfig,
        token: Option<&Arc<Token>>,
    ) -> Result<Self, SessionError> {
        Self::build(listener, config, token, None)
    }

    /// [`Self::new`], the ticketer starting from `inherited` keys (a binary upgrade's).
    fn build(
        listener: &str,
        config: &SessionConfig,
        token: Option<&Arc<Token>>,
        inherited: Option<handover::TicketKeys>,
    ) -> Result<Self, SessionError> {
        config.check().map_err(|(key, why)| SessionError::Invalid {
            listener: listener.to_owned(),
            key,
            why,
        })?;
        let ticketer = if config.tickets {
            let t = match config.fleet_uri() {
                None => EpochTicketer::local(
                    listener,
                    config.ticket_rotation_secs,
                    config.lifetime_secs,
                ),
                Some(uri) => {
                    let uri = uri.map_err(|why| SessionError::Invalid {
                        listener: listener.to_owned(),
                        key: "fleet_secret",
                        why,
                    })?;
                    let token = token.ok_or_else(|| SessionError::NoToken {
                        listener: listener.to_owned(),
                    })?;
                    EpochTicketer::fleet(
                        listener,
                        config.ticket_rotation_secs,
                        config.lifetime_secs,
                        token.clone(),
                        uri,
                        config.fleet_label.as_deref().unwrap_or(listener),
                    )
                }
            };
            // Keys of the process this one replaced (binary upgrade), before any is made.
            if let Some(k) = inherited {
                handover::adopt(listener, k, &t);
            }
            t.maintain_at(now_secs())
                .map_err(|reason| SessionError::Keys {
                    listener: listener.to_owned(),
                    reason,
                })?;
            let t = Arc::new(t);
            t.spawn_maintenance();
            Some(t)
        } else {
            None
        };
        let cache = (config.cache_size > 0).then(|| {
            Arc::new(SessionCache::new(
                config.cache_size,
                Duration::from_secs(config.lifetime_secs),
            ))
        });
        Ok(Self {
            listener: listener.to_owned(),
            config: config.clone(),
            ticketer,
            cache,
        })
    }

    /// Erases this listener's ticket keys and cached sessions now, so nothing issued so far
    /// resumes (see [`EpochTicketer::rotate_now`]; refused for fleet tickets).
    pub fn rotate_ticket_keys(&self, listener: &str) -> Result<(), SessionError> {
        if let Some(t) = &self.ticketer {
            t.rotate_now().map_err(|reason| SessionError::Keys {
                listener: listener.to_owned(),
                reason,
            })?;
        }
        if let Some(c) = &self.cache {
            c.clear();
        }
        Ok(())
    }

    fn same_token(&self, token: Option<&Arc<Token>>) -> bool {
        match self
            .ticketer
            .as_deref()
            .and_then(EpochTicketer::fleet_token)
        {
            Some(mine) => token.is_some_and(|t| Arc::ptr_eq(t, mine)),
            None => true,
        }
    }

    /// Puts this state into a server configuration whose client authentication is `policy`:
    /// its sessions carry that policy, and only sessions made under it resume. With tickets and
    /// the cache both off, no NewSessionTicket is sent at all; with only the cache, TLS 1.3
    /// tickets are cache ids.
    pub fn apply(&self, config: &mut ServerConfig, policy: PolicyDigest) {
        config.ticketer = match &self.ticketer {
            Some(t) => Arc::new(BoundTicketer::new(t.clone(), policy)),
            None => Arc::new(NoTickets),
        };
        config.session_storage = match &self.cache {
            Some(c) => Arc::new(BoundCache::new(c.clone(), policy, &self.listener)),
            None => Arc::new(NoServerSessionStorage {}),
        };
        config.send_tls13_tickets = if self.ticketer.is_none() && self.cache.is_none() {
            0
        } else {
            TLS13_TICKETS_PER_HANDSHAKE
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let ok = SessionConfig::default();
        assert!(ok.check().is_ok());
        let bad = |f: fn(&mut SessionConfig)| {
            let mut c = SessionConfig::default();
            f(&mut c);
            c.check().expect_err("bad").0
        };
        assert_eq!(bad(|c| c.lifetime_secs = 0), "lifetime_secs");
        assert_eq!(
            bad(|c| c.lifetime_secs = MAX_LIFETIME_SECS + 1),
            "lifetime_secs"
        );
        assert_eq!(bad(|c| c.ticket_rotation_secs = 0), "ticket_rotation_secs");
        assert_eq!(bad(|c| c.ticket_rotation_secs = 1), "ticket_rotation_secs");
        assert_eq!(bad(|c| c.fleet_label = Some("web".into())), "fleet_label");
        assert_eq!(
            bad(|c| c.fleet_secret = Some("pkcs11:token=a;object=k;type=private".into())),
            "fleet_secret"
        );
        assert_eq!(
            bad(|c| {
                c.tickets = false;
                c.fleet_secret = Some("pkcs11:token=a;object=k".into());
            }),
            "fleet_secret"
        );
        let fleet = SessionConfig {
            fleet_secret: Some("pkcs11:token=a;object=k;type=secret-key".into()),
            ..SessionConfig::default()
        };
        assert!(fleet.check().is_ok());
    }

    #[test]
    fn off_means_off() {
        let mut cfg = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        let off = SessionConfig {
            tickets: false,
            cache_size: 0,
            ..SessionConfig::default()
        };
        ListenerSessions::new("off", &off, None)
            .expect("state")
            .apply(&mut cfg, PolicyDigest::no_client_auth());
        assert!(!cfg.ticketer.enabled());
        assert!(!cfg.session_storage.can_cache());
        assert_eq!(cfg.send_tls13_tickets, 0);
        ListenerSessions::new("on", &SessionConfig::default(), None)
            .expect("state")
            .apply(&mut cfg, PolicyDigest::no_client_auth());
        assert!(cfg.ticketer.enabled());
        assert!(cfg.session_storage.can_cache());
        assert_eq!(cfg.ticketer.lifetime(), 7200);
    }
}
