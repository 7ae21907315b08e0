//! The tripwire: a twin of a listener's configuration whose keys choose their signature scheme
//! like the real ones but refuse to sign, and the thread-local flags that say whether one was
//! asked to ("tripped") and whether the thread is inside an inline resumption attempt.
//!
//! On a listener whose keys are on a token, a ClientHello that may resume (see
//! [`super::hint`]) runs `into_connection()` inline against the twin: a resumption needs no
//! signature and completes on the core; a full handshake trips the wire, the attempt is
//! discarded unsent, and the flight goes to a key-op worker ([`super::job`]).

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use rustls::server::{Accepted, ClientHello, ResolvesServerCert, ServerConnection};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{ServerConfig, SignatureAlgorithm, SignatureScheme};

use super::hint;

/// The tripwire twin of `tls`: the same configuration, its certificate resolver wrapped so every
/// key it hands out refuses to sign.
pub(crate) fn tripwire_config(tls: &Arc<ServerConfig>) -> Arc<ServerConfig> {
    let mut cfg = (**tls).clone();
    cfg.cert_resolver = Arc::new(TripwireResolver(tls.cert_resolver.clone()));
    Arc::new(cfg)
}

thread_local! {
    static TRIPPED: Cell<bool> = const { Cell::new(false) };
    static INLINE_ATTEMPT: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is running the inline resumption attempt of an offloaded listener (the
/// tripwire configuration). Whatever a session store or ticketer sees then, it sees again when
/// a full handshake is replayed on a key-op worker: count and log refusals only outside it.
pub fn inline_resumption_attempt() -> bool {
    INLINE_ATTEMPT.with(|a| a.get())
}

/// Marks this thread as in an inline resumption attempt until dropped.
struct InlineAttempt(());

impl InlineAttempt {
    fn begin() -> Self {
        INLINE_ATTEMPT.with(|a| a.set(true));
        Self(())
    }
}

impl Drop for InlineAttempt {
    fn drop(&mut self) {
        INLINE_ATTEMPT.with(|a| a.set(false));
    }
}

/// What a ClientHello on an offloaded listener came to on the io thread.
#[derive(Debug)]
pub(crate) enum Inline {
    /// A resumption: done without a signature, the connection goes on inline.
    Resumed(Box<ServerConnection>),
    /// A full handshake (hinted, or it tripped the wire, or it asked for a retry whose second
    /// hello may sign): the flight goes to a key-op worker. Nothing was sent.
    NeedsKeyOp,
    /// rustls refused the hello itself (the tripwire was not asked to sign): the connection
    /// fails with `error`, and `alert` holds what rustls queued for the client.
    Refused {
        /// The error from rustls.
        error: rustls::Error,
        /// The bytes rustls queued.
        alert: Vec<u8>,
    },
}

/// Decides inline whether the hello `accepted` (whose raw records are `flight`) needs a key
/// operation: one that may resume ([`hint::may_resume`] against `real`'s session store) runs
/// `into_connection()` against the `tripwire` twin; every other hello needs one at once.
pub(crate) fn attempt_inline(
    accepted: Accepted,
    flight: &[u8],
    real: &ServerConfig,
    tripwire: Arc<ServerConfig>,
) -> Inline {
    // What the session store and ticketer see from here on, the replay sees again.
    let _attempt = InlineAttempt::begin();
    if !hint::may_resume(flight, &*real.session_storage) {
        return Inline::NeedsKeyOp;
    }
    TRIPPED.with(|t| t.set(false));
    match accepted.into_connection(tripwire) {
        // A HelloRetryRequest decides nothing: the second hello may still need a signature the
        // tripwire cannot give. Discarded unsent; a worker answers both.
        Ok(tls) if hint::awaiting_second_hello(&tls) => Inline::NeedsKeyOp,
        Ok(tls) => Inline::Resumed(Box::new(tls)),
        Err(_) if TRIPPED.with(|t| t.get()) => Inline::NeedsKeyOp,
        Err((error, mut alert)) => {
            let mut bytes = Vec::new();
            let _ = alert.write_all(&mut bytes);
            Inline::Refused {
                error,
                alert: bytes,
            }
        }
    }
}

#[derive(Debug)]
struct TripwireResolver(Arc<dyn ResolvesServerCert>);

impl ResolvesServerCert for TripwireResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let real = self.0.resolve(hello)?;
        let key: Arc<dyn SigningKey> = Arc::new(TripwireKey(real.key.clone()));
        Some(Arc::new(CertifiedKey {
            cert: real.cert.clone(),
            key,
            ocsp: real.ocsp.clone(),
        }))
    }

    fn only_raw_public_keys(&self) -> bool {
        self.0.only_raw_public_keys()
    }
}

/// Chooses schemes exactly like the real key, so the inline attempt takes the same path, but
/// fails instead of signing.
struct TripwireKey(Arc<dyn SigningKey>);

impl fmt::Debug for TripwireKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TripwireKey")
    }
}

impl SigningKey for TripwireKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let real = self.0.choose_scheme(offered)?;
        Some(Box::new(TripwireSigner(real.scheme())))
    }

    fn public_key(&self) -> Option<rustls_pki_types::SubjectPublicKeyInfoDer<'_>> {
        self.0.public_key()
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.0.algorithm()
    }
}

#[derive(Debug)]
struct TripwireSigner(SignatureScheme);

impl Signer for TripwireSigner {
    fn sign(&self, _message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        TRIPPED.with(|t| t.set(true));
        Err(rustls::Error::General(
            "signature deferred to a key-op worker".into(),
        ))
    }

    fn scheme(&self) -> SignatureScheme {
        self.0
    }
}
