//! PKCS#11 tokens: module loading, token selection, login, the session pool and the object
//! handle cache. Key management lives in `objects`, rustls signing in `signer`, rcgen signing in
//! `rcgen_key`.
//!
//! Threading: a cryptoki `Session` is `Send` but not `Sync`, so sessions live in a pool; an
//! operation takes one out, uses it alone, and puts it back. Concurrency therefore opens as many
//! sessions as there are concurrent signers, and no session is ever shared.

mod health;
mod init;
mod key_handles;
mod objects;
mod p11;
mod rcgen_key;
mod secret;
mod signer;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
// The data behind these locks stays consistent even if a holder panicked (a Vec push/pop or a
// map insert), so they do not poison.
use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use crate::error::{Error, Result};
use crate::pin::PinSource;
use crate::secret::SecretBuf;
use crate::uri::Pkcs11Uri;

pub use crate::keyinfo::{KeyInfo, KeyKind, KeyOrigin, KeySpec};
use health::Health;
pub use health::{HealthSnapshot, HsmState, DEFAULT_BREAKER_ERRORS, FIRST_BACKOFF, MAX_BACKOFF};
pub use init::init_token;
use key_handles::HandleKey;
pub use rcgen_key::TokenRcgenKey;
pub use secret::{SecretInfo, HMAC_SHA256_BYTES, SECRET_KEY_BYTES};
pub use signer::{TokenSigningKey, UnavailableTokenKey};

pub(crate) use p11::from_ck;

/// How a token is found: by label or serial, never by slot number (modules renumber slots).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenSelector {
    Label(String),
    Serial(String),
}

impl TokenSelector {
    /// The selector a URI implies (`serial=` wins: it is unique, labels need not be).
    pub fn from_uri(uri: &Pkcs11Uri) -> Option<TokenSelector> {
        match (&uri.serial, &uri.token) {
            (Some(serial), _) => Some(TokenSelector::Serial(serial.clone())),
            (None, Some(label)) => Some(TokenSelector::Label(label.clone())),
            (None, None) => None,
        }
    }
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => f.write_str(l),
            TokenSelector::Serial(s) => write!(f, "serial {s}"),
        }
    }
}

/// Idle sessions kept for reuse; more are opened on demand and closed when returned.
const MAX_IDLE_SESSIONS: usize = 32;

/// Default in-flight budget of a token: signatures on it at once. Little's law: a network HSM
/// doing 1,000 P-256 signatures/s at 5 ms holds 5 in flight; 32 leaves room for slower ones.
pub const DEFAULT_MAX_INFLIGHT: u64 = 32;

/// Default longest wait of a signature for room on a token when every token in service is at
/// its budget (the key-op pool's default deadline).
pub const DEFAULT_BUDGET_WAIT: Duration = Duration::from_millis(2_000);

/// How long a re-initialisation waits for calls already on the module to return before it
/// gives up for this attempt (`C_Finalize` while another thread is inside the module is
/// undefined behaviour in PKCS#11).
const REINIT_WAIT: Duration = Duration::from_secs(2);

/// One loaded PKCS#11 library, shared by every `Token` opened on it. Calls hold the read side
/// of `ctx`; `C_Finalize` + `C_Initialize` take the write side, so they never run while a call
/// is inside the module. `generation` counts initialisations: sessions, slots and object
/// handles belong to the generation they were obtained in and are never used in another.
struct Module {
    ctx: RwLock<ModuleCtx>,
}

struct ModuleCtx {
    pkcs11: Pkcs11,
    generation: u64,
}

fn init_args() -> CInitializeArgs {
    CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)
}

