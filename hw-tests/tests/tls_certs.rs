//! Certificate chain checks: each problem gives its own error variant, naming the certificate.

use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tlsgate_hw_tests::{backends, TestCa};
use tlsgate_keystore::{certified_key, CertChain, CertError, Error, KeySpec};

const DAY: Duration = Duration::from_secs(86_400);

#[test]
fn a_certificate_for_another_key_is_refused() -> Result<()> {
    let ca = TestCa::new()?;
    for backend in backends()? {
        let Some(key) = backend.generate(KeySpec::EcP256, "mismatch-a")? else {
            continue;
        };
        let Some(other) = backend.generate(KeySpec::EcP256, "mismatch-b")? else {
            continue;
        };
        let chain = ca.issue(&other.spki_der, &["a.lab.test"], DAY)?;
        match chain.validate(&key.spki_der, SystemTime::now()) {
            Err(CertError::KeyMismatch { subject }) => ensure!(subject.contains("a.lab.test")),
            other => bail!("{}: expected KeyMismatch, got {other:?}", backend.name()),
        }
        match certified_key(&chain, key.signing_key.clone()) {
            Err(Error::Certificate(CertError::KeyMismatch { .. })) => {}
            other => bail!("{}: expected KeyMismatch, got {other:?}", backend.name()),
        }
    }
    Ok(())
}

#[test]
fn an_out_of_order_chain_is_refused() -> Result<()> {
    let ca = TestCa::new()?;
    for backend in backends()? {
        let Some(key) = backend.generate(KeySpec::EcP384, "order")? else {
            continue;
        };
        let chain = ca.issue(&key.spki_der, &["o.lab.test"], DAY)?;
        // leaf, root, intermediate: the leaf is followed by a certificate that did not issue it.
        let root = CertificateDer::from_pem_slice(ca.ca.root_pem().as_bytes())?;
        let shuffled =
            CertChain::from_der(vec![chain.certs[0].clone(), root, chain.certs[1].clone()])?;
        match shuffled.validate(&key.spki_der, SystemTime::now()) {
            Err(CertError::ChainOrder {
                index: 0,
                subject,
                expected_issuer,
                next_subject,
            }) => {
                ensure!(subject.contains("o.lab.test"));
                ensure!(expected_issuer.contains("Intermediate"));
                ensure!(next_subject.contains("Root"));
            }
            other => bail!(
                "{}: expected ChainOrder at 0, got {other:?}",
                backend.name()
            ),
        }
        ensure!(chain.validate(&key.spki_der, SystemTime::now()).is_ok());
    }
    Ok(())
}

#[test]
fn a_chain_whose_names_match_but_signature_does_not_is_refused() -> Result<()> {
    // Two CAs with the same names: the second's intermediate has the right subject but the
    // wrong key.
    let (ca, impostor) = (TestCa::new()?, TestCa::new()?);
    let key = tlsgate_keystore::software::from_pkcs8_der(
        &tlsgate_hw_tests::backend::software_pkcs8(KeySpec::EcP256)?,
    )?;
    let good = ca.issue(&key.spki_der, &["s.lab.test"], DAY)?;
    let other = impostor.issue(&key.spki_der, &["s.lab.test"], DAY)?;
    let forged = CertChain::from_der(vec![good.certs[0].clone(), other.certs[1].clone()])?;
    match forged.validate(&key.spki_der, SystemTime::now()) {
        Err(CertError::BadSignature { index: 0, subject }) => {
            ensure!(subject.contains("s.lab.test"))
        }
        other => bail!("expected BadSignature at 0, got {other:?}"),
    }
    Ok(())
}

#[test]
fn expired_and_not_yet_valid_certificates_are_refused() -> Result<()> {
    let ca = TestCa::new()?;
    let now = SystemTime::now();
    for backend in backends()? {
        let Some(key) = backend.generate(KeySpec::Rsa2048, "validity")? else {
            continue;
        };
        let expired = ca.issue_window(&key.spki_der, &["e.lab.test"], now - 10 * DAY, now - DAY)?;
        match expired.validate(&key.spki_der, now) {
            Err(CertError::Expired {
                index: 0,
                subject,
                not_after,
            }) => {
                ensure!(subject.contains("e.lab.test"));
                ensure!(not_after < now);
            }
            other => bail!("{}: expected Expired, got {other:?}", backend.name()),
        }
        let future = ca.issue_window(&key.spki_der, &["f.lab.test"], now + DAY, now + 10 * DAY)?;
        match future.validate(&key.spki_der, now) {
            Err(CertError::NotYetValid { index: 0, .. }) => {}
            other => bail!("{}: expected NotYetValid, got {other:?}", backend.name()),
        }
        // The same chain is fine at a time inside its window.
        ensure!(future.validate(&key.spki_der, now + 2 * DAY).is_ok());
    }
    Ok(())
}

#[test]
fn malformed_pem_gives_specific_errors() -> Result<()> {
    ensure!(matches!(
        CertChain::from_pem(b"nothing here"),
        Err(CertError::Empty)
    ));
    let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    ensure!(matches!(
        CertChain::from_pem(garbage.as_bytes()),
        Err(CertError::Parse { index: 0, .. })
    ));
    Ok(())
}
