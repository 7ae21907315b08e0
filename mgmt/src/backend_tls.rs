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

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use rustls::pki_types::ServerName;
use rustls::sign::SingleCertAndKey;
use rustls::ClientConfig;
use tlsgate_dataplane::conn::BackendTls;
use tlsgate_keystore::keyref::KeyBackend;
use tlsgate_keystore::token::Token;

pub use crate::config::BackendTlsConfig;
use crate::config::Config;

/// The data plane's backend TLS settings for listener `i`, or `None` when it has none.
pub fn build(config: &Config, i: usize, token: Option<&Arc<Token>>) -> Result<Option<BackendTls>> {
    let Some(l) = config.listeners.get(i) else {
        return Ok(None);
    };
    let Some(bt) = &l.backend_tls else {
        return Ok(None);
    };
    let at = format!("listener[{i}].backend_tls ({})", l.name);
    build_with(config, bt, &at, token).map(Some)
}

/// The data plane's backend TLS settings from `bt` (`at` names it in errors and logs).
pub fn build_with(
    config: &Config,
    bt: &BackendTlsConfig,
    at: &str,
    token: Option<&Arc<Token>>,
) -> Result<BackendTls> {
    let at = at.to_string();
    let ca_path = config.resolve(&bt.ca);
    let roots = crate::credential::load_roots(&ca_path).with_context(|| format!("{at}.ca"))?;
    let server_name = ServerName::try_from(bt.server_name.clone())
        .with_context(|| format!("{at}.server_name: {:?}", bt.server_name))?;
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .with_context(|| at.clone())?
        .with_root_certificates(roots);
    let mut offload_key_ops = false;
    let client_config = match (&bt.chain, &bt.key) {
        (Some(chain), Some(key)) => {
            let cred = crate::credential::load_credential(
                config,
                &at,
                key,
                chain,
                token,
                SystemTime::now(),
            )?;
            offload_key_ops = cred.backend() == KeyBackend::Pkcs11;
            tracing::info!(at = %at, subject = %cred.report.subject, key = %key, "backend client certificate loaded");
            let ck = cred
                .certified_key()
                .with_context(|| format!("{at}.chain"))?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(ck)))
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("{at}: `chain` and `key` go together"),
    };
    Ok(BackendTls {
        config: Arc::new(client_config),
        server_name,
        offload_key_ops,
    })
}
