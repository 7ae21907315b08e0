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
//! attacker impersonate a client's resumption but not read recorded TLS 1.3 traffic. So the
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
//! Caveat: a TLS 1.2 client resuming with a ticket gets a fresh ticket for the same master
//! secret, so `L` bounds each ticket, not the chain of resumptions (TLS 1.3 derives a new secret
//! on every resumption). Turn tickets and the cache off for listeners where that matters.
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

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rustls::server::{NoServerSessionStorage, ProducesTickets, StoresServerSessions};
use rustls::ServerConfig;
use serde::Deserialize;
use tlsgate_keystore::token::Token;
use tlsgate_keystore::uri::{ObjectType, Pkcs11Uri};
use zeroize::Zeroizing;

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

const SHARDS: usize = 16;
const TICKET_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8 + 8;
const TAG_LEN: usize = 16;
const DERIVATION_LABEL: &[u8] = b"tlsgate ticket key v1";

/// Counter: ticket keys made, by listener, `source` (`fleet`: derived through the token;
/// `local`: random) and `result` (`ok`, `failed`).
pub const METRIC_TICKET_KEYS: &str = "tlsgate_ticket_keys_total";
/// Counter: session tickets by listener and `result`: `issued`, `accepted`, `expired` (older
/// than the lifetime), `rejected` (unknown key, damaged, or another listener's).
pub const METRIC_TICKETS: &str = "tlsgate_session_tickets_total";
/// Gauge: ticket keys held in memory, by listener.
pub const METRIC_TICKET_KEYS_HELD: &str = "tlsgate_ticket_keys_held";

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves its data consistent at each step.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where epoch keys come from.
enum KeySource {
    /// Random per process: tickets resume only on this appliance.
    Local,
    /// Derived through the token from a secret key there: the same on every appliance.
    Fleet {
        token: Arc<Token>,
        secret: Box<Pkcs11Uri>,
        label: String,
    },
}

impl KeySource {
    fn name(&self) -> &'static str {
        match self {
            KeySource::Local => "local",
            KeySource::Fleet { .. } => "fleet",
        }
    }
}

/// The derivation input for one epoch (public; the secret stays on the token).
pub fn derivation_input(label: &str, rotation_secs: u64, epoch: u64) -> Vec<u8> {
    let mut msg = Vec::with_capacity(DERIVATION_LABEL.len() + 3 + label.len() + 16);
    msg.extend_from_slice(DERIVATION_LABEL);
    msg.push(0);
    // Labels are at most 255 bytes (checked at load); longer ones are cut, never wrapped.
    let len = u16::try_from(label.len()).unwrap_or(u16::MAX);
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(&label.as_bytes()[..usize::from(len).min(label.len())]);
    msg.extend_from_slice(&rotation_secs.to_be_bytes());
    msg.extend_from_slice(&epoch.to_be_bytes());
    msg
}

/// One epoch's key. The raw bytes are never kept: aws-lc holds the AES key schedule and wipes
/// it (`OPENSSL_free` cleanses) when the key is dropped.
struct EpochKey {
    epoch: u64,
    key: LessSafeKey,
}

#[derive(Default)]
struct Counters {
    issued: AtomicU64,
    accepted: AtomicU64,
    expired: AtomicU64,
    rejected: AtomicU64,
}

/// Stateless tickets under a key per epoch of `rotation` seconds; accepts tickets of any held
/// epoch that are younger than `lifetime`. Shared by every core of a listener and by the
/// data plane's tripwire configuration, which clones the same `Arc`.
pub struct EpochTicketer {
    listener: String,
    rotation: u64,
    lifetime: u64,
    source: KeySource,
    keys: RwLock<Vec<EpochKey>>,
    rng: SystemRandom,
    counters: Counters,
    flushed: Mutex<[u64; 4]>,
}

