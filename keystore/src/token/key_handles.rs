//! Private keys on the token by URI: the URI checked against this token, the object handle
//! looked up once per module generation and cached, a stale handle looked up again, and the
//! raw signature with its one retry on a fresh session.

use std::sync::atomic::Ordering::Relaxed;

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::{from_ck, health, objects, p11, Token};
use crate::error::{Error, Result};
use crate::uri::Pkcs11Uri;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct HandleKey {
    object: Option<String>,
    id: Option<Vec<u8>>,
}

impl HandleKey {
    pub(super) fn of(uri: &Pkcs11Uri) -> HandleKey {
        HandleKey {
            object: uri.object.clone(),
            id: uri.id.clone(),
        }
    }

    pub(super) fn uri(&self) -> Pkcs11Uri {
        Pkcs11Uri {
            object: self.object.clone(),
            id: self.id.clone(),
            ..Pkcs11Uri::default()
        }
    }
}

impl Token {
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

    /// The private key handle for `uri` in generation `generation`, from the cache or one
    /// search on `s`.
    fn private_handle_in(
        &self,
        s: &Session,
        generation: u64,
        uri: &Pkcs11Uri,
    ) -> Result<ObjectHandle> {
        let key = HandleKey::of(uri);
        if let Some((g, h)) = self.handles.lock().get(&key) {
            if *g == generation {
                return Ok(*h);
            }
        }
        let handles = objects::find_private(s, uri)?;
        match handles.as_slice() {
            [] => Err(Error::KeyNotFound {
                uri: uri.to_string(),
            }),
            [h] => {
                self.in_use.lock().insert(key.clone());
                self.handles.lock().insert(key, (generation, *h));
                Ok(*h)
            }
            many => Err(Error::AmbiguousKey {
                uri: uri.to_string(),
                count: many.len(),
            }),
        }
    }

    /// Runs `f` with the private key `uri` names, in one session and one module generation.
    /// A handle that went stale (the key was re-created, the token re-inserted) is looked up
    /// again once.
    pub(crate) fn with_private_key<T>(
        &self,
        uri: &Pkcs11Uri,
        f: impl Fn(&Session, ObjectHandle) -> Result<T>,
    ) -> Result<T> {
        self.check_uri(uri)?;
        // Set when a key that was there a moment ago is gone: the token lost its objects (its
        // store went away), not this one key.
        let vanished = std::cell::Cell::new(false);
        let result = self.with_session_gen(|s, generation| {
            let handle = self.private_handle_in(s, generation, uri)?;
            match f(s, handle) {
                Err(e) if p11::is_handle_invalid(&e) => {
                    self.forget_handles();
                    let again = self.private_handle_in(s, generation, uri);
                    vanished.set(matches!(again, Err(Error::KeyNotFound { .. })));
                    f(s, again?)
                }
                other => other,
            }
        });
        if vanished.get()
            && self.health.fail(
                &self.label,
                "C_FindObjects",
                "CKR_KEY_HANDLE_INVALID (key vanished)",
            )
        {
            health::spawn_recovery(self.this.clone(), self.label.clone());
        }
        result
    }

    pub(crate) fn forget_handles(&self) {
        self.handles.lock().clear();
    }

    /// A key deleted through us is no longer in use.
    pub(crate) fn forget_key(&self, uri: &Pkcs11Uri) {
        self.in_use.lock().remove(&HandleKey::of(uri));
    }

    /// One signature with the private key `uri` names. Fails at once with
    /// [`Error::TokenUnavailable`] while the token is out of service. A session the token
    /// closed is replaced and the signature tried once more; when the fresh session fails the
    /// same way, every session is gone and the token goes out of service.
    pub(crate) fn sign_raw(
        &self,
        uri: &Pkcs11Uri,
        mechanism: &cryptoki::mechanism::Mechanism<'_>,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let sign = |s: &Session, h: ObjectHandle| s.sign(mechanism, h, data).map_err(from_ck);
        let result = match self.with_private_key(uri, sign) {
            Err(e) if p11::is_session_level(&e) => {
                let again = self.with_private_key(uri, sign);
                if let Err(e2 @ Error::Pkcs11 { function, rv }) = &again {
                    if p11::is_session_level(e2)
                        && self.health.fail(
                            &self.label,
                            function,
                            &format!("{rv} on every session"),
                        )
                    {
                        health::spawn_recovery(self.this.clone(), self.label.clone());
                    }
                }
                again
            }
            other => other,
        };
        let counter = match &result {
            Ok(_) => &self.health.sign_ok,
            Err(Error::TokenUnavailable { .. }) => &self.health.sign_unavailable,
            Err(_) => &self.health.sign_error,
        };
        counter.fetch_add(1, Relaxed);
        result
    }
}
