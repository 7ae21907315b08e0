//! Client-certificate authentication per listener: the listener's own CA bundle (its trust
//! zone) and CRLs, checked by rustls's `WebPkiClientVerifier` (chain to one of the listener's
//! CAs, validity window, revocation).
//!
//! Revocation: with at least one CRL, every certificate of the client's chain below the trust
//! anchor must be covered by a CRL from its issuer; a certificate whose issuer published no CRL
//! here is refused (unknown status fails closed). Without CRLs, no revocation check is made.
//! CRLs come from the configuration file (re-read on SIGHUP) and from the management API
//! ([`crate::tls::ListenerTls::extra_crls`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::FromDer;

/// Whether a client must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// No certificate, no handshake.
    Required,
    /// A client without a certificate gets in; one that presents a certificate must pass.
    Optional,
}

/// `[listener.client_auth]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// `required` or `optional`.
    pub mode: ClientAuthMode,
    /// PEM bundle of the CA certificates this listener trusts for clients (and only those).
    pub ca: PathBuf,
    /// CRL files (PEM `X509 CRL` blocks or DER), each issued by a CA of the bundle.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
}

/// Why client authentication cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientAuthError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA bundle is empty or not PEM certificates.
    #[error("{}: {why}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A CRL that does not parse or belongs to no CA of the bundle.
    #[error("{what}: {why}")]
    BadCrl {
        /// The file, or where the CRL came from.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the verifier.
    #[error("cannot build the client-certificate verifier: {0}")]
    Verifier(String),
}

/// A listener's loaded client-authentication settings.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// Required or optional.
    pub mode: ClientAuthMode,
    /// The listener's CAs.
    pub roots: Arc<RootCertStore>,
    /// Subjects (DER) of the CAs, to check where CRLs come from.
    ca_subjects: Vec<Vec<u8>>,
    /// CRLs from the configuration file.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

impl ClientAuth {
    /// Loads the CA bundle and CRL files; `resolve` anchors relative paths.
    pub fn load(
        cfg: &ClientAuthConfig,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<ClientAuth, ClientAuthError> {
        let ca_path = resolve(&cfg.ca);
        let bytes = std::fs::read(&ca_path).map_err(|source| ClientAuthError::Read {
            path: ca_path.clone(),
            source,
        })?;
        let bad_ca = |why: String| ClientAuthError::BadCa {
            path: ca_path.clone(),
            why,
        };
        let mut roots = RootCertStore::empty();
        let mut ca_subjects = Vec::new();
        for (i, cert) in CertificateDer::pem_slice_iter(&bytes).enumerate() {
            let cert = cert.map_err(|e| bad_ca(format!("certificate {i}: {e}")))?;
            let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
                .map_err(|e| bad_ca(format!("certificate {i}: {e}")))?;
            ca_subjects.push(parsed.subject().as_raw().to_vec());
            roots.add(cert.clone()).map_err(|e| {
                bad_ca(format!("certificate {i} is not a usable trust anchor: {e}"))
            })?;
        }
        if roots.is_empty() {
            return Err(bad_ca(
                "no PEM CERTIFICATE in the CA bundle: client_auth.ca must hold the CA certificate(s) that issue client certificates".into(),
            ));
        }
        let mut auth = ClientAuth {
            mode: cfg.mode,
            roots: Arc::new(roots),
            ca_subjects,
            crls: Vec::new(),
        };
        for p in &cfg.crls {
            let path = resolve(p);
            let bytes = std::fs::read(&path).map_err(|source| ClientAuthError::Read {
                path: path.clone(),
                source,
            })?;
            let crls = parse_crls(&bytes).map_err(|why| ClientAuthError::BadCrl {
                what: path.display().to_string(),
                why,
            })?;
            for crl in crls {
                auth.check_crl(&crl)
                    .map_err(|why| ClientAuthError::BadCrl {
                        what: path.display().to_string(),
                        why,
                    })?;
                auth.crls.push(crl);
            }
        }
        Ok(auth)
    }

    /// Whether `crl` parses and is issued by one of this listener's CAs.
    pub fn check_crl(&self, crl: &CertificateRevocationListDer<'_>) -> Result<(), String> {
        let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl)
            .map_err(|e| format!("not a CRL: {e}"))?;
        if !self
            .ca_subjects
            .iter()
            .any(|s| s.as_slice() == parsed.issuer().as_raw())
        {
            return Err(format!(
                "CRL issued by \"{}\", which is not a CA of this listener's client_auth.ca bundle",
                parsed.issuer()
            ));
        }
        Ok(())
    }

    /// The verifier for a listener with this provider, with the file CRLs and `extra` (from the
    /// management API). An API CRL that fails [`ClientAuth::check_crl`] is an error too: a
    /// listener never runs with a CRL it cannot use.
    pub fn verifier(
        &self,
        provider: Arc<rustls::crypto::CryptoProvider>,
        extra: &[CertificateRevocationListDer<'static>],
    ) -> Result<Arc<dyn ClientCertVerifier>, ClientAuthError> {
        for (i, crl) in extra.iter().enumerate() {
            self.check_crl(crl).map_err(|why| ClientAuthError::BadCrl {
                what: format!("uploaded CRL {i}"),
                why,
            })?;
        }
        let mut builder = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider)
            .with_crls(self.crls.iter().chain(extra).cloned());
        if self.mode == ClientAuthMode::Optional {
            builder = builder.allow_unauthenticated();
        }
        builder
            .build()
            .map_err(|e| ClientAuthError::Verifier(e.to_string()))
    }
}

/// CRLs from PEM (`-----BEGIN X509 CRL-----` blocks) or a single DER CRL.
pub fn parse_crls(bytes: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad PEM: {e}"))?;
        if crls.is_empty() {
            return Err("no `X509 CRL` PEM block".into());
        }
        Ok(crls)
    } else if bytes.is_empty() {
        Err("empty file".into())
    } else {
        Ok(vec![CertificateRevocationListDer::from(bytes.to_vec())])
    }
}
