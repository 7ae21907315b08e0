//! Full in-memory TLS 1.3 and 1.2 handshakes with token (and software) keys: the certificate
//! comes from a CSR the key signed, the lab CA issues it, and the rustls client verifies the
//! chain up to the lab root.

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context as _, Result};
use rustls::{ProtocolVersion, SignatureScheme};
use tlsgate_hw_tests::{backends, tls, TestCa};
use tlsgate_keystore::{certified_key, KeySpec};

const NAME: &str = "web.lab.test";

fn handshakes(spec: KeySpec, forced: &[&[SignatureScheme]]) -> Result<()> {
    let ca = TestCa::new()?;
    let roots = ca.roots()?;
    for backend in backends()? {
        let Some(key) = backend.generate(spec, &format!("tls-{spec}"))? else {
            continue;
        };
        let ctx = format!("{spec} on {}", backend.name());
        let csr = key
            .csr(NAME, &[NAME.to_owned(), "127.0.0.1".to_owned()])
            .context(ctx.clone())?;
        let chain = ca.issue_csr(&csr)?;
        let report = chain.validate(&key.spki_der, SystemTime::now())?;
        ensure!(
            report.sans == [NAME, "127.0.0.1"],
            "{ctx}: SANs {:?}",
            report.sans
        );
        ensure!(report.not_after > SystemTime::now() + Duration::from_secs(29 * 86_400));
        let certified = certified_key(&chain, key.signing_key.clone())?;

        for (version, expect) in [
            (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
            (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        ] {
            for schemes in forced {
                // TLS 1.3 has no PKCS#1 v1.5 signatures in the handshake.
                if expect == ProtocolVersion::TLSv1_3
                    && schemes
                        .iter()
                        .all(|s| format!("{s:?}").starts_with("RSA_PKCS1"))
                    && !schemes.is_empty()
                {
                    continue;
                }
                let server = tls::server_config(certified.clone(), &[version])?;
                let client = tls::client_config(roots.clone(), &[version], schemes)?;
                let outcome = tls::handshake(client, server, NAME)
                    .with_context(|| format!("{ctx}: {expect:?} with {schemes:?}"))?;
                ensure!(
                    outcome.version == expect,
                    "{ctx}: negotiated {:?}",
                    outcome.version
                );
                ensure!(outcome.echoed == b"ping", "{ctx}: application data lost");
            }
        }
    }
    Ok(())
}

#[test]
fn ecdsa_p256_tls13_and_tls12() -> Result<()> {
    handshakes(KeySpec::EcP256, &[&[]])
}

#[test]
fn ecdsa_p384_tls13_and_tls12() -> Result<()> {
    handshakes(KeySpec::EcP384, &[&[]])
}

#[test]
fn rsa_tls13_and_tls12_with_pss_and_pkcs1() -> Result<()> {
    handshakes(
        KeySpec::Rsa2048,
        &[
            &[],
            &[SignatureScheme::RSA_PSS_SHA256],
            &[SignatureScheme::RSA_PSS_SHA384],
            &[SignatureScheme::RSA_PKCS1_SHA256],
            &[SignatureScheme::RSA_PKCS1_SHA512],
        ],
    )
}

#[test]
fn a_client_trusting_another_root_fails_the_handshake() -> Result<()> {
    let ca = TestCa::new()?;
    let other = TestCa::new()?;
    for backend in backends()? {
        let Some(key) = backend.generate(KeySpec::EcP256, "tls-untrusted")? else {
            continue;
        };
        let chain = ca.issue(&key.spki_der, &[NAME], Duration::from_secs(3600))?;
        let certified = certified_key(&chain, key.signing_key.clone())?;
        let server = tls::server_config(certified, &[&rustls::version::TLS13])?;
        let client = tls::client_config(other.roots()?, &[&rustls::version::TLS13], &[])?;
        ensure!(
            tls::handshake(client, server, NAME).is_err(),
            "{}: a client trusting another root completed the handshake",
            backend.name()
        );
    }
    Ok(())
}