impl Module {
    fn read(&self) -> RwLockReadGuard<'_, ModuleCtx> {
        self.ctx.read()
    }

    /// `C_Finalize` + `C_Initialize`, unless someone else already did since generation `seen`.
    fn reinit(&self, seen: u64) -> Result<()> {
        let give_up = Instant::now() + REINIT_WAIT;
        let mut ctx = loop {
            match self.ctx.try_write() {
                Some(g) => break g,
                None if Instant::now() < give_up => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                None => {
                    return Err(Error::Pkcs11 {
                        function: "C_Finalize",
                        rv: "not attempted: calls still in progress on the module".into(),
                    })
                }
            }
        };
        if ctx.generation != seen {
            return Ok(());
        }
        // Whatever C_Finalize answers (a module that lost its device may say anything), every
        // session and handle of this generation is gone from here on.
        if let Err(e) = ctx.pkcs11.clone().finalize() {
            tracing::debug!(error = %from_ck(e), "C_Finalize during recovery");
        }
        ctx.generation += 1;
        match ctx.pkcs11.initialize(init_args()) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
            Err(e) => Err(from_ck(e)),
        }
    }
}

/// Loaded modules by canonical path: a module may be initialised once per process, so every
/// `Token::open` of the same library shares one context.
fn module(path: &Path) -> Result<Arc<Module>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
    let load_err = |reason: String| Error::ModuleLoad {
        path: path.to_owned(),
        reason,
    };
    let canonical = std::fs::canonicalize(path).map_err(|e| load_err(e.to_string()))?;
    let mut modules = MODULES.get_or_init(Default::default).lock();
    if let Some(m) = modules.get(&canonical) {
        return Ok(Arc::clone(m));
    }
    let pkcs11 = Pkcs11::new(&canonical).map_err(|e| load_err(e.to_string()))?;
    match pkcs11.initialize(init_args()) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(load_err(format!("C_Initialize: {}", from_ck(e)))),
    }
    let m = Arc::new(Module {
        ctx: RwLock::new(ModuleCtx {
            pkcs11,
            generation: 0,
        }),
    });
    modules.insert(canonical, Arc::clone(&m));
    Ok(m)
}

/// The module's context as it is now (for the offline token ceremony).
fn pkcs11_of(path: &Path) -> Result<Pkcs11> {
    Ok(module(path)?.read().pkcs11.clone())
}

/// A session and the module generation it was opened in.
struct Pooled {
    generation: u64,
    session: Session,
}

impl Pooled {
    /// Closes a session of the current generation; forgets one of an older generation, whose
    /// handle number may now belong to another session of ours.
    fn discard(self, current: u64) {
        if self.generation == current {
            drop(self.session);
        } else {
            std::mem::forget(self.session);
        }
    }
}

/// A logged-in PKCS#11 token. `Send + Sync`; share it as `Arc<Token>`.
pub struct Token {
    module_path: PathBuf,
    module: Arc<Module>,
    selector: TokenSelector,
    /// The slot and the generation it was found in; found again by label/serial after a
    /// re-initialisation (modules renumber slots).
    slot: Mutex<(u64, Slot)>,
    label: String,
    serial: String,
    /// Kept so sessions opened later (after the token dropped the login) can log in again: on
    /// pages of its own, out of core dumps, locked in memory, wiped on drop.
    pin: SecretBuf,
    mechanisms: Vec<MechanismType>,
    sessions: Mutex<Vec<Pooled>>,
    handles: Mutex<HashMap<HandleKey, (u64, ObjectHandle)>>,
    /// Every key found since start (less those deleted through us): recovery looks them all up
    /// again, and a key of this set that vanishes takes the token out of service.
    in_use: Mutex<std::collections::HashSet<HandleKey>>,
    health: Health,
    /// Other tokens holding the same keys (an HA pair, a second HSM): signing keys made on this
    /// token sign on whichever of them is in service with the fewest signatures in flight and
    /// room in its budget.
    replicas: Mutex<Vec<Arc<Token>>>,
    /// Signatures on this token at once (its in-flight budget); 0 means the default.
    max_inflight: std::sync::atomic::AtomicU64,
    /// How long a signature waits for room when every token in service is at its budget, in
    /// milliseconds (read on the primary); 0 means the default.
    budget_wait_ms: std::sync::atomic::AtomicU64,
    this: Weak<Token>,
}

/// A place in a token's in-flight budget, held for one signature; freed on drop, which wakes
/// signatures waiting for room.
#[derive(Debug)]
pub(crate) struct SignPermit {
    token: Arc<Token>,
}

