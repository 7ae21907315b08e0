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

use crate::tls::session::PolicyDigest;

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
    /// The mode and CAs as sessions record them (not the CRLs: see [`crate::tls::session::policy`]).
    policy: PolicyDigest,
}

impl ClientAuth {
    /// Loads the CA bundle and CRL files; `resolve` anchors relative paths.
    pub fn load(
        cfg: &ClientAuthConfig,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<ClientAuth, ClientAuthError> {
        ClientAuth::load_with(cfg, resolve, None)
    }

    /// As [`ClientAuth::load`], with `uploaded` (a PEM bundle from the management API) in place
    /// of the file `cfg.ca`; the mode and CRL files stay the configuration's.
    pub fn load_with(
        cfg: &ClientAuthConfig,
        resolve: impl Fn(&Path) -> PathBuf,
        uploaded: Option<&str>,
    ) -> Result<ClientAuth, ClientAuthError> {
        let (ca_path, bytes) = match uploaded {
            Some(pem) => (
                PathBuf::from("the client CA bundle uploaded through the API"),
                pem.as_bytes().to_vec(),
            ),
            None => {
                let ca_path = resolve(&cfg.ca);
                let bytes = std::fs::read(&ca_path).map_err(|source| ClientAuthError::Read {
                    path: ca_path.clone(),
                    source,
                })?;
                (ca_path, bytes)
            }
        };
        let bundle = CaBundle::parse(&bytes).map_err(|why| ClientAuthError::BadCa {
            path: ca_path.clone(),
            why,
        })?;
        let mut auth = ClientAuth {
            mode: cfg.mode,
            policy: PolicyDigest::client_auth(cfg.mode, &bundle.anchors),
            roots: Arc::new(bundle.roots),
            ca_subjects: bundle.subjects,
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
                if let Some(next) = crl_next_update(&crl) {
                    if next < time::OffsetDateTime::now_utc() {
                        // Still used (revocations in it stay true), but the CA has published or
                        // should have published a newer one.
                        tracing::warn!(crl = %path.display(), next_update = %next, "CRL is past its nextUpdate: fetch a current one");
                    }
                }
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

    /// The client-auth policy sessions made under these settings carry.
    pub fn policy_digest(&self) -> PolicyDigest {
        self.policy
    }

    /// The policy digest of a listener with these settings, or without client auth.
    pub fn policy_of(auth: Option<&ClientAuth>) -> PolicyDigest {
        auth.map_or_else(PolicyDigest::no_client_auth, ClientAuth::policy_digest)
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

/// A PEM bundle of CA certificates, checked as trust anchors.
#[derive(Debug)]
pub struct CaBundle {
    pub roots: RootCertStore,
    /// Subjects (DER), in bundle order.
    pub subjects: Vec<Vec<u8>>,
    pub anchors: Vec<CertificateDer<'static>>,
}

impl CaBundle {
    /// Every `CERTIFICATE` block of `bytes`; an error names the first one that is not a usable
    /// trust anchor, or says there is none.
    pub fn parse(bytes: &[u8]) -> Result<CaBundle, String> {
        let mut roots = RootCertStore::empty();
        let mut subjects = Vec::new();
        let mut anchors = Vec::new();
        for (i, cert) in CertificateDer::pem_slice_iter(bytes).enumerate() {
            let cert = cert.map_err(|e| format!("certificate {i}: {e}"))?;
            let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
                .map_err(|e| format!("certificate {i}: {e}"))?;
            subjects.push(parsed.subject().as_raw().to_vec());
            anchors.push(cert.clone());
            roots
                .add(cert)
                .map_err(|e| format!("certificate {i} is not a usable trust anchor: {e}"))?;
        }
        if roots.is_empty() {
            return Err("no PEM CERTIFICATE in the CA bundle: it must hold the CA certificate(s) that issue client certificates".into());
        }
        Ok(CaBundle {
            roots,
            subjects,
            anchors,
        })
    }
}

/// A CRL's `nextUpdate`, when it parses and has one.
pub fn crl_next_update(crl: &CertificateRevocationListDer<'_>) -> Option<time::OffsetDateTime> {
    let (_, parsed) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(crl).ok()?;
    Some(parsed.next_update()?.to_datetime())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{server_config, ListenerTls, ServedCert};
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
        DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
        KeyUsagePurpose, RevokedCertParams, SerialNumber,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    struct Pki {
        ca: CertifiedIssuer<'static, KeyPair>,
        client: (CertificateDer<'static>, PrivateKeyDer<'static>),
        client_serial: u64,
    }

    fn zone(name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} CA"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca");
        let mut c = CertificateParams::new(vec!["client.test".to_owned()]).expect("params");
        c.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        c.serial_number = Some(SerialNumber::from(77u64));
        let key = KeyPair::generate().expect("key");
        let cert = c.signed_by(&key, &ca).expect("client");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Pki {
            ca,
            client: (cert.der().clone(), key),
            client_serial: 77,
        }
    }

    fn crl(pki: &Pki, revoke: bool) -> CertificateRevocationListDer<'static> {
        let now = time::OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoke
                .then(|| RevokedCertParams {
                    serial_number: SerialNumber::from(pki.client_serial),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .into_iter()
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&pki.ca)
        .expect("crl")
        .der()
        .clone()
    }

    fn auth_for(pki: &Pki, dir: &Path) -> ClientAuth {
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, pki.ca.pem()).expect("write");
        ClientAuth::load(
            &ClientAuthConfig {
                mode: ClientAuthMode::Required,
                ca,
                crls: Vec::new(),
            },
            Path::to_owned,
        )
        .expect("load")
    }

    /// An in-memory handshake of `client` (zone `pki`) against a listener with `auth` and
    /// `extra` CRLs; the server's error, if any.
    fn handshake(
        pki: &Pki,
        auth: ClientAuth,
        extra: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<(), rustls::Error> {
        let server_key = KeyPair::generate().expect("key");
        let server_cert = CertificateParams::new(vec!["server.test".to_owned()])
            .expect("params")
            .self_signed(&server_key)
            .expect("cert");
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(server_key.serialize_der()),
        ))
        .expect("signing key");
        let served = ServedCert {
            key: Arc::new(rustls::sign::CertifiedKey::new(
                vec![server_cert.der().clone()],
                signing,
            )),
            names: vec!["server.test".into()].into(),
            default: true,
        };
        let opts = ListenerTls {
            client_auth: Some(auth),
            extra_crls: extra,
            ..Default::default()
        };
        let config = server_config(vec![served], &opts).expect("server config");
        let mut roots = RootCertStore::empty();
        roots.add(server_cert.der().clone()).expect("root");
        let client_config = rustls::ClientConfig::builder_with_provider(
            crate::tls::policy::TlsPolicy::default().provider(),
        )
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![pki.client.0.clone()], pki.client.1.clone_key())
        .expect("client auth");
        let mut client = rustls::ClientConnection::new(
            Arc::new(client_config),
            ServerName::try_from("server.test").expect("name"),
        )
        .expect("client");
        let mut server = rustls::ServerConnection::new(config).expect("server");
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).expect("client write");
            server.read_tls(&mut &buf[..]).expect("server read");
            server.process_new_packets()?;
            let mut buf = Vec::new();
            server.write_tls(&mut buf).expect("server write");
            client.read_tls(&mut &buf[..]).expect("client read");
            let _ = client.process_new_packets();
            if !server.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    #[test]
    fn crls_uploaded_at_run_time_revoke_and_must_come_from_the_listeners_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = zone("zone-a");
        let b = zone("zone-b");
        handshake(&a, auth_for(&a, dir.path()), Vec::new()).expect("zone A client accepted");
        handshake(&a, auth_for(&a, dir.path()), vec![crl(&a, false)])
            .expect("an empty CRL revokes nothing");
        let err = handshake(&a, auth_for(&a, dir.path()), vec![crl(&a, true)])
            .expect_err("revoked by an uploaded CRL");
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        );
        let err = handshake(&b, auth_for(&a, dir.path()), Vec::new()).expect_err("zone B");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
        // A CRL from zone B cannot be attached to a zone A listener.
        let auth = auth_for(&a, dir.path());
        let err = auth
            .verifier(
                crate::tls::policy::TlsPolicy::default().provider(),
                &[crl(&b, true)],
            )
            .expect_err("foreign CRL");
        assert!(
            err.to_string().contains("not a CA of this listener"),
            "{err}"
        );
        let next = crl_next_update(&crl(&a, false)).expect("nextUpdate");
        assert!(next > time::OffsetDateTime::now_utc());
        assert!(parse_crls(b"").is_err());
        assert!(
            parse_crls(b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").is_err()
        );
    }
}
