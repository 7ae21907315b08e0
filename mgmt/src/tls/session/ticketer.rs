//! Stateless session tickets under a key per epoch: local random keys, or keys derived through
//! the token from a fleet secret. The parent module explains the reasoning. A ticket is
//! `version ‖ epoch ‖ issued-at ‖ nonce ‖ AES-256-GCM(policy digest ‖ state)`, the first three
//! authenticated as associated data; the digest is the client-auth policy the session was made
//! under ([`super::policy`]), and a ticket made under another one is refused.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;
use tlsgate_keystore::token::Token;
use tlsgate_keystore::uri::Pkcs11Uri;
use zeroize::Zeroizing;

use super::policy::{refused, PolicyDigest, Refusal};
use super::{now_secs, MAX_CLOCK_SKEW_SECS};

/// 2: the sealed state starts with the policy digest (version 1 tickets, which carry none, are
/// refused).
const TICKET_VERSION: u8 = 2;
const WARNING_INTERVAL: Duration = Duration::from_secs(60);
const HEADER_LEN: usize = 1 + 8 + 8;
const TAG_LEN: usize = 16;
const DERIVATION_LABEL: &[u8] = b"tlsgate ticket key v1";

/// Counter: ticket keys made, by listener, `source` (`fleet`: derived through the token;
/// `local`: random) and `result` (`ok`, `failed`).
pub const METRIC_TICKET_KEYS: &str = "tlsgate_ticket_keys_total";
/// Counter: session tickets by listener and `result`: `issued`, `accepted`, `expired` (older
/// than the lifetime), `rejected` (unknown key, damaged, another listener's, or made under
/// another client-auth policy).
pub const METRIC_TICKETS: &str = "tlsgate_session_tickets_total";
/// Gauge: ticket keys held in memory, by listener.
pub const METRIC_TICKET_KEYS_HELD: &str = "tlsgate_ticket_keys_held";

thread_local! {
    /// The issue time of the TLS 1.2 ticket this thread decrypted last, and when. rustls
    /// resumes a TLS 1.2 session and re-issues its ticket in one call on one thread (decrypt,
    /// then encrypt), so the new ticket inherits the first one's issue time. A value left by a
    /// resumption that fell back to a full handshake can only shorten another ticket's life,
    /// and only within `ORIGIN_WINDOW`.
    static TLS12_ORIGIN: Cell<Option<(u64, Instant)>> = const { Cell::new(None) };
}

/// How long a decrypted TLS 1.2 ticket's issue time waits for its re-issue (microseconds in
/// practice: no signature or key exchange happens in between).
const ORIGIN_WINDOW: Duration = Duration::from_millis(500);

