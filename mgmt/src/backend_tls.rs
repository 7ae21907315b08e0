//! `[listener.backend_tls]`: TLS from tlsgate to a listener's backend, with the backend zone's own
//! CA bundle, the name its certificate must carry, and optionally a client certificate whose key
//! may be on the token.
//!
//! ```toml
//! [listener.backend_tls]
//! ca = "certs/backend-zone-ca.pem"      # trust anchors for the backend's certificate (only these)
//! server_name = "app.internal"          # DNS name or IP address the certificate must name
//! chain = "certs/tlsgate-client.pem"    # optional client certificate chain, leaf first
//! key = "pkcs11:token=lab;object=tlsgate-client;type=private"   # or file:PATH; with chain
//! ```
//!
//! A token client key never signs on the io thread: while the backend handshake runs, the
//! connection core hands the backend's records (and the `rustls::ClientConnection`, which signs
//! for a CertificateRequest inside `process_new_packets`) to the key-op pool, as it does for
//! client handshakes (`BackendTls::offload_key_ops`). A software key signs inline. The client
//! configuration keeps rustls's in-memory session store, so most backend handshakes resume and
//! need no client signature.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::SingleCertAndKey;
use rustls::{ClientConfig, RootCertStore};
use serde::Deserialize;
use tlsgate_dataplane::conn::BackendTls;
use tlsgate_keystore::cert::CertChain;
use tlsgate_keystore::keyref::{self, KeyRef};
use tlsgate_keystore::token::Token;

use crate::config::Config;

/// `[listener.backend_tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsConfig {
    /// PEM bundle of the CA certificates the backend's chain must lead to.
    pub ca: std::path::PathBuf,
    /// The name (DNS name or IP address) the backend's certificate must carry; sent as SNI when
    /// it is a DNS name.
    pub server_name: String,
    /// Client certificate chain (PEM, leaf first) for backends that require one.
    pub chain: Option<std::path::PathBuf>,
    /// Its key: `pkcs11:` URI on the token, or `file:PATH` (software key).
    pub key: Option<String>,
}

impl BackendTlsConfig {
    /// Load-time checks that need no files: `server_name` is a name, `chain` and `key` come
    /// together, `key` parses. Returns whether the key is on the token.
    pub fn check(&self) -> Result<bool, (&'static str, String)> {
        if ServerName::try_from(self.server_name.as_str()).is_err() {
            return Err((
                "server_name",
                format!("{:?} is not a DNS name or an IP address", self.server_name),
            ));
        }
        match (&self.chain, &self.key) {
            (None, None) => Ok(false),
            (Some(_), None) => Err((
                "key",
                "`chain` is set without `key`: set both or neither".into(),
            )),
            (None, Some(_)) => Err((
                "chain",
                "`key` is set without `chain`: set both or neither".into(),
            )),
            (Some(_), Some(k)) => {
                let key: KeyRef = k
                    .parse()
                    .map_err(|e| ("key", format!("{e}; use a pkcs11: URI or file:PATH")))?;
                Ok(matches!(key, KeyRef::Pkcs11(_)))
            }
        }
    }
}

/// The data plane's backend TLS settings for listener `i`, or `None` when it has none.
pub fn build(config: &Config, i: usize, token: Option<&Arc<Token>>) -> Result<Option<BackendTls>> {
    let Some(l) = config.listeners.get(i) else {
        return Ok(None);
    };
    let Some(bt) = &l.backend_tls else {
        return Ok(None);
    };
    let at = format!("listener[{i}].backend_tls ({})", l.name);
    let ca_path = config.resolve(&bt.ca);
    let roots = load_roots(&ca_path).with_context(|| format!("{at}.ca"))?;
    let server_name = ServerName::try_from(bt.server_name.clone())
        .with_context(|| format!("{at}.server_name: {:?}", bt.server_name))?;
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .with_context(|| at.clone())?
        .with_root_certificates(roots);
    let mut offload_key_ops = false;
    let client_config = match (&bt.chain, &bt.key) {
        (Some(chain), Some(key)) => {
            let key_ref: KeyRef = key.parse().with_context(|| format!("{at}.key"))?;
            let key_ref = match key_ref {
                KeyRef::File(p) => KeyRef::File(config.resolve(&p)),
                other => other,
            };
            offload_key_ops = matches!(key_ref, KeyRef::Pkcs11(_));
            let loaded =
                keyref::load(&key_ref, token).with_context(|| format!("{at}.key: {key}"))?;
            let chain_path = config.resolve(chain);
            let chain = CertChain::from_pem_file(&chain_path)
                .with_context(|| format!("{at}.chain: {}", chain_path.display()))?;
            let report = chain
                .validate(&loaded.spki_der, SystemTime::now())
                .with_context(|| format!("{at}.chain: {}", chain_path.display()))?;
            tracing::info!(listener = %l.name, subject = %report.subject, key = %key, "backend client certificate loaded");
            let ck = tlsgate_keystore::cert::certified_key(&chain, loaded.signing_key)
                .with_context(|| format!("{at}.chain"))?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(ck)))
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("{at}: `chain` and `key` go together"),
    };
    Ok(Some(BackendTls {
        config: Arc::new(client_config),
        server_name,
        offload_key_ops,
    }))
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>> {
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

    fn cfg(chain: Option<&str>, key: Option<&str>, name: &str) -> BackendTlsConfig {
        BackendTlsConfig {
            ca: "ca.pem".into(),
            server_name: name.into(),
            chain: chain.map(Into::into),
            key: key.map(Into::into),
        }
    }

    #[test]
    fn load_time_checks_name_the_key() {
        assert_eq!(cfg(None, None, "app.internal").check(), Ok(false));
        assert_eq!(cfg(None, None, "10.0.0.1").check(), Ok(false));
        assert_eq!(
            cfg(
                Some("c.pem"),
                Some("pkcs11:token=lab;object=c;type=private"),
                "a"
            )
            .check(),
            Ok(true)
        );
        assert_eq!(
            cfg(None, None, "not a name").check().map_err(|e| e.0),
            Err("server_name")
        );
        assert_eq!(
            cfg(Some("c.pem"), None, "a").check().map_err(|e| e.0),
            Err("key")
        );
        assert_eq!(
            cfg(None, Some("file:k.pem"), "a").check().map_err(|e| e.0),
            Err("chain")
        );
        assert_eq!(
            cfg(Some("c.pem"), Some("pkcs11:tokn=x"), "a")
                .check()
                .map_err(|e| e.0),
            Err("key")
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("empty.pem");
        std::fs::write(&p, "nothing here\n").expect("write");
        let err = load_roots(&p).expect_err("no CA");
        assert!(format!("{err:#}").contains("no CERTIFICATE"), "{err:#}");
    }
}
