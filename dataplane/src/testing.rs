//! Helpers for tests and benchmarks of the data plane, kept in the library so other crates'
//! tests (hw-tests, benches) reuse them.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

/// A signing key that takes at least `delay` per signature (it sleeps, like a thread waiting on
/// an HSM), then signs with the wrapped key. Counts its signatures. The delay can be changed while
/// it is in use ([`SlowSigningKey::delay_control`]), so one test can alternate a fast and a slow
/// "HSM" under one continuous load.
pub struct SlowSigningKey {
    inner: Arc<dyn SigningKey>,
    delay: DelayControl,
    signatures: Arc<AtomicU64>,
}

/// Sets the delay of a [`SlowSigningKey`] (and of the signers it already handed out).
#[derive(Debug, Clone)]
pub struct DelayControl(Arc<AtomicU64>);

impl DelayControl {
    /// Every signature from now on sleeps `delay` first.
    pub fn set(&self, delay: Duration) {
        self.0.store(
            u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

impl SlowSigningKey {
    /// Wraps `inner`; every signature sleeps `delay` first.
    pub fn new(inner: Arc<dyn SigningKey>, delay: Duration) -> Self {
        let control = DelayControl(Arc::new(AtomicU64::new(0)));
        control.set(delay);
        Self {
            inner,
            delay: control,
            signatures: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The handle that changes this key's delay.
    pub fn delay_control(&self) -> DelayControl {
        self.delay.clone()
    }

    /// A shared counter of signatures made through this key (and its clones' signers).
    pub fn signature_counter(&self) -> Arc<AtomicU64> {
        self.signatures.clone()
    }
}

impl fmt::Debug for SlowSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlowSigningKey")
            .field("delay", &self.delay.get())
            .finish_non_exhaustive()
    }
}

impl SigningKey for SlowSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let inner = self.inner.choose_scheme(offered)?;
        Some(Box::new(SlowSigner {
            inner,
            delay: self.delay.clone(),
            signatures: self.signatures.clone(),
        }))
    }

    fn public_key(&self) -> Option<rustls_pki_types::SubjectPublicKeyInfoDer<'_>> {
        self.inner.public_key()
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.inner.algorithm()
    }
}

struct SlowSigner {
    inner: Box<dyn Signer>,
    delay: DelayControl,
    signatures: Arc<AtomicU64>,
}

impl fmt::Debug for SlowSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SlowSigner")
    }
}

impl Signer for SlowSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        std::thread::sleep(self.delay.get());
        self.signatures.fetch_add(1, Ordering::Relaxed);
        self.inner.sign(message)
    }

    fn scheme(&self) -> SignatureScheme {
        self.inner.scheme()
    }
}

/// Always answers with one certified key (a `ResolvesServerCert` for tests that wrap keys).
#[derive(Debug)]
pub struct FixedCert(pub Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
