//! Builds the rustls server configurations from a listener's policy profile
//! ([`crate::tls::policy`], the one place that assembles a `CryptoProvider`), certificates and
//! client-certificate settings ([`crate::tls::client_auth`]).
//!
//! A listener serves [`ServedCert`]s: each answers for a set of names (exact or `*.` wildcard),
//! and those marked `default` answer a client that sends no SNI or a name nobody serves. Within
//! one name, the first certificate whose key can sign with a scheme the client offered wins, so
//! an ECDSA and an RSA certificate can serve the same name side by side.

pub mod client_auth;
pub mod ocsp;
pub mod policy;
mod resolver;
pub mod session;
pub mod stapler;

use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

pub use resolver::{Served, SniResolver};

/// Errors while assembling a server configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the provider or protocol versions.
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate settings cannot be used.
    #[error(transparent)]
    ClientAuth(#[from] crate::tls::client_auth::ClientAuthError),
    /// No certificate can answer a client that sends no (or an unknown) name.
    #[error("no default certificate: mark one certificate `default = true` or serve only one")]
    NoDefault,
    /// A name is not a DNS name or a `*.` wildcard of one.
    #[error("{0:?} is not a DNS name or a `*.`-prefixed wildcard")]
    BadName(String),
}

/// One certificate as a listener serves it.
#[derive(Debug, Clone)]
pub struct ServedCert {
    /// The chain and its (token or software) key.
    pub key: Arc<CertifiedKey>,
    /// DNS names (lower case; `*.example.com` matches exactly one more label) this certificate
    /// answers for. Usually the leaf's DNS SANs.
    pub names: Arc<[String]>,
    /// Answers clients without SNI, and with unknown SNI unless the listener refuses those.
    pub default: bool,
}

/// What a listener does with a ClientHello whose SNI no certificate serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSni {
    /// Serve the default certificate(s).
    #[default]
    Default,
    /// End the handshake with an `unrecognized_name` alert.
    Refuse,
}

/// Per-listener TLS settings beyond the certificates.
#[derive(Debug, Clone, Default)]
pub struct ListenerTls {
    /// Unknown SNI handling.
    pub unknown_sni: UnknownSni,
    /// CRLs uploaded through the management API for this listener, checked (with the config
    /// file's CRLs) when the listener verifies client certificates.
    pub extra_crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
    /// Versions, suites and groups (`intermediate` by default).
    pub policy: crate::tls::policy::TlsPolicy,
    /// Client-certificate authentication; none when absent.
    pub client_auth: Option<crate::tls::client_auth::ClientAuth>,
    /// Session tickets and cache (`crate::tls::session`); `None` leaves rustls's defaults.
    pub session: Option<Arc<crate::tls::session::ListenerSessions>>,
}

/// The crypto provider of the default (`intermediate`) policy.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    crate::tls::policy::TlsPolicy::default().provider()
}

/// The data plane's check for `unknown_sni = "refuse"`: answers whether a ClientHello's SNI is
/// served, so the handshake of an unknown name ends with `unrecognized_name`. `None` when the
/// listener serves every name (with its defaults).
pub fn sni_filter(
    certs: &[ServedCert],
    opts: &ListenerTls,
) -> Result<Option<tlsgate_dataplane::SniFilter>, TlsConfigError> {
    if opts.unknown_sni == UnknownSni::Default {
        return Ok(None);
    }
    Ok(sni_filter_of(
        &Served::new(certs.iter().cloned().collect(), opts)?,
        opts,
    ))
}

/// [`sni_filter`] answered by a listener's resolver (the one its configuration serves with).
pub fn sni_filter_of(served: &Served, opts: &ListenerTls) -> Option<tlsgate_dataplane::SniFilter> {
    if opts.unknown_sni == UnknownSni::Default {
        return None;
    }
    let resolver = served.resolver.clone();
    Some(tlsgate_dataplane::SniFilter::new(move |sni| {
        resolver.knows(sni)
    }))
}

/// The data plane's re-check of a resumed session of `listener`: its client certificate
/// against the current CA bundle and CRLs, and a session without one against a `required` mode
/// (`None` without client authentication). Each refusal is counted and logged
/// ([`crate::tls::session::policy::refused`]).
pub fn client_cert_check(
    listener: &str,
    opts: &ListenerTls,
) -> Result<Option<tlsgate_dataplane::ClientCertCheck>, TlsConfigError> {
    use crate::tls::session::policy::{refused, Refusal};
    let Some(auth) = &opts.client_auth else {
        return Ok(None);
    };
    let verifier = auth.verifier(opts.policy.provider(), &opts.extra_crls)?;
    let required = auth.mode == crate::tls::client_auth::ClientAuthMode::Required;
    let listener = listener.to_owned();
    Ok(Some(tlsgate_dataplane::ClientCertCheck::of_sessions(
        move |chain| {
            let (ok, reason) = match chain {
                None => (!required, Refusal::NoClientCertificate),
                Some(chain) => (
                    chain
                        .split_first()
                        .is_some_and(|(end_entity, intermediates)| {
                            verifier
                                .verify_client_cert(
                                    end_entity,
                                    intermediates,
                                    rustls_pki_types::UnixTime::now(),
                                )
                                .is_ok()
                        }),
                    Refusal::ClientCertificateRejected,
                ),
            };
            if !ok {
                refused(&listener, reason);
            }
            ok
        },
    )))
}

/// A server configuration serving `certs` under `opts.policy`. When none is marked default, all
/// are (the order still sets the preference).
pub fn server_config(
    certs: Vec<ServedCert>,
    opts: &ListenerTls,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    server_config_of(&Served::new(certs.into(), opts)?, opts)
}

/// The server configuration of `served` (its resolver, made for `opts`) under `opts.policy`.
pub fn server_config_of(
    served: &Served,
    opts: &ListenerTls,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = opts.policy.provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(opts.policy.versions())?;
    let builder = match &opts.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => builder.with_client_cert_verifier(auth.verifier(provider, &opts.extra_crls)?),
    };
    let mut config = builder.with_cert_resolver(served.resolver.clone());
    config.ignore_client_order = false;
    if let Some(s) = &opts.session {
        s.apply(
            &mut config,
            crate::tls::client_auth::ClientAuth::policy_of(opts.client_auth.as_ref()),
        );
    }
    Ok(Arc::new(config))
}

/// The configuration of a listener with no certificate yet (no `[[listener.certificate]]` and no
/// binding): every handshake ends with a `handshake_failure` alert.
pub fn no_certificate_config() -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    #[derive(Debug)]
    struct NoCertificate;
    impl rustls::server::ResolvesServerCert for NoCertificate {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    Ok(Arc::new(config))
}

/// Normalises a configured name: lower case, no trailing dot; `*.` only as the whole first label.
pub fn normalize_name(name: &str) -> Result<String, TlsConfigError> {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    let rest = n.strip_prefix("*.").unwrap_or(&n);
    let ok = !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(n)
    } else {
        Err(TlsConfigError::BadName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_and_checked() {
        assert_eq!(
            normalize_name("WWW.Example.com.").expect("ok"),
            "www.example.com"
        );
        assert_eq!(
            normalize_name("*.example.com").expect("ok"),
            "*.example.com"
        );
        for bad in ["", "*.", "a..b", "*.*.x", "a b", "x.*.y"] {
            assert!(normalize_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