/// Whether a session state rustls hands us is a TLS 1.2 one. rustls encodes a server session
/// as `has_sni: u8`, `[sni: u8 length + bytes]`, `version: u16`, ...; anything else reads as
/// "not TLS 1.2", which only means the re-issue keeps a fresh issue time.
fn is_tls12_state(plain: &[u8]) -> bool {
    let at = match plain.first() {
        Some(0) => 1,
        Some(1) => match plain.get(1) {
            Some(len) => 2 + usize::from(*len),
            None => return false,
        },
        _ => return false,
    };
    plain.get(at..at + 2) == Some(&[3, 3][..])
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

/// One epoch's key. aws-lc holds the AES key schedule and wipes it (`OPENSSL_free` cleanses)
/// when the key is dropped. A local (random) key also keeps its 32 bytes, wiped on drop, so a
/// binary upgrade can hand them to the next process (`super::handover`); a fleet key is
/// derived again by that process, so its bytes are never kept.
struct EpochKey {
    epoch: u64,
    key: LessSafeKey,
    raw: Option<RawKey>,
}

/// A ticket key's bytes, wiped on drop; boxed, so moving a key (a Vec of them growing) moves
/// only the pointer and leaves no copy of the bytes behind.
pub(super) type RawKey = Box<Zeroizing<[u8; 32]>>;

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
    /// When a failed derivation was last logged: while the token is down the maintenance
    /// thread retries every tick, and says so at most once a minute (each failure is counted).
    last_warning: Mutex<Option<Instant>>,
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
            last_warning: Mutex::new(None),
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

    /// The token a fleet ticketer derives through.
    pub(super) fn fleet_token(&self) -> Option<&Arc<Token>> {
        match &self.source {
            KeySource::Fleet { token, .. } => Some(token),
            KeySource::Local => None,
        }
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

    fn make_key(&self, epoch: u64) -> Result<(LessSafeKey, Option<RawKey>), String> {
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
        let key = aead_key(&bytes)?;
        let raw = matches!(self.source, KeySource::Local).then(|| Box::new(bytes));
        Ok((key, raw))
    }

    /// The local keys held now with their epochs, for the next process of a binary upgrade
    /// (none for fleet tickets: that process derives them itself).
    /// Returned with the rotation schedule (`rotation`, `lifetime` in seconds) they belong to.
    pub(super) fn export_local_keys(&self) -> (u64, u64, Vec<(u64, RawKey)>) {
        let held = self.keys.read();
        // Sized once: growing would move key bytes and leave unwiped copies behind.
        let mut keys = Vec::with_capacity(held.len());
        for k in held.iter() {
            if let Some(raw) = &k.raw {
                keys.push((k.epoch, raw.clone()));
            }
        }
        (self.rotation, self.lifetime, keys)
    }

    /// Takes keys the previous process held (binary upgrade), so the tickets it issued resume
    /// here; only for a local ticketer with the same rotation and lifetime (the epochs would
    /// mean other times otherwise). Returns how many keys were taken.
    pub(super) fn import_local_keys(
        &self,
        rotation: u64,
        lifetime: u64,
        keys: &[(u64, RawKey)],
    ) -> usize {
        if !matches!(self.source, KeySource::Local)
            || rotation != self.rotation
            || lifetime != self.lifetime
        {
            return 0;
        }
        let mut held = self.keys.write();
        let mut taken = 0;
        for (epoch, raw) in keys {
            let Ok(key) = aead_key(raw) else { continue };
            held.retain(|k| k.epoch != *epoch);
            held.push(EpochKey {
                epoch: *epoch,
                key,
                raw: Some(raw.clone()),
            });
            taken += 1;
        }
        taken
    }

    /// Makes the keys the clock asks for and erases the expired ones. Runs at start and on the
    /// maintenance thread, never on a handshake (local keys also on a handshake that finds
    /// none, which costs only the RNG). Fails with the first key that could not be made.
    pub fn maintain_at(&self, now: u64) -> Result<(), String> {
        let wanted = self.wanted(now);
        let current = self.epoch_of(now);
        let held: Vec<u64> = self.keys.read().iter().map(|k| k.epoch).collect();
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
                Ok((key, raw)) => {
                    metrics::counter!(METRIC_TICKET_KEYS, "listener" => self.listener.clone(), "source" => self.source.name(), "result" => "ok").increment(1);
                    made.push(EpochKey { epoch, key, raw });
                }
                Err(reason) => {
                    metrics::counter!(METRIC_TICKET_KEYS, "listener" => self.listener.clone(), "source" => self.source.name(), "result" => "failed").increment(1);
                    let mut last = self.last_warning.lock();
                    if last.is_none_or(|t| t.elapsed() >= WARNING_INTERVAL) {
                        *last = Some(Instant::now());
                        tracing::warn!(listener = %self.listener, epoch, %reason, "cannot make a ticket key; the keys held keep working, retrying every tick");
                    }
                    first_err.get_or_insert(reason);
                }
            }
        }
        let mut keys = self.keys.write();
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

    /// Erases every key now and makes fresh ones, so no ticket issued so far resumes (the
    /// response to a suspected key compromise). Local keys only: fleet keys are a function of
    /// the token's secret, so rotating them means a new secret (`tlsgate token generate --type
    /// ticket-secret`, then point `fleet_secret` at it on every appliance).
    pub fn rotate_now(&self) -> Result<(), String> {
        if let KeySource::Fleet { secret, .. } = &self.source {
            return Err(format!(
                "fleet ticket keys are derived from {secret}: generate a new ticket secret and \
                 point fleet_secret at it on every appliance"
            ));
        }
        self.keys.write().clear();
        self.maintain_at(now_secs())
    }

    /// The epochs whose keys are held now (for tests and logs).
    pub fn held_epochs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.keys.read().iter().map(|k| k.epoch).collect();
        v.sort_unstable();
        v
    }

    /// Encrypts a ticket at time `now` under the current epoch's key, for a session made under
    /// `policy`.
    pub fn encrypt_at(&self, now: u64, policy: &PolicyDigest, plain: &[u8]) -> Option<Vec<u8>> {
        // A TLS 1.2 ticket re-issued while resuming keeps the issue time of the session's full
        // handshake: its master secret is the same, so its lifetime must not restart.
        let origin = TLS12_ORIGIN
            .take()
            .filter(|(_, at)| at.elapsed() < ORIGIN_WINDOW)
            .map(|(issued, _)| issued);
        let issued = match origin {
            Some(t) if is_tls12_state(plain) => t.min(now),
            _ => now,
        };
        match self.seal(now, issued, policy, plain) {
            Some(t) => Some(t),
            // The maintenance thread makes the next key ahead of time, so this means the token
            // has failed for a whole rotation (fleet) or the clock jumped: no ticket, the
            // client simply does a full handshake next time. Local keys are made on the spot.
            None if matches!(self.source, KeySource::Local) && self.maintain_at(now).is_ok() => {
                self.seal(now, issued, policy, plain)
            }
            None => {
                tracing::debug!(listener = %self.listener, "no ticket key for the current epoch");
                None
            }
        }
    }

    /// Encrypts under the current epoch's key, if held.
    fn seal(&self, now: u64, issued: u64, policy: &PolicyDigest, plain: &[u8]) -> Option<Vec<u8>> {
        let epoch = self.epoch_of(now);
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out =
            Vec::with_capacity(HEADER_LEN + NONCE_LEN + PolicyDigest::LEN + plain.len() + TAG_LEN);
        out.push(TICKET_VERSION);
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&issued.to_be_bytes());
        let aad: [u8; HEADER_LEN] = out[..HEADER_LEN].try_into().ok()?;
        out.extend_from_slice(&nonce);
        let mut body = Vec::with_capacity(PolicyDigest::LEN + plain.len() + TAG_LEN);
        body.extend_from_slice(policy.as_bytes());
        body.extend_from_slice(plain);
        {
            let keys = self.keys.read();
            let k = keys.iter().find(|k| k.epoch == epoch)?;
            k.key
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut body,
                )
                .ok()?;
        }
        out.extend_from_slice(&body);
        self.counters.issued.fetch_add(1, Ordering::Relaxed);
        Some(out)
    }

    /// Decrypts a ticket at time `now`: its epoch's key must be held, it must be younger than
    /// the lifetime, and it must have been made under `policy` (else it is refused, counted and
    /// logged: the client gets a full handshake under the current policy).
    pub fn decrypt_at(&self, now: u64, policy: &PolicyDigest, ticket: &[u8]) -> Option<Vec<u8>> {
        // Only the last decryption on this thread may pass its issue time on.
        TLS12_ORIGIN.set(None);
        let reject = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
            None
        };
        if ticket.len() < HEADER_LEN + NONCE_LEN + PolicyDigest::LEN + TAG_LEN
            || ticket[0] != TICKET_VERSION
        {
            return reject(&self.counters.rejected);
        }
        let (header, rest) = ticket.split_at(HEADER_LEN);
        let epoch = u64::from_be_bytes(header[1..9].try_into().ok()?);
        let issued = u64::from_be_bytes(header[9..17].try_into().ok()?);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        // Checked before decryption; the header is associated data, so a changed issue time
        // or epoch fails the decryption. An over-age ticket is refused even while its key is
        // still held. A key never encrypts a ticket issued after its epoch (re-issued TLS 1.2
        // tickets carry an earlier issue time, under a later key).
        if issued > now.saturating_add(MAX_CLOCK_SKEW_SECS) || self.epoch_of(issued) > epoch {
            return reject(&self.counters.rejected);
        }
        if now.saturating_sub(issued) > self.lifetime {
            return reject(&self.counters.expired);
        }
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let aad: [u8; HEADER_LEN] = header.try_into().ok()?;
        let mut body = sealed.to_vec();
        let keys = self.keys.read();
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
        let Some(len) = opened else {
            return reject(&self.counters.rejected);
        };
        body.truncate(len);
        let body = Zeroizing::new(body);
        let Some((made_under, state)) = PolicyDigest::read(&body) else {
            return reject(&self.counters.rejected);
        };
        if made_under != *policy {
            refused(&self.listener, Refusal::PolicyChanged);
            return reject(&self.counters.rejected);
        }
        TLS12_ORIGIN.set(is_tls12_state(state).then(|| (issued, Instant::now())));
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        Some(state.to_vec())
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
        let mut last = self.flushed.lock();
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
    pub(super) fn spawn_maintenance(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let tick = self.tick();
        let name = format!("tickets-{}", self.listener);
        let spawned = std::thread::Builder::new().name(name).spawn(move || loop {
            crate::sandbox::enter_thread("tickets");
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

fn aead_key(bytes: &[u8; 32]) -> Result<LessSafeKey, String> {
    let unbound = UnboundKey::new(&AES_256_GCM, &bytes[..])
        .map_err(|_| "AES-256-GCM refused the key".to_owned())?;
    Ok(LessSafeKey::new(unbound))
}

/// A listener's ticketer as one snapshot's rustls configuration uses it: tickets are sealed with
/// the client-auth policy of that snapshot, and only tickets made under it decrypt. The
/// [`EpochTicketer`] (keys, counters) is shared by every snapshot of the listener.
#[derive(Debug)]
pub struct BoundTicketer {
    inner: Arc<EpochTicketer>,
    policy: PolicyDigest,
}

impl BoundTicketer {
    /// `inner`, for sessions under `policy`.
    pub fn new(inner: Arc<EpochTicketer>, policy: PolicyDigest) -> Self {
        Self { inner, policy }
    }
}

impl ProducesTickets for BoundTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.inner.lifetime).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt_at(now_secs(), &self.policy, plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.inner.decrypt_at(now_secs(), &self.policy, cipher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    /// The policy of a listener without client auth.
    fn p() -> PolicyDigest {
        PolicyDigest::no_client_auth()
    }

    fn ready(rotation: u64, lifetime: u64, now: u64) -> EpochTicketer {
        let t = EpochTicketer::local("t", rotation, lifetime);
        t.maintain_at(now).expect("keys");
        t
    }

    #[test]
    fn a_ticket_round_trips_and_is_bound_to_its_ticketer() {
        let t = ready(3600, 7200, T0);
        let ticket = t.encrypt_at(T0, &p(), b"session state").expect("ticket");
        assert!(!ticket.windows(13).any(|w| w == b"session state"));
        assert_eq!(
            t.decrypt_at(T0 + 10, &p(), &ticket).as_deref(),
            Some(&b"session state"[..])
        );
        let other = ready(3600, 7200, T0);
        assert_eq!(other.decrypt_at(T0, &p(), &ticket), None);
    }

    #[test]
    fn a_ticket_made_under_another_client_auth_policy_is_refused() {
        use crate::tls::client_auth::ClientAuthMode;
        let t = ready(3600, 7200, T0);
        let ca = rustls_pki_types::CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);
        let required =
            PolicyDigest::client_auth(ClientAuthMode::Required, std::slice::from_ref(&ca));
        let optional = PolicyDigest::client_auth(ClientAuthMode::Optional, &[ca]);
        for made_under in [p(), optional] {
            let ticket = t.encrypt_at(T0, &made_under, TLS12_STATE).expect("ticket");
            assert!(t.decrypt_at(T0, &made_under, &ticket).is_some());
            assert_eq!(
                t.decrypt_at(T0, &required, &ticket),
                None,
                "{made_under:?} ticket resumed under `required`"
            );
        }
        let rejected = t.counters.rejected.load(Ordering::Relaxed);
        assert_eq!(rejected, 2);
        // A version 1 ticket (no digest inside) is never read as one.
        let mut v1 = t.encrypt_at(T0, &required, TLS12_STATE).expect("ticket");
        v1[0] = 1;
        assert_eq!(t.decrypt_at(T0, &required, &v1), None);
    }

    #[test]
    fn a_ticket_older_than_its_lifetime_is_refused_even_with_its_key_held() {
        // Lifetime shorter than the rotation: the key is still held, the age check refuses.
        let t = ready(3600, 60, T0);
        let ticket = t.encrypt_at(T0, &p(), b"x").expect("ticket");
        assert!(t.decrypt_at(T0 + 60, &p(), &ticket).is_some());
        assert_eq!(t.decrypt_at(T0 + 61, &p(), &ticket), None);
        assert_eq!(t.counters.expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn rotation_keeps_the_previous_epoch_within_the_lifetime_and_erases_it_after() {
        let start = T0 - T0 % 100;
        let t = ready(100, 150, start);
        assert_eq!(t.held_epochs(), vec![start / 100, start / 100 + 1]);
        let old = t.encrypt_at(start + 99, &p(), b"old").expect("ticket");
        // Next epoch: a new key issues, the previous one still decrypts.
        t.maintain_at(start + 120).expect("keys");
        let new = t.encrypt_at(start + 120, &p(), b"new").expect("ticket");
        assert_ne!(old[1..9], new[1..9], "epoch in the header");
        assert_eq!(
            t.decrypt_at(start + 200, &p(), &old).as_deref(),
            Some(&b"old"[..])
        );
        // Past the lifetime of everything issued in the first epoch: its key is gone.
        t.maintain_at(start + 250).expect("keys");
        assert!(!t.held_epochs().contains(&(start / 100)));
        assert!(t.decrypt_at(start + 250, &p(), &new).is_some());
    }

    #[test]
    fn rotating_now_invalidates_every_ticket_issued_so_far() {
        let t = EpochTicketer::local("t", 3600, 7200);
        let now = now_secs();
        t.maintain_at(now).expect("keys");
        let ticket = t.encrypt_at(now, &p(), b"x").expect("ticket");
        assert!(t.decrypt_at(now, &p(), &ticket).is_some());
        t.rotate_now().expect("local keys rotate");
        assert_eq!(t.decrypt_at(now, &p(), &ticket), None);
        let fresh = t.encrypt_at(now, &p(), b"y").expect("a new key issues");
        assert!(t.decrypt_at(now, &p(), &fresh).is_some());
    }

    /// The start of a rustls session state: no SNI or SNI "abc", then the version.
    const TLS12_STATE: &[u8] = &[0, 3, 3, 0x13, 0x01, 48];
    const TLS12_STATE_SNI: &[u8] = &[1, 3, b'a', b'b', b'c', 3, 3, 0xc0, 0x2b];
    const TLS13_STATE: &[u8] = &[0, 3, 4, 0x13, 0x01, 48];

    #[test]
    fn session_states_are_told_apart_by_version() {
        assert!(is_tls12_state(TLS12_STATE));
        assert!(is_tls12_state(TLS12_STATE_SNI));
        assert!(!is_tls12_state(TLS13_STATE));
        for odd in [&[][..], &[1], &[1, 9, 3, 3], &[2, 3, 3], b"state"] {
            assert!(!is_tls12_state(odd), "{odd:?}");
        }
    }

    #[test]
    fn a_tls12_ticket_reissued_on_resumption_keeps_the_first_issue_time() {
        let t = ready(3600, 100, T0);
        let first = t.encrypt_at(T0, &p(), TLS12_STATE_SNI).expect("ticket");
        // Resumption at T0 + 60: decrypt, then rustls re-issues in the same call.
        assert!(t.decrypt_at(T0 + 60, &p(), &first).is_some());
        let reissued = t
            .encrypt_at(T0 + 60, &p(), TLS12_STATE_SNI)
            .expect("ticket");
        assert_eq!(reissued[9..17], T0.to_be_bytes(), "issue time carried over");
        assert!(t.decrypt_at(T0 + 100, &p(), &reissued).is_some());
        assert_eq!(
            t.decrypt_at(T0 + 101, &p(), &reissued),
            None,
            "the chain ends a lifetime after the full handshake"
        );
        // The carried time is used once.
        let next = t
            .encrypt_at(T0 + 60, &p(), TLS12_STATE_SNI)
            .expect("ticket");
        assert_eq!(next[9..17], (T0 + 60).to_be_bytes());
    }

    #[test]
    fn tls13_tickets_start_a_fresh_lifetime_on_resumption() {
        // TLS 1.3 resumption mixes in a new ECDHE secret: the new ticket is a new secret.
        let t = ready(3600, 100, T0);
        let first = t.encrypt_at(T0, &p(), TLS13_STATE).expect("ticket");
        assert!(t.decrypt_at(T0 + 60, &p(), &first).is_some());
        let next = t.encrypt_at(T0 + 60, &p(), TLS13_STATE).expect("ticket");
        assert_eq!(next[9..17], (T0 + 60).to_be_bytes());
        // And a TLS 1.2 state never inherits from a TLS 1.3 decryption.
        assert!(t.decrypt_at(T0 + 60, &p(), &first).is_some());
        let other = t.encrypt_at(T0 + 60, &p(), TLS12_STATE).expect("ticket");
        assert_eq!(other[9..17], (T0 + 60).to_be_bytes());
    }

    #[test]
    fn a_key_never_takes_a_ticket_issued_after_its_epoch() {
        let t = ready(100, 300, T0);
        let ticket = t.encrypt_at(T0, &p(), b"x").expect("ticket");
        let mut forged = ticket.clone();
        // Claim an earlier epoch than the issue time: refused before any decryption.
        forged[1..9].copy_from_slice(&(T0 / 100 - 1).to_be_bytes());
        assert_eq!(t.decrypt_at(T0, &p(), &forged), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_decrypt() {
        let t = ready(3600, 7200, T0);
        let ticket = t.encrypt_at(T0, &p(), b"state").expect("ticket");
        let rng = SystemRandom::new();
        let mut buf = [0u8; 256];
        for i in 0..20_000usize {
            rng.fill(&mut buf).expect("rng");
            let len = usize::from(buf[0]) % 200;
            let mut input = buf[1..=len].to_vec();
            // Half of them look like ours: right version, a held epoch, a plausible time.
            if i % 2 == 0 && input.len() >= HEADER_LEN {
                input[..HEADER_LEN].copy_from_slice(&ticket[..HEADER_LEN]);
            }
            assert_eq!(t.decrypt_at(T0, &p(), &input), None, "input {i}");
        }
        for cut in 0..ticket.len() {
            assert_eq!(t.decrypt_at(T0, &p(), &ticket[..cut]), None, "cut at {cut}");
        }
        for i in 0..ticket.len() * 8 {
            let mut bad = ticket.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(t.decrypt_at(T0, &p(), &bad), None, "bit {i} flipped");
        }
        assert!(t.decrypt_at(T0, &p(), &ticket).is_some());
    }

    #[test]
    fn damaged_or_forged_tickets_are_refused() {
        let t = ready(3600, 7200, T0);
        let ticket = t.encrypt_at(T0, &p(), b"state").expect("ticket");
        for i in [0, 3, 12, 20, ticket.len() - 1] {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(t.decrypt_at(T0, &p(), &bad), None, "byte {i} flipped");
        }
        assert_eq!(t.decrypt_at(T0, &p(), &[]), None);
        assert_eq!(t.decrypt_at(T0, &p(), &ticket[..20]), None);
        // A ticket claiming to be issued in the future is refused.
        let later = t
            .encrypt_at(T0 + 3600, &p(), b"x")
            .expect("next epoch's key is held");
        assert_eq!(t.decrypt_at(T0 - 3600, &p(), &later), None);
        assert!(t.decrypt_at(T0 + 3600, &p(), &later).is_some());
    }

    #[test]
    fn the_derivation_input_separates_labels_rotations_and_epochs() {
        let a = derivation_input("web", 3600, 7);
        assert_ne!(a, derivation_input("api", 3600, 7));
        assert_ne!(a, derivation_input("web", 60, 7));
        assert_ne!(a, derivation_input("web", 3600, 8));
        assert!(a.starts_with(b"tlsgate ticket key v1\0\0\x03web"));
    }
}
