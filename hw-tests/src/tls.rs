//! In-memory TLS: a rustls client and server wired back to back, no sockets.

use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, ProtocolVersion, RootCertStore,
    ServerConfig, ServerConnection, SignatureScheme, SupportedProtocolVersion,
};

/// Serves one certified key whatever the client asks for.
#[derive(Debug)]
pub struct FixedCert(pub Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

pub fn server_config(
    key: Arc<CertifiedKey>,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<Arc<ServerConfig>> {
    let config = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedCert(key)));
    Ok(Arc::new(config))
}

/// A client that verifies the server chain with webpki against `roots` but offers only
/// `schemes` (all of the provider's when empty), so tests can force one signature scheme.
pub fn client_config(
    roots: Arc<RootCertStore>,
    versions: &[&'static SupportedProtocolVersion],
    schemes: &[SignatureScheme],
) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let webpki =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()?;
    let verifier = Arc::new(OnlySchemes {
        inner: webpki,
        schemes: schemes.to_vec(),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Full webpki verification; only the offered signature schemes are narrowed.
#[derive(Debug)]
struct OnlySchemes {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    schemes: Vec<SignatureScheme>,
}

impl ServerCertVerifier for OnlySchemes {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        let all = self.inner.supported_verify_schemes();
        if self.schemes.is_empty() {
            all
        } else {
            all.into_iter()
                .filter(|s| self.schemes.contains(s))
                .collect()
        }
    }
}

/// What a completed handshake negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub version: ProtocolVersion,
    pub suite: rustls::CipherSuite,
    /// Application data sent by the server after the handshake, as the client read it.
    pub echoed: Vec<u8>,
}

/// Runs a full handshake in memory, then sends `b"ping"` from server to client.
pub fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: &str,
) -> Result<Outcome> {
    let name = ServerName::try_from(server_name.to_owned())?;
    let mut c = ClientConnection::new(client, name)?;
    let mut s = ServerConnection::new(server)?;
    for _round in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf)?;
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice())?;
            s.process_new_packets().context("server")?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf)?;
        }
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice())?;
            c.process_new_packets().context("client")?;
        }
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            use std::io::{Read, Write};
            s.writer().write_all(b"ping")?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf)?;
            }
            c.read_tls(&mut buf.as_slice())?;
            c.process_new_packets()?;
            let mut echoed = vec![0u8; 4];
            c.reader().read_exact(&mut echoed)?;
            let version = c.protocol_version().context("no version")?;
            let suite = c.negotiated_cipher_suite().context("no suite")?.suite();
            return Ok(Outcome {
                version,
                suite,
                echoed,
            });
        }
    }
    bail!("handshake did not complete in 20 rounds")
}
