//! A credential: a key reference and the certificate chain that goes with it, loaded and checked
//! together. This is the one place that turns "key + chain" into what rustls serves: every
//! listener certificate (configuration file or management API), the management API's own
//! certificate and a backend client certificate are made here.
//!
//! Loading a credential loads the key (a PKCS#11 URI on the opened token, or a software PKCS#8
//! file), parses the chain, and checks the chain against the key ([`CertChain::validate`]: the
//! leaf is for this key, the chain is in order and signed, every certificate is valid now).
//! [`Credential::certified_key`] then gives the rustls `CertifiedKey`, refusing a key rustls
//! itself finds inconsistent with the leaf.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::sign::{CertifiedKey, SigningKey};

use crate::cert::{CertChain, ChainReport};
use crate::error::Result;
use crate::keyref::{self, KeyBackend, KeyRef, LoadedKey};
use crate::token::Token;

/// A key and its checked chain.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The key, ready to sign (on the token or in software).
    pub key: LoadedKey,
    /// The chain, leaf first.
    pub chain: CertChain,
    /// What the check found: subject, SANs, validity, fingerprint.
    pub report: ChainReport,
}

impl Credential {
    /// Loads `key` (token keys need the opened `token`) and checks `chain` against it at `now`.
    /// The key is loaded first, so a key that is not there is the error rather than the chain.
    pub fn load(
        key: &KeyRef,
        chain: ChainSource<'_>,
        token: Option<&Arc<Token>>,
        now: SystemTime,
    ) -> Result<Credential> {
        let loaded = keyref::load(key, token)?;
        Credential::with_key(loaded, chain.read()?, now)
    }

    /// A credential for an already loaded key (a stand-in for a token key that is not reachable
    /// yet, say): `chain` is checked against `key.spki_der`.
    pub fn with_key(key: LoadedKey, chain: CertChain, now: SystemTime) -> Result<Credential> {
        let report = chain.validate(&key.spki_der, now)?;
        Ok(Credential { key, chain, report })
    }

    /// Where the key lives.
    pub fn backend(&self) -> KeyBackend {
        self.key.backend
    }

    /// The rustls `CertifiedKey` serving this chain with this key.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>> {
        self.certified_key_with(|k| k)
    }

    /// [`Credential::certified_key`] with the signing key wrapped first (by a key that records
    /// each signature's duration, say); the wrapped key must sign as the original does.
    pub fn certified_key_with(
        &self,
        wrap: impl FnOnce(Arc<dyn SigningKey>) -> Arc<dyn SigningKey>,
    ) -> Result<Arc<CertifiedKey>> {
        crate::cert::certified_key(&self.chain, wrap(self.key.signing_key.clone()))
    }
}

/// Where a chain comes from: a PEM file, PEM bytes, or an already parsed chain.
#[derive(Debug, Clone, Copy)]
pub enum ChainSource<'a> {
    /// A PEM file (configuration).
    File(&'a Path),
    /// PEM bytes (an upload, the state directory).
    Pem(&'a [u8]),
}

impl ChainSource<'_> {
    fn read(self) -> Result<CertChain> {
        match self {
            ChainSource::File(path) => CertChain::from_pem_file(path),
            ChainSource::Pem(bytes) => Ok(CertChain::from_pem(bytes)?),
        }
    }
}