impl fmt::Debug for EpochTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochTicketer")
            .field("listener", &self.listener)
            .field("source", &self.source.name())
            .field("rotation", &self.rotation)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl EpochTicketer {
    fn new(listener: &str, rotation: u64, lifetime: u64, source: KeySource) -> Self {
        Self {
            listener: listener.to_owned(),
            rotation: rotation.max(1),
            lifetime,
            source,
            keys: RwLock::new(Vec::new()),
            rng: SystemRandom::new(),
            counters: Counters::default(),
            flushed: Mutex::new([0; 4]),
        }
    }

    /// Tickets from this process only; keys are random.
    pub fn local(listener: &str, rotation_secs: u64, lifetime_secs: u64) -> Self {
        Self::new(listener, rotation_secs, lifetime_secs, KeySource::Local)
    }

    /// Tickets shared by every appliance that reaches `secret` on its token.
    pub fn fleet(
        listener: &str,
        rotation_secs: u64,
        lifetime_secs: u64,
        token: Arc<Token>,
        secret: Pkcs11Uri,
        label: &str,
    ) -> Self {
        Self::new(
            listener,
            rotation_secs,
            lifetime_secs,
            KeySource::Fleet {
                token,
                secret: Box::new(secret),
                label: label.to_owned(),
            },
        )
    }

    fn epoch_of(&self, t: u64) -> u64 {
        t / self.rotation
    }

    /// The epochs whose keys must be held at `now`: every one a ticket younger than the lifetime
    /// may come from (fleet peers issued them even if we did not), the current, and the next.
    fn wanted(&self, now: u64) -> std::ops::RangeInclusive<u64> {
        let oldest = self.epoch_of(now.saturating_sub(self.lifetime));
        oldest..=self.epoch_of(now).saturating_add(1)
    }

    fn make_key(&self, epoch: u64) -> Result<LessSafeKey, String> {
        let bytes: Zeroizing<[u8; 32]> = match &self.source {
            KeySource::Local => {
                let mut b = Zeroizing::new([0u8; 32]);
                self.rng
                    .fill(&mut b[..])
                    .map_err(|_| "the system random generator failed".to_owned())?;
                b
            }
            KeySource::Fleet {
                token,
                secret,
                label,
            } => token
                .hmac_sha256(secret, &derivation_input(label, self.rotation, epoch))
                .map_err(|e| format!("deriving from {secret}: {e}"))?,
        };
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes[..])
            .map_err(|_| "AES-256-GCM refused the key".to_owned())?;
        Ok(LessSafeKey::new(unbound))
    }

    /// Makes the keys the clock asks for and erases the expired ones. Runs at start and on the
    /// maintenance thread, never on a handshake. Returns how many keys could not be made.
    pub fn maintain_at(&self, now: u64) -> Result<(), String> {
        let wanted = self.wanted(now);
        let current = self.epoch_of(now);
        let held: Vec<u64> = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|k| k.epoch)
            .collect();
        let mut made = Vec::new();
        let mut first_err = None;
        for epoch in wanted.clone() {
            // Random keys for past epochs would decrypt nothing.
            if matches!(self.source, KeySource::Local) && epoch < current {
                continue;
            }
            if held.contains(&epoch) {
                continue;
            }
            match self.make_key(epoch) {
                Ok(key) => {
                    metrics::counter!(METRIC_TICKET_KEYS, "listener" => self.listener.clone(), "source" => self.source.name(), "result" => "ok").increment(1);
                    made.push(EpochKey { epoch, key });
                }
                Err(reason) => {
                    metrics::counter!(METRIC_TICKET_KEYS, "listener" => self.listener.clone(), "source" => self.source.name(), "result" => "failed").increment(1);
                    tracing::warn!(listener = %self.listener, epoch, %reason, "cannot make a ticket key");
                    first_err.get_or_insert(reason);
                }
            }
        }
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.retain(|k| wanted.contains(&k.epoch));
        for k in made {
            if !keys.iter().any(|h| h.epoch == k.epoch) {
                keys.push(k);
            }
        }
        metrics::gauge!(METRIC_TICKET_KEYS_HELD, "listener" => self.listener.clone())
            .set(keys.len() as f64);
        drop(keys);
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// The epochs whose keys are held now (for tests and logs).
    pub fn held_epochs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|k| k.epoch)
            .collect();
        v.sort_unstable();
        v
    }

    /// Encrypts a ticket at time `now` under the current epoch's key.
    pub fn encrypt_at(&self, now: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let epoch = self.epoch_of(now);
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.push(TICKET_VERSION);
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&now.to_be_bytes());
        let aad: [u8; HEADER_LEN] = out[..HEADER_LEN].try_into().ok()?;
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        let sealed = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            match keys.iter().find(|k| k.epoch == epoch) {
                Some(k) => k
                    .key
                    .seal_in_place_append_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        &mut body,
                    )
                    .is_ok(),
                None => false,
            }
        };
        if !sealed {
            // The maintenance thread makes the next key ahead of time, so this means the token
            // has failed for a whole rotation (fleet) or the clock jumped: no ticket, the
            // client simply does a full handshake next time.
            if matches!(self.source, KeySource::Local) && self.maintain_at(now).is_ok() {
                return self.encrypt_at_once(now, plain);
            }
            tracing::debug!(listener = %self.listener, epoch, "no ticket key for the current epoch");
            return None;
        }
        out.extend_from_slice(&body);
        self.counters.issued.fetch_add(1, Ordering::Relaxed);
        Some(out)
    }

    fn encrypt_at_once(&self, now: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let held = self.held_epochs().contains(&self.epoch_of(now));
        if held {
            self.encrypt_at(now, plain)
        } else {
            None
        }
    }

    /// Decrypts a ticket at time `now`: its epoch's key must be held and it must be younger
    /// than the lifetime.
    pub fn decrypt_at(&self, now: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        let reject = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
            None
        };
        if ticket.len() < HEADER_LEN + NONCE_LEN + TAG_LEN || ticket[0] != TICKET_VERSION {
            return reject(&self.counters.rejected);
        }
        let (header, rest) = ticket.split_at(HEADER_LEN);
        let epoch = u64::from_be_bytes(header[1..9].try_into().ok()?);
        let issued = u64::from_be_bytes(header[9..17].try_into().ok()?);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        // Checked before decryption and again after (the header is authenticated): an
        // over-age ticket is refused even while its key is still held.
        if issued > now.saturating_add(MAX_CLOCK_SKEW_SECS) || self.epoch_of(issued) != epoch {
            return reject(&self.counters.rejected);
        }
        if now.saturating_sub(issued) > self.lifetime {
            return reject(&self.counters.expired);
        }
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let aad: [u8; HEADER_LEN] = header.try_into().ok()?;
        let mut body = sealed.to_vec();
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let Some(k) = keys.iter().find(|k| k.epoch == epoch) else {
            drop(keys);
            return reject(&self.counters.rejected);
        };
        let opened = k
            .key
            .open_in_place(nonce, Aad::from(aad), &mut body)
            .ok()
            .map(|p| p.len());
        drop(keys);
        match opened {
            Some(len) => {
                body.truncate(len);
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                Some(body)
            }
            None => reject(&self.counters.rejected),
        }
    }

    /// Publishes the ticket counters to the metrics facade (from the maintenance thread, so
    /// handshakes pay one relaxed atomic add).
    fn flush_counters(&self) {
        let now = [
            self.counters.issued.load(Ordering::Relaxed),
            self.counters.accepted.load(Ordering::Relaxed),
            self.counters.expired.load(Ordering::Relaxed),
            self.counters.rejected.load(Ordering::Relaxed),
        ];
        let mut last = lock(&self.flushed);
        for (i, result) in ["issued", "accepted", "expired", "rejected"]
            .into_iter()
            .enumerate()
        {
            let delta = now[i].saturating_sub(last[i]);
            if delta > 0 {
                metrics::counter!(METRIC_TICKETS, "listener" => self.listener.clone(), "result" => result)
                    .increment(delta);
            }
        }
        *last = now;
    }

    /// How often the maintenance thread looks at the clock.
    fn tick(&self) -> Duration {
        Duration::from_millis((self.rotation * 1000 / 4).clamp(250, 1000))
    }

    /// Starts the thread that makes keys ahead of time, erases expired ones and publishes the
    /// counters. It ends once the ticketer is dropped (a reload that changed the settings).
    fn spawn_maintenance(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let tick = self.tick();
        let name = format!("tickets-{}", self.listener);
        let spawned = std::thread::Builder::new().name(name).spawn(move || loop {
            std::thread::sleep(tick);
            let Some(t) = weak.upgrade() else { return };
            // Failures are logged and counted inside; the held keys keep working.
            let _ = t.maintain_at(now_secs());
            t.flush_counters();
        });
        if let Err(e) = spawned {
            tracing::error!(listener = %self.listener, error = %e, "cannot start the ticket-key thread; keys rotate on use only");
        }
    }
}

