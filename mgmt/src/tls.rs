//! Builds the rustls server configurations. The only place in the process that assembles a
//! `CryptoProvider`: aws-lc-rs, its AEAD suites and ECDHE groups (X25519MLKEM768 included).

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// Errors while assembling a server configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the provider or protocol versions.
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider for every listener: aws-lc-rs with its default (all AEAD, all ECDHE)
/// suites and groups.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server configuration serving `certs` (ECDSA and RSA side by side allowed), TLS 1.2 and 1.3.
pub fn server_config(certs: Vec<Arc<CertifiedKey>>) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SchemeResolver { certs }));
    // The backend sees plain bytes; ALPN-based routing comes with the policy work.
    config.ignore_client_order = false;
    Ok(Arc::new(config))
}

/// Serves the first certificate whose key can sign with a scheme the client offered, so one
/// listener can carry an ECDSA and an RSA certificate for the same names.
#[derive(Debug)]
struct SchemeResolver {
    certs: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SchemeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = hello.signature_schemes();
        self.certs
            .iter()
            .find(|c| c.key.choose_scheme(offered).is_some())
            .cloned()
    }
}
