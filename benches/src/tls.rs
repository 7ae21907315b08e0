//! The one place that builds the generator's rustls client configuration.
//!
//! The configuration is parsed and built once; each concurrency slot clones it (cheap: the
//! provider, verifier and roots are shared `Arc`s) only to give itself its own session store.

use std::fs::File;
use std::io::BufReader;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, Tls12Resumption as RustlsTls12Resumption};
use rustls::crypto::{aws_lc_rs, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme, SupportedProtocolVersion,
};

use crate::cli::{Args, Group, Mode, Tls12Resumption, TlsVersion};

/// TLS 1.3 tickets kept per server name. The server replaces each ticket it accepts, so a slot
/// needs only a few.
const SESSIONS_PER_SLOT: usize = 8;

/// Builds the provider restricted to the requested group and suites.
pub fn provider(args: &Args) -> Result<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    let chosen = match args.group {
        Group::X25519 => aws_lc_rs::kx_group::X25519,
        Group::Secp256r1 => aws_lc_rs::kx_group::SECP256R1,
        Group::Secp384r1 => aws_lc_rs::kx_group::SECP384R1,
        Group::X25519Mlkem768 => aws_lc_rs::kx_group::X25519MLKEM768,
    };
    provider.kx_groups = vec![chosen];
    if args.tls != Some(TlsVersion::V13) {
        // In TLS 1.2 the supported-groups list also names the curves the client accepts for
        // ECDSA certificates, and OpenSSL-based servers refuse a P-256 certificate to a client
        // that lists only X25519. Listing the certificate curves after the chosen group keeps
        // the chosen group first (the one the servers pick, and the only TLS 1.3 key share).
        for curve in [
            aws_lc_rs::kx_group::SECP256R1,
            aws_lc_rs::kx_group::SECP384R1,
        ] {
            if curve.name() != chosen.name() {
                provider.kx_groups.push(curve);
            }
        }
    }
    if !args.suites.is_empty() {
        let available = provider.cipher_suites.clone();
        let mut chosen = Vec::with_capacity(args.suites.len());
        for wanted in &args.suites {
            let found = available
                .iter()
                .find(|s| format!("{:?}", s.suite()).eq_ignore_ascii_case(wanted.trim()));
            match found {
                Some(s) => chosen.push(*s),
                None => {
                    let names: Vec<String> = available
                        .iter()
                        .map(|s| format!("{:?}", s.suite()))
                        .collect();
                    bail!(
                        "unknown --suite {wanted:?}; available: {}",
                        names.join(", ")
                    );
                }
            }
        }
        provider.cipher_suites = chosen;
    }
    Ok(provider)
}

/// Builds the shared client configuration (resumption off; see [`for_slot`]).
pub fn client_config(args: &Args) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(provider(args)?);
    let versions: &[&'static SupportedProtocolVersion] = match args.tls {
        Some(TlsVersion::V12) => &[&rustls::version::TLS12],
        Some(TlsVersion::V13) => &[&rustls::version::TLS13],
        None => rustls::DEFAULT_VERSIONS,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("no offered suite fits the offered TLS versions (check --tls and --suite)")?;
    let mut config = if args.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(InsecureVerifier {
                algorithms: provider.signature_verification_algorithms,
                seen: AtomicU64::new(0),
            }))
            .with_no_client_auth()
    } else {
        let Some(path) = &args.ca else {
            bail!("give --ca FILE or --insecure-skip-verify");
        };
        builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth()
    };
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The configuration one slot uses: its own session store in resume mode, so every slot
/// resumes its own session and the slots never compete for single-use TLS 1.3 tickets.
pub fn for_slot(base: &Arc<ClientConfig>, args: &Args) -> Arc<ClientConfig> {
    if args.mode != Mode::Resume {
        return base.clone();
    }
    let mut config = (**base).clone();
    config.resumption = Resumption::in_memory_sessions(SESSIONS_PER_SLOT).tls12_resumption(
        match args.tls12_resumption {
            Tls12Resumption::Ids => RustlsTls12Resumption::SessionIdOnly,
            Tls12Resumption::Tickets => RustlsTls12Resumption::SessionIdOrTickets,
        },
    );
    Arc::new(config)
}

pub fn server_name(sni: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(sni.to_owned())
        .with_context(|| format!("--sni {sni:?} is not a DNS name or IP address"))
}

fn load_roots(path: &std::path::Path) -> Result<RootCertStore> {
    let file = File::open(path).with_context(|| format!("open --ca {}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let mut found = 0usize;
    for cert in rustls_pki_types::pem::PemObject::pem_reader_iter(BufReader::new(file)) {
        let cert: CertificateDer<'static> =
            cert.with_context(|| format!("parse PEM in --ca {}", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("bad certificate in --ca {}", path.display()))?;
        found += 1;
    }
    if found == 0 {
        bail!("--ca {} holds no certificate", path.display());
    }
    Ok(roots)
}

/// Of the handshake signatures `--insecure-skip-verify` skips, every this-many-th (and the first)
/// is still verified: a signer that returns garbage (a broken HSM path) fails the run at once,
/// at a cost per handshake of a 1/1024th of a signature check.
pub const SIGNATURE_SPOT_CHECK_EVERY: u64 = 1024;

/// `--insecure-skip-verify`: no chain, name or expiry check, and the handshake signature checked
/// only on a sample (see [`SIGNATURE_SPOT_CHECK_EVERY`]), so that the generator spends its CPU
/// on what the server must also do (key exchange, key schedule, records, TCP) and a two-core
/// run is limited by the server rather than by the client.
#[derive(Debug)]
struct InsecureVerifier {
    algorithms: WebPkiSupportedAlgorithms,
    seen: AtomicU64,
}

impl InsecureVerifier {
    fn spot_check(&self) -> bool {
        self.seen
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SIGNATURE_SPOT_CHECK_EVERY)
    }
}

impl ServerCertVerifier for InsecureVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.spot_check() {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        } else {
            Ok(HandshakeSignatureValid::assertion())
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.spot_check() {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        } else {
            Ok(HandshakeSignatureValid::assertion())
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
