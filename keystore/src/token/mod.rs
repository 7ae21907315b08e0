//! PKCS#11 tokens: module loading, token selection, login, the session pool and the object
//! handle cache. Key management lives in `objects`, rustls signing in `signer`, rcgen signing in
//! `rcgen_key`.
//!
//! Threading: a cryptoki `Session` is `Send` but not `Sync`, so sessions live in a pool; an
//! operation takes one out, uses it alone, and puts it back. Concurrency therefore opens as many
//! sessions as there are concurrent signers, and no session is ever shared.

mod init;
mod objects;
mod p11;
mod rcgen_key;
mod secret;
mod signer;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::error::{Error, Result};
use crate::pin::PinSource;
use crate::secret::SecretBuf;
use crate::uri::Pkcs11Uri;

pub use crate::keyinfo::{KeyInfo, KeyKind, KeyOrigin, KeySpec};
pub use init::init_token;
pub use rcgen_key::TokenRcgenKey;
pub use secret::{SecretInfo, HMAC_SHA256_BYTES, SECRET_KEY_BYTES};
pub use signer::TokenSigningKey;

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

/// A logged-in PKCS#11 token. `Send + Sync`; share it as `Arc<Token>`.
pub struct Token {
    module_path: PathBuf,
    pkcs11: Pkcs11,
    slot: Slot,
    label: String,
    serial: String,
    /// Kept so sessions opened later (after the token dropped the login) can log in again: on
    /// pages of its own, out of core dumps, locked in memory, wiped on drop.
    pin: SecretBuf,
    mechanisms: Vec<MechanismType>,
    sessions: Mutex<Vec<Session>>,
    handles: Mutex<HashMap<HandleKey, ObjectHandle>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HandleKey {
    object: Option<String>,
    id: Option<Vec<u8>>,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent even if a holder panicked (a Vec push/pop or
    // a map insert), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loaded modules by canonical path: a module may be initialised once per process, so every
/// `Token::open` of the same library shares one context.
fn module(path: &Path) -> Result<Pkcs11> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let load_err = |reason: String| Error::ModuleLoad {
        path: path.to_owned(),
        reason,
    };
    let canonical = std::fs::canonicalize(path).map_err(|e| load_err(e.to_string()))?;
    let mut modules = lock(MODULES.get_or_init(Default::default));
    if let Some(p) = modules.get(&canonical) {
        return Ok(p.clone());
    }
    let pkcs11 = Pkcs11::new(&canonical).map_err(|e| load_err(e.to_string()))?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(load_err(format!("C_Initialize: {}", from_ck(e)))),
    }
    modules.insert(canonical, pkcs11.clone());
    Ok(pkcs11)
}

impl Token {
    /// Loads `module` (once per process), finds the token, reads the PIN and logs in.
    pub fn open(
        module_path: &Path,
        selector: TokenSelector,
        pin: &PinSource,
    ) -> Result<Arc<Token>> {
        let pkcs11 = module(module_path)?;
        let pin = {
            let read = pin.read()?;
            SecretBuf::from_slice(read.as_bytes()).map_err(|e| Error::PinSource {
                source_desc: pin.to_string(),
                reason: format!("no memory for the PIN: {e}"),
            })?
        };
        let slots = pkcs11.get_slots_with_token().map_err(from_ck)?;
        let mut found = None;
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
            let hit = match &selector {
                TokenSelector::Label(l) => info.label().trim_end() == l,
                TokenSelector::Serial(s) => info.serial_number().trim_end() == s,
            };
            if hit {
                found = Some((
                    slot,
                    info.label().trim_end().to_owned(),
                    info.serial_number().trim_end().to_owned(),
                ));
                break;
            }
        }
        let (slot, label, serial) = found.ok_or_else(|| Error::TokenNotFound {
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
        let token = Token {
            module_path: module_path.to_owned(),
            pkcs11,
            slot,
            label,
            serial,
            pin,
            mechanisms,
            sessions: Mutex::new(Vec::new()),
            handles: Mutex::new(HashMap::new()),
        };
        // Log in now so a wrong PIN fails at start-up, not at the first handshake.
        let session = token.open_session()?;
        token.put_session(session);
        tracing::debug!(token = %token.label, module = %module_path.display(), "PKCS#11 token opened");
        Ok(Arc::new(token))
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

    /// Whether the token lists `mechanism`. Modules that return no list are trusted to try.
    pub(crate) fn has_mechanism(&self, mechanism: MechanismType) -> bool {
        self.mechanisms.is_empty() || self.mechanisms.contains(&mechanism)
    }

    fn open_session(&self) -> Result<Session> {
        let session = match self.pkcs11.open_rw_session(self.slot) {
            // Signing needs no write access; a write-protected token still signs.
            Err(CkError::Pkcs11(RvError::TokenWriteProtected, _)) => {
                self.pkcs11.open_ro_session(self.slot).map_err(from_ck)?
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

    fn take_session(&self) -> Result<Session> {
        let idle = lock(&self.sessions).pop();
        match idle {
            Some(s) => Ok(s),
            None => self.open_session(),
        }
    }

    fn put_session(&self, session: Session) {
        let mut idle = lock(&self.sessions);
        if idle.len() < MAX_IDLE_SESSIONS {
            idle.push(session);
        }
    }

    /// Runs `f` on a session of its own. A session the token invalidated (closed, logged out,
    /// device gone) is dropped rather than returned, so the next operation opens a fresh one.
    pub(crate) fn with_session<T>(&self, f: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        let session = self.take_session()?;
        let result = f(&session);
        match &result {
            Err(e) if p11::is_session_fatal(e) => {
                // What killed this session (logout, removal, device error) killed the idle ones
                // too: drop them all so each later operation does not fail once more to find out.
                let idle = std::mem::take(&mut *lock(&self.sessions));
                tracing::warn!(
                    token = %self.label, error = %e, dropped_idle = idle.len(),
                    "dropping PKCS#11 sessions"
                );
                drop(idle);
                drop(session);
            }
            _ => self.put_session(session),
        }
        result
    }

    /// Checks that `uri` names this token.
    pub(crate) fn check_uri(&self, uri: &Pkcs11Uri) -> Result<()> {
        let wrong = |wanted: &str| Error::WrongToken {
            uri: uri.to_string(),
            wanted: wanted.to_owned(),
            token: self.label.clone(),
        };
        if let Some(t) = &uri.token {
            if *t != self.label {
                return Err(wrong(t));
            }
        }
        if let Some(s) = &uri.serial {
            if *s != self.serial {
                return Err(wrong(s));
            }
        }
        if !uri.has_object_selector() {
            return Err(crate::uri::UriError::MissingObject.into());
        }
        Ok(())
    }

    /// The private key handle for `uri`, from the cache or one search.
    pub(crate) fn private_handle(&self, uri: &Pkcs11Uri) -> Result<ObjectHandle> {
        self.check_uri(uri)?;
        let key = HandleKey {
            object: uri.object.clone(),
            id: uri.id.clone(),
        };
        if let Some(h) = lock(&self.handles).get(&key) {
            return Ok(*h);
        }
        let handles = self.with_session(|s| objects::find_private(s, uri))?;
        match handles.as_slice() {
            [] => Err(Error::KeyNotFound {
                uri: uri.to_string(),
            }),
            [h] => {
                lock(&self.handles).insert(key, *h);
                Ok(*h)
            }
            many => Err(Error::AmbiguousKey {
                uri: uri.to_string(),
                count: many.len(),
            }),
        }
    }

    pub(crate) fn forget_handles(&self) {
        lock(&self.handles).clear();
    }

    /// One signature with the private key `uri` names. Handles that went stale (the key was
    /// re-created, the token re-inserted) are looked up again once.
    pub(crate) fn sign_raw(
        &self,
        uri: &Pkcs11Uri,
        mechanism: &cryptoki::mechanism::Mechanism<'_>,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let handle = self.private_handle(uri)?;
        let sign =
            |h: ObjectHandle| self.with_session(|s| s.sign(mechanism, h, data).map_err(from_ck));
        match sign(handle) {
            Err(e) if p11::is_handle_invalid(&e) => {
                self.forget_handles();
                sign(self.private_handle(uri)?)
            }
            other => other,
        }
    }
}
