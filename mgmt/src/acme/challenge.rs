//! The challenges in flight, shared by the ACME task (which adds and removes them) and the
//! places that answer them: the data plane (`tls-alpn-01`, through [`AcmeTlsAlpn`]) and the
//! `http-01` listener. A challenge is live as soon as it is added: no snapshot is rebuilt.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tlsgate_dataplane::{AcmeTlsAlpn, SniFilter, ACME_TLS_ALPN};
use zeroize::Zeroizing;

/// Pending challenges by name (`tls-alpn-01`) and by token (`http-01`).
#[derive(Debug, Default)]
pub struct Challenges {
    tls_alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    http01: RwLock<HashMap<String, String>>,
}

impl Challenges {
    pub fn new() -> Arc<Challenges> {
        Arc::new(Challenges::default())
    }

    /// Makes the RFC 8737 challenge certificate for `name` (self-signed, a fresh software key:
    /// it proves control of the name, not of the token key; the `acmeIdentifier` extension
    /// holds the SHA-256 of the key authorization) and serves it from now on.
    pub fn add_tls_alpn(&self, name: &str, digest: &[u8]) -> Result<()> {
        if digest.len() != 32 {
            bail!(
                "key authorization digest of {} bytes, expected 32",
                digest.len()
            );
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("challenge key")?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])
            .context("challenge certificate name")?;
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
        let cert = params.self_signed(&key).context("challenge certificate")?;
        let der = Zeroizing::new(key.serialize_der());
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()));
        let signing = crate::tls::provider()
            .key_provider
            .load_private_key(pkcs8)
            .context("challenge key into rustls")?;
        let certified = CertifiedKey::new(vec![CertificateDer::from(cert.der().to_vec())], signing);
        self.tls_alpn
            .write()
            .insert(name.to_ascii_lowercase(), Arc::new(certified));
        Ok(())
    }

    pub fn remove_tls_alpn(&self, name: &str) {
        self.tls_alpn.write().remove(&name.to_ascii_lowercase());
    }

    /// Whether a `tls-alpn-01` challenge is pending for `name`.
    pub fn tls_alpn_pending(&self, name: &str) -> bool {
        self.tls_alpn
            .read()
            .contains_key(&name.to_ascii_lowercase())
    }

    pub fn add_http01(&self, token: &str, key_authorization: &str) {
        self.http01
            .write()
            .insert(token.to_owned(), key_authorization.to_owned());
    }

    pub fn remove_http01(&self, token: &str) {
        self.http01.write().remove(token);
    }

    /// The key authorization to answer `GET /.well-known/acme-challenge/<token>` with.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http01.read().get(token).cloned()
    }

    /// What a listener that answers `tls-alpn-01` gets in its snapshot.
    pub fn data_plane(self: &Arc<Self>) -> Result<AcmeTlsAlpn> {
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .context("tls-alpn-01 configuration")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        // A validation is one handshake: nothing to resume.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        let pending = self.clone();
        Ok(AcmeTlsAlpn {
            tls: Arc::new(config),
            pending: SniFilter::new(move |sni| sni.is_some_and(|n| pending.tls_alpn_pending(n))),
        })
    }
}

impl crate::fleet::acme::ChallengeSink for Challenges {
    fn add_tls_alpn(&self, name: &str, digest: &[u8]) -> Result<()> {
        Challenges::add_tls_alpn(self, name, digest)
    }
    fn remove_tls_alpn(&self, name: &str) {
        Challenges::remove_tls_alpn(self, name)
    }
    fn add_http01(&self, token: &str, key_authorization: &str) {
        Challenges::add_http01(self, token, key_authorization)
    }
    fn remove_http01(&self, token: &str) {
        Challenges::remove_http01(self, token)
    }
}

#[derive(Debug)]
struct Resolver(Arc<Challenges>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        self.0
            .tls_alpn
            .read()
            .get(&name.to_ascii_lowercase())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_certificate_carries_the_acme_identifier() {
        let c = Challenges::new();
        let digest = [7u8; 32];
        c.add_tls_alpn("Www.Example.com", &digest).expect("made");
        assert!(c.tls_alpn_pending("www.example.com"));
        let key = c
            .tls_alpn
            .read()
            .get("www.example.com")
            .cloned()
            .expect("stored");
        let (_, cert) = x509_parser::parse_x509_certificate(&key.cert[0]).expect("parses");
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
        // OCTET STRING (04 20) of the digest.
        assert_eq!(&ext.value[..2], &[0x04, 0x20]);
        assert_eq!(&ext.value[2..], &digest);
        assert!(c.add_tls_alpn("x.example", &[1u8; 31]).is_err());
        c.remove_tls_alpn("WWW.example.com");
        assert!(!c.tls_alpn_pending("www.example.com"));
    }
}