impl ProducesTickets for EpochTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.lifetime).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(now_secs(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(now_secs(), cipher)
    }
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

struct Entry {
    value: Zeroizing<Vec<u8>>,
    born: Instant,
    seq: u64,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Vec<u8>, Entry>,
    order: VecDeque<(u64, Vec<u8>)>,
    seq: u64,
}

/// A bounded session store whose entries expire after the lifetime; values are wiped when
/// evicted, expired or taken.
pub struct SessionCache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    lifetime: Duration,
    hasher: RandomState,
}

impl fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCache")
            .field("shards", &self.shards.len())
            .field("per_shard", &self.per_shard)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl SessionCache {
    /// A cache of at most `size` entries (> 0) that live at most `lifetime`.
    pub fn new(size: usize, lifetime: Duration) -> Self {
        let size = size.max(1);
        let shards = SHARDS.min(size);
        Self {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: size.div_ceil(shards),
            lifetime,
            hasher: RandomState::new(),
        }
    }

    /// Entries held now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &[u8]) -> MutexGuard<'_, Shard> {
        // The hasher is keyed per process, so a client cannot aim its ids at one shard.
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        lock(&self.shards[i])
    }

    fn put_at(&self, key: Vec<u8>, value: Vec<u8>, now: Instant) -> bool {
        let mut s = self.shard(&key);
        s.seq += 1;
        let seq = s.seq;
        s.order.push_back((seq, key.clone()));
        s.map.insert(
            key,
            Entry {
                value: Zeroizing::new(value),
                born: now,
                seq,
            },
        );
        // Oldest first: sweep what has expired, then what is over the bound.
        while let Some((seq, k)) = s.order.front().cloned() {
            let (live, expired) = match s.map.get(&k) {
                Some(e) => (e.seq == seq, now.duration_since(e.born) > self.lifetime),
                None => (false, false),
            };
            if !live {
                s.order.pop_front();
            } else if expired || s.map.len() > self.per_shard {
                s.order.pop_front();
                s.map.remove(&k);
            } else {
                break;
            }
        }
        if s.order.len() > 2 * self.per_shard + 16 {
            let Shard { map, order, .. } = &mut *s;
            order.retain(|(seq, k)| map.get(k).is_some_and(|e| e.seq == *seq));
        }
        true
    }

    fn get_at(&self, key: &[u8], now: Instant, take: bool) -> Option<Vec<u8>> {
        let mut s = self.shard(key);
        let expired = now.duration_since(s.map.get(key)?.born) > self.lifetime;
        if expired || take {
            let e = s.map.remove(key)?;
            return (!expired).then(|| e.value.to_vec());
        }
        s.map.get(key).map(|e| e.value.to_vec())
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.put_at(key, value, Instant::now())
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.get_at(key, Instant::now(), false)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.get_at(key, Instant::now(), true)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// A listener's resumption state: kept across reloads while its settings do not change, so
/// tickets and cached sessions issued before a reload still resume after it.
#[derive(Debug)]
pub struct ListenerSessions {
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
            config: config.clone(),
            ticketer,
            cache,
        })
    }

    /// The state for `listener` with these settings: the one already made in this process when
    /// the settings (and token) are the same, else a new one.
    pub fn for_listener(
        listener: &str,
        config: &SessionConfig,
        token: Option<&Arc<Token>>,
    ) -> Result<Arc<Self>, SessionError> {
        type Registry = Mutex<HashMap<String, Arc<ListenerSessions>>>;
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        let registry = REGISTRY.get_or_init(Default::default);
        if let Some(s) = lock(registry).get(listener) {
            if s.config == *config && s.same_token(token) {
                return Ok(s.clone());
            }
        }
        // Built outside the lock: a fleet ticketer talks to the token.
        let made = Arc::new(Self::new(listener, config, token)?);
        lock(registry).insert(listener.to_owned(), made.clone());
        Ok(made)
    }

    fn same_token(&self, token: Option<&Arc<Token>>) -> bool {
        match self.ticketer.as_deref().map(|t| &t.source) {
            Some(KeySource::Fleet { token: mine, .. }) => {
                token.is_some_and(|t| Arc::ptr_eq(t, mine))
            }
            _ => true,
        }
    }

    /// Puts this state into a server configuration. With tickets and the cache both off, no
    /// NewSessionTicket is sent at all; with only the cache, TLS 1.3 tickets are cache ids.
    pub fn apply(&self, config: &mut ServerConfig) {
        config.ticketer = match &self.ticketer {
            Some(t) => t.clone(),
            None => Arc::new(NoTickets),
        };
        config.session_storage = match &self.cache {
            Some(c) => c.clone(),
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

    const T0: u64 = 1_800_000_000;

    fn ready(rotation: u64, lifetime: u64, now: u64) -> EpochTicketer {
        let t = EpochTicketer::local("t", rotation, lifetime);
        t.maintain_at(now).expect("keys");
        t
    }

    #[test]
    fn a_ticket_round_trips_and_is_bound_to_its_ticketer() {
        let t = ready(3600, 7200, T0);
        let ticket = t.encrypt_at(T0, b"session state").expect("ticket");
        assert!(!ticket.windows(13).any(|w| w == b"session state"));
        assert_eq!(
            t.decrypt_at(T0 + 10, &ticket).as_deref(),
            Some(&b"session state"[..])
        );
        let other = ready(3600, 7200, T0);
        assert_eq!(other.decrypt_at(T0, &ticket), None);
    }

    #[test]
    fn a_ticket_older_than_its_lifetime_is_refused_even_with_its_key_held() {
        // Lifetime shorter than the rotation: the key is still held, the age check refuses.
        let t = ready(3600, 60, T0);
        let ticket = t.encrypt_at(T0, b"x").expect("ticket");
        assert!(t.decrypt_at(T0 + 60, &ticket).is_some());
        assert_eq!(t.decrypt_at(T0 + 61, &ticket), None);
        assert_eq!(t.counters.expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn rotation_keeps_the_previous_epoch_within_the_lifetime_and_erases_it_after() {
        let start = T0 - T0 % 100;
        let t = ready(100, 150, start);
        assert_eq!(t.held_epochs(), vec![start / 100, start / 100 + 1]);
        let old = t.encrypt_at(start + 99, b"old").expect("ticket");
        // Next epoch: a new key issues, the previous one still decrypts.
        t.maintain_at(start + 120).expect("keys");
        let new = t.encrypt_at(start + 120, b"new").expect("ticket");
        assert_ne!(old[1..9], new[1..9], "epoch in the header");
        assert_eq!(
            t.decrypt_at(start + 200, &old).as_deref(),
            Some(&b"old"[..])
        );
        // Past the lifetime of everything issued in the first epoch: its key is gone.
        t.maintain_at(start + 250).expect("keys");
        assert!(!t.held_epochs().contains(&(start / 100)));
        assert!(t.decrypt_at(start + 250, &new).is_some());
    }

    #[test]
    fn damaged_or_forged_tickets_are_refused() {
        let t = ready(3600, 7200, T0);
        let ticket = t.encrypt_at(T0, b"state").expect("ticket");
        for i in [0, 3, 12, 20, ticket.len() - 1] {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(t.decrypt_at(T0, &bad), None, "byte {i} flipped");
        }
        assert_eq!(t.decrypt_at(T0, &[]), None);
        assert_eq!(t.decrypt_at(T0, &ticket[..20]), None);
        // A ticket claiming to be issued in the future is refused.
        let later = t
            .encrypt_at(T0 + 3600, b"x")
            .expect("next epoch's key is held");
        assert_eq!(t.decrypt_at(T0 - 3600, &later), None);
        assert!(t.decrypt_at(T0 + 3600, &later).is_some());
    }

    #[test]
    fn the_derivation_input_separates_labels_rotations_and_epochs() {
        let a = derivation_input("web", 3600, 7);
        assert_ne!(a, derivation_input("api", 3600, 7));
        assert_ne!(a, derivation_input("web", 60, 7));
        assert_ne!(a, derivation_input("web", 3600, 8));
        assert!(a.starts_with(b"tlsgate ticket key v1\0\0\x03web"));
    }

    #[test]
    fn the_cache_is_bounded_and_expires() {
        let c = SessionCache::new(32, Duration::from_secs(10));
        let t = Instant::now();
        for i in 0..1000u32 {
            c.put_at(i.to_be_bytes().to_vec(), vec![1; 8], t);
        }
        assert!(c.len() <= 32, "{} entries", c.len());
        let k = b"fresh".to_vec();
        c.put_at(k.clone(), b"v".to_vec(), t);
        assert_eq!(
            c.get_at(&k, t + Duration::from_secs(10), false),
            Some(b"v".to_vec())
        );
        assert_eq!(c.get_at(&k, t + Duration::from_secs(11), false), None);
        assert_eq!(c.get_at(&k, t, false), None, "expired entries are removed");
        c.put_at(k.clone(), b"v".to_vec(), t);
        assert_eq!(c.get_at(&k, t, true), Some(b"v".to_vec()));
        assert_eq!(c.get_at(&k, t, true), None, "take is single use");
    }

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
            .apply(&mut cfg);
        assert!(!cfg.ticketer.enabled());
        assert!(!cfg.session_storage.can_cache());
        assert_eq!(cfg.send_tls13_tickets, 0);
        ListenerSessions::new("on", &SessionConfig::default(), None)
            .expect("state")
            .apply(&mut cfg);
        assert!(cfg.ticketer.enabled());
        assert!(cfg.session_storage.can_cache());
        assert_eq!(cfg.ticketer.lifetime(), 7200);
    }
}