impl Drop for SignPermit {
    fn drop(&mut self) {
        self.token.health.signing.fetch_sub(1, Relaxed);
        signer::room_freed();
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.module_path)
            .field("label", &self.label)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// The slot holding the token `selector` names, with its label and serial.
fn find_slot(pkcs11: &Pkcs11, selector: &TokenSelector) -> Result<Option<(Slot, String, String)>> {
    let slots = pkcs11.get_slots_with_token().map_err(from_ck)?;
    for slot in slots {
        let info = match pkcs11.get_token_info(slot) {
            Ok(info) => info,
            // A token that vanished or broke since the slot list was taken is not the one
            // asked for; it must not hide the others.
            Err(e) => {
                tracing::debug!(?slot, error = %from_ck(e), "skipping unreadable slot");
                continue;
            }
        };
        let hit = match selector {
            TokenSelector::Label(l) => info.label().trim_end() == l,
            TokenSelector::Serial(s) => info.serial_number().trim_end() == s,
        };
        if hit {
            return Ok(Some((
                slot,
                info.label().trim_end().to_owned(),
                info.serial_number().trim_end().to_owned(),
            )));
        }
    }
    Ok(None)
}

impl Token {
    /// Loads `module` (once per process), finds the token, reads the PIN and logs in.
    pub fn open(
        module_path: &Path,
        selector: TokenSelector,
        pin: &PinSource,
    ) -> Result<Arc<Token>> {
        let module = module(module_path)?;
        let pin = {
            let read = pin.read()?;
            SecretBuf::from_slice(read.as_bytes()).map_err(|e| Error::PinSource {
                source_desc: pin.to_string(),
                reason: format!("no memory for the PIN: {e}"),
            })?
        };
        let (generation, pkcs11) = {
            let ctx = module.read();
            (ctx.generation, ctx.pkcs11.clone())
        };
        let (slot, label, serial) =
            find_slot(&pkcs11, &selector)?.ok_or_else(|| Error::TokenNotFound {
                label: selector.to_string(),
                module: module_path.to_owned(),
            })?;
        // Modules without a mechanism list still sign; the list only narrows what we offer.
        let mechanisms = pkcs11.get_mechanism_list(slot).unwrap_or_default();
        {
            use cryptoki::mechanism::MechanismType as M;
            // The mechanisms tlsgate uses, and which of them this token has: one line at start.
            let used = [
                M::ECDSA,
                M::EDDSA,
                M::RSA_PKCS,
                M::RSA_PKCS_PSS,
                M::ECC_KEY_PAIR_GEN,
                M::ECC_EDWARDS_KEY_PAIR_GEN,
                M::RSA_PKCS_KEY_PAIR_GEN,
                M::GENERIC_SECRET_KEY_GEN,
                M::SHA256_HMAC,
            ];
            let (has, lacks): (Vec<M>, Vec<M>) =
                used.into_iter().partition(|m| mechanisms.contains(m));
            let names = |v: &[M]| {
                v.iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            tracing::info!(
                token = %label,
                offers = %names(&has),
                lacks = %names(&lacks),
                "PKCS#11 mechanisms tlsgate uses"
            );
        }
        let token = Arc::new_cyclic(|this| Token {
            module_path: module_path.to_owned(),
            module,
            selector,
            slot: Mutex::new((generation, slot)),
            label,
            serial,
            pin,
            mechanisms,
            sessions: Mutex::new(Vec::new()),
            handles: Mutex::new(HashMap::new()),
            in_use: Mutex::new(Default::default()),
            health: Health::default(),
            replicas: Mutex::new(Vec::new()),
            max_inflight: Default::default(),
            budget_wait_ms: Default::default(),
            this: this.clone(),
        });
        // Log in now so a wrong PIN fails at start-up, not at the first handshake.
        token.with_session(|_| Ok(()))?;
        tracing::debug!(token = %token.label, module = %module_path.display(), "PKCS#11 token opened");
        Ok(token)
    }

    /// [`Token::open`] that gives up after `limit` with [`Error::Timeout`]: a frozen or
    /// unreachable HSM can hang any PKCS#11 call, and start-up must fail with a reason instead.
    /// The attempt goes on in a thread of its own and is abandoned.
    pub fn open_within(
        module_path: &Path,
        selector: TokenSelector,
        pin: &PinSource,
        limit: Duration,
    ) -> Result<Arc<Token>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (path, pin) = (module_path.to_owned(), pin.clone());
        let label = selector.to_string();
        std::thread::Builder::new()
            .name("tlsgate-token-open".into())
            .spawn(move || {
                let _ = tx.send(Token::open(&path, selector, &pin));
            })
            .map_err(|e| Error::io(module_path, e))?;
        rx.recv_timeout(limit).unwrap_or(Err(Error::Timeout {
            what: format!("opening token {label:?}"),
            after_ms: limit.as_millis() as u64,
        }))
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn module_path(&self) -> &Path {
        &self.module_path
    }

    /// Where the token stands and what it has done, for metrics.
    pub fn health(&self) -> HealthSnapshot {
        self.health.snapshot()
    }

    /// Adds a token that holds the same keys as this one (same label or id, same public key):
    /// signing keys made on this token from now on sign on either. Checked key by key when a
    /// signing key is made; a replica missing a key or holding another public key is refused.
    pub fn add_replica(&self, replica: Arc<Token>) {
        self.replicas.lock().push(replica);
    }

    /// The replicas added with [`Token::add_replica`].
    pub fn replicas(&self) -> Vec<Arc<Token>> {
        self.replicas.lock().clone()
    }

    /// Sets how many device-level errors in a row open the breaker (take the token out of
    /// service); 0 restores [`DEFAULT_BREAKER_ERRORS`].
    pub fn set_breaker_errors(&self, k: u32) {
        self.health.breaker_errors.store(k, Relaxed);
    }

    /// Sets the token's in-flight budget (signatures on it at once); 0 restores
    /// [`DEFAULT_MAX_INFLIGHT`].
    pub fn set_max_inflight(&self, n: u64) {
        self.max_inflight.store(n, Relaxed);
    }

    /// The token's in-flight budget.
    pub fn max_inflight(&self) -> u64 {
        match self.max_inflight.load(Relaxed) {
            0 => DEFAULT_MAX_INFLIGHT,
            n => n,
        }
    }

    /// Sets how long a signature waits for room when every token in service (this one and its
    /// replicas) is at its budget before it is shed; 0 restores [`DEFAULT_BUDGET_WAIT`]. Set it
    /// to the key-op deadline: waiting longer only turns a shed into a timeout.
    pub fn set_budget_wait(&self, wait: Duration) {
        self.budget_wait_ms
            .store(wait.as_millis().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub(crate) fn budget_wait(&self) -> Duration {
        match self.budget_wait_ms.load(Relaxed) {
            0 => DEFAULT_BUDGET_WAIT,
            ms => Duration::from_millis(ms),
        }
    }

    /// A place in the in-flight budget, if the token has room.
    pub(crate) fn try_reserve(&self) -> Option<SignPermit> {
        let max = self.max_inflight();
        let signing = &self.health.signing;
        let mut now = signing.load(Relaxed);
        loop {
            if now >= max {
                return None;
            }
            match signing.compare_exchange_weak(now, now + 1, Relaxed, Relaxed) {
                Ok(_) => break,
                Err(seen) => now = seen,
            }
        }
        match self.this.upgrade() {
            Some(token) => Some(SignPermit { token }),
            None => {
                signing.fetch_sub(1, Relaxed);
                None
            }
        }
    }

    /// Signatures on the token now (each holds a place in its budget).
    pub(crate) fn signing(&self) -> u64 {
        self.health.signing.load(Relaxed)
    }

    /// Counts a signature shed because every token in service was at its budget.
    pub(crate) fn count_shed(&self) {
        self.health.sign_shed.fetch_add(1, Relaxed);
    }

    /// A cheap call to the device (`C_GetSessionInfo` on an idle session), so an outage is found
    /// by the probe rather than by the next handshake. The probe is the breaker's own check of
    /// the device: a device-level answer opens it at once (no count of errors in a row) and
    /// starts recovery; out of service it returns [`Error::TokenUnavailable`] at once (recovery
    /// does its own checking).
    pub fn probe(&self) -> Result<()> {
        self.with_session_opts(true, |s, _| {
            s.get_session_info().map(|_| ()).map_err(from_ck)
        })
    }

    /// Whether the token is in service (a device-level error takes it out until recovery).
    pub fn is_up(&self) -> bool {
        self.health.state() == HsmState::Healthy
    }

    /// Counts a failed signature; `Some(n)` when a (rate-limited) log line is due, `n` being the
    /// failures since the last one.
    pub(crate) fn sign_failure_line(&self) -> Option<u64> {
        self.health.sign_failure_line()
    }

    /// Whether the token lists `mechanism`. Modules that return no list are trusted to try.
    pub(crate) fn has_mechanism(&self, mechanism: MechanismType) -> bool {
        self.mechanisms.is_empty() || self.mechanisms.contains(&mechanism)
    }

    fn unavailable(&self) -> Error {
        let (rv, since) = self.health.cause().unwrap_or_default();
        Error::TokenUnavailable {
            token: self.label.clone(),
            rv,
            since_ms: since.as_millis() as u64,
        }
    }

    /// The slot in generation `ctx`, found again by label/serial after a re-initialisation.
    fn slot_in(&self, ctx: &ModuleCtx) -> Result<Slot> {
        let mut slot = self.slot.lock();
        if slot.0 == ctx.generation {
            return Ok(slot.1);
        }
        let (s, _, _) = find_slot(&ctx.pkcs11, &self.selector)?.ok_or_else(|| Error::Pkcs11 {
            function: "C_GetSlotList",
            rv: "CKR_TOKEN_NOT_PRESENT".into(),
        })?;
        *slot = (ctx.generation, s);
        Ok(s)
    }

    fn open_session(&self, ctx: &ModuleCtx) -> Result<Session> {
        let slot = self.slot_in(ctx)?;
        let session = match ctx.pkcs11.open_rw_session(slot) {
            // Signing needs no write access; a write-protected token still signs.
            Err(CkError::Pkcs11(RvError::TokenWriteProtected, _)) => {
                ctx.pkcs11.open_ro_session(slot).map_err(from_ck)?
            }
            other => other.map_err(from_ck)?,
        };
        // The PIN was UTF-8 when read (`PinSource::read`); `AuthPin` is a `secrecy` string,
        // wiped when it drops at the end of this call.
        let pin = AuthPin::from(String::from_utf8_lossy(self.pin.as_bytes()).as_ref());
        match session.login(UserType::User, Some(&pin)) {
            // Login state is per token and application: a second login is expected.
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(Error::PinIncorrect {
                token: self.label.clone(),
            }),
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(Error::PinLocked {
                token: self.label.clone(),
            }),
            Err(e) => Err(from_ck(e)),
        }
    }

    fn take_session(&self, ctx: &ModuleCtx) -> Result<Session> {
        loop {
            let idle = self.sessions.lock().pop();
            match idle {
                Some(p) if p.generation == ctx.generation => return Ok(p.session),
                Some(stale) => stale.discard(ctx.generation),
                None => return self.open_session(ctx),
            }
        }
    }

    fn put_session(&self, ctx: &ModuleCtx, session: Session) {
        let mut idle = self.sessions.lock();
        if idle.len() < MAX_IDLE_SESSIONS {
            idle.push(Pooled {
                generation: ctx.generation,
                session,
            });
        }
    }

    /// Drops every idle session (closing those of the current generation).
    fn drop_sessions(&self, current: u64) -> usize {
        let idle = std::mem::take(&mut *self.sessions.lock());
        let n = idle.len();
        for p in idle {
            p.discard(current);
        }
        n
    }

    /// Runs `f` on a session of its own, while the token is in service. A session the token
    /// invalidated (closed, logged out, device gone) is dropped rather than returned, so the
    /// next operation opens a fresh one; a device-level error takes the token out of service
    /// and starts recovery.
    pub(crate) fn with_session<T>(&self, f: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        self.with_session_gen(|s, _| f(s))
    }

    fn with_session_gen<T>(&self, f: impl FnOnce(&Session, u64) -> Result<T>) -> Result<T> {
        self.with_session_opts(false, f)
    }

    /// `immediate`: a device-level error opens the breaker at once instead of counting towards
    /// `breaker_errors` in a row.
    fn with_session_opts<T>(
        &self,
        immediate: bool,
        f: impl FnOnce(&Session, u64) -> Result<T>,
    ) -> Result<T> {
        if !self.is_up() {
            return Err(self.unavailable());
        }
        self.health.inflight.fetch_add(1, Relaxed);
        let result = {
            let ctx = self.module.read();
            self.run_on_session(&ctx, f)
        };
        self.health.inflight.fetch_sub(1, Relaxed);
        match &result {
            Ok(_) => self.health.success(),
            Err(e) => self.note_error(e, immediate),
        }
        result
    }

    fn run_on_session<T>(
        &self,
        ctx: &ModuleCtx,
        f: impl FnOnce(&Session, u64) -> Result<T>,
    ) -> Result<T> {
        let session = self.take_session(ctx)?;
        let result = f(&session, ctx.generation);
        match &result {
            Err(e) if p11::is_session_fatal(e) => {
                // What killed this session (logout, removal, device error) killed the idle ones
                // too: drop them all so each later operation does not fail once more to find out.
                let dropped = self.drop_sessions(ctx.generation);
                tracing::debug!(
                    token = %self.label, error = %e, dropped_idle = dropped,
                    "dropping PKCS#11 sessions"
                );
                drop(session);
            }
            _ => self.put_session(ctx, session),
        }
        result
    }

    /// Counts a device-level error towards the breaker, or with `immediate` opens it; the
    /// caller that opens it starts recovery (once per outage).
    fn note_error(&self, e: &Error, immediate: bool) {
        if let Error::Pkcs11 { function, rv } = e {
            if !p11::is_device_level(e) {
                return;
            }
            let opened = if immediate {
                self.health.fail(&self.label, function, rv)
            } else {
                self.health.device_error(&self.label, function, rv)
            };
            if opened {
                health::spawn_recovery(self.this.clone(), self.label.clone());
            }
        }
    }

    /// One recovery attempt (on the recovery thread): reconnect; if that fails, re-initialise
    /// the module and reconnect once more. Returns how many keys in use were found again.
    fn try_recover(&self) -> Result<usize> {
        let (generation, first) = self.reconnect(true);
        match first {
            Ok(n) => Ok(n),
            Err(e @ (Error::PinIncorrect { .. } | Error::PinLocked { .. })) => Err(e),
            Err(e) => {
                tracing::debug!(token = %self.label, error = %e, "reconnecting failed; re-initialising the module");
                self.drop_sessions(generation);
                self.module.reinit(generation)?;
                self.health.reinitialisations.fetch_add(1, Relaxed);
                // After a fresh start of the module a key still missing was deleted on purpose;
                // the token serves the others.
                self.reconnect(false).1
            }
        }
    }

    /// Fresh sessions, the slot found again, a login, and every key in use looked up again.
    /// With `all_keys`, a key in use that is not found fails the attempt.
    fn reconnect(&self, all_keys: bool) -> (u64, Result<usize>) {
        let ctx = self.module.read();
        self.drop_sessions(ctx.generation);
        // Force the slot to be found again: a token re-inserted may sit in another slot.
        self.slot.lock().0 = u64::MAX;
        let result = (|| {
            let session = self.open_session(&ctx)?;
            let keys: Vec<HandleKey> = self.in_use.lock().iter().cloned().collect();
            let mut fresh = HashMap::new();
            for k in keys {
                let found = objects::find_private(&session, &k.uri())?;
                match found.as_slice() {
                    [h] => {
                        fresh.insert(k, (ctx.generation, *h));
                    }
                    _ if all_keys => {
                        return Err(Error::KeyNotFound {
                            uri: k.uri().to_string(),
                        })
                    }
                    _ => {
                        self.in_use.lock().remove(&k);
                    }
                }
            }
            let n = fresh.len();
            *self.handles.lock() = fresh;
            self.put_session(&ctx, session);
            Ok(n)
        })();
        (ctx.generation, result)
    }
}
