//! The one way a key reference and a chain named in the configuration file become a checked
//! keystore [`Credential`]: listener certificates, the management API's own certificate and
//! backend client certificates.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use tlsgate_keystore::keyref::KeyRef;
use tlsgate_keystore::token::Token;
use tlsgate_keystore::{ChainSource, Credential};

use crate::config::Config;

/// A key reference as written in the configuration (`pkcs11:...` or `file:PATH`, a relative
/// path taken from the configuration file's folder).
pub fn key_ref(config: &Config, key: &str) -> Result<KeyRef> {
    let key_ref: KeyRef = key.parse()?;
    Ok(match key_ref {
        KeyRef::File(p) => KeyRef::File(config.resolve(&p)),
        other => other,
    })
}

/// Loads the credential of configuration entry `at`: `key` (as written) and the PEM chain at
/// `chain` (relative to the configuration file). Errors name `{at}.key` or `{at}.chain`.
pub fn load_credential(
    config: &Config,
    at: &str,
    key: &str,
    chain: &Path,
    token: Option<&Arc<Token>>,
    now: SystemTime,
) -> Result<Credential> {
    let key_ref = key_ref(config, key).with_context(|| format!("{at}.key"))?;
    let chain_path = config.resolve(chain);
    Credential::load(&key_ref, ChainSource::File(&chain_path), token, now).map_err(|e| {
        let on_chain = match &e {
            tlsgate_keystore::Error::Certificate(_) => true,
            tlsgate_keystore::Error::Io { path, .. } => path == &chain_path,
            _ => false,
        };
        if on_chain {
            anyhow::Error::new(e).context(format!("{at}.chain: {}", chain_path.display()))
        } else {
            anyhow::Error::new(e).context(format!("{at}.key: {key}"))
        }
    })
}

/// A CA bundle (PEM, one or more `CERTIFICATE` blocks) as trust anchors: a backend's CA, the
/// management API's client CA.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: bad PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no CERTIFICATE block", path.display());
    }
    let mut roots = RootCertStore::empty();
    for (n, c) in certs.into_iter().enumerate() {
        roots
            .add(c)
            .with_context(|| format!("{}: certificate {n} is not a usable CA", path.display()))?;
    }
    Ok(Arc::new(roots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("empty.pem");
        std::fs::write(&p, "nothing here\n").expect("write");
        let err = load_roots(&p).expect_err("no CA");
        assert!(format!("{err:#}").contains("no CERTIFICATE"), "{err:#}");
    }
}
