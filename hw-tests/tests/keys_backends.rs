//! The same key tests against every backend: software, SoftHSM2, and an external module.

use anyhow::{ensure, Context as _, Result};
use rustls::SignatureScheme;
use tlsgate_hw_tests::{backends, verify::verify};
use tlsgate_keystore::{KeyKind, KeyOrigin, KeySpec};

fn schemes_for(kind: KeyKind) -> Vec<SignatureScheme> {
    match kind {
        KeyKind::EcP256 => vec![SignatureScheme::ECDSA_NISTP256_SHA256],
        KeyKind::EcP384 => vec![SignatureScheme::ECDSA_NISTP384_SHA384],
        KeyKind::Rsa { .. } => vec![
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PKCS1_SHA256,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA512,
        ],
        KeyKind::Ed25519 => vec![SignatureScheme::ED25519],
    }
}

fn check_signatures(spec: KeySpec, only_first: bool) -> Result<()> {
    for backend in backends()? {
        let Some(key) = backend.generate(spec, &format!("sig-{spec}"))? else {
            continue;
        };
        let ctx = || format!("{spec} on {}", backend.name());
        ensure!(key.kind == spec.kind(), "{}: kind {:?}", ctx(), key.kind);
        let public = key.signing_key.public_key().context("no public key")?;
        ensure!(
            public.as_ref() == key.spki_der.as_slice(),
            "{}: public_key() != SPKI",
            ctx()
        );

        let mut schemes = schemes_for(key.kind);
        if only_first {
            schemes.truncate(1);
        }
        for scheme in schemes {
            let signer = key
                .signing_key
                .choose_scheme(&[scheme])
                .with_context(|| format!("{}: {scheme:?} not offered", ctx()))?;
            ensure!(signer.scheme() == scheme);
            let message = format!("tlsgate {scheme:?} test message").into_bytes();
            let signature = signer.sign(&message).with_context(ctx)?;
            verify(&key.spki_der, scheme, &message, &signature).with_context(ctx)?;
            let mut tampered = message.clone();
            tampered[0] ^= 1;
            ensure!(
                verify(&key.spki_der, scheme, &tampered, &signature).is_err(),
                "{}: {scheme:?} signature verifies over a different message",
                ctx()
            );
        }
        // A key never offers a scheme of another algorithm.
        ensure!(key
            .signing_key
            .choose_scheme(&[SignatureScheme::ECDSA_SHA1_Legacy])
            .is_none());

        if let Some((token, uri, info)) = &key.token {
            ensure!(info.sensitive && !info.extractable, "{}: {info:?}", ctx());
            ensure!(
                info.always_sensitive && info.never_extractable,
                "{}: {info:?}",
                ctx()
            );
            ensure!(
                info.origin == KeyOrigin::Generated,
                "{}: origin {:?}",
                ctx(),
                info.origin
            );
            ensure!(
                token.find(uri)? == *info,
                "{}: find() disagrees with generate()",
                ctx()
            );
            ensure!(info.fingerprint_sha256().len() == 64);
            ensure!(info.spki_pem().starts_with("-----BEGIN PUBLIC KEY-----\n"));
        }
    }
    Ok(())
}

#[test]
fn ecdsa_p256_signatures_verify() -> Result<()> {
    check_signatures(KeySpec::EcP256, false)
}

#[test]
fn ecdsa_p384_signatures_verify() -> Result<()> {
    check_signatures(KeySpec::EcP384, false)
}

#[test]
fn rsa_2048_pss_and_pkcs1_signatures_verify() -> Result<()> {
    check_signatures(KeySpec::Rsa2048, false)
}

#[test]
fn rsa_3072_signatures_verify() -> Result<()> {
    check_signatures(KeySpec::Rsa3072, true)
}

#[test]
fn rsa_4096_signatures_verify() -> Result<()> {
    check_signatures(KeySpec::Rsa4096, true)
}

#[test]
fn ed25519_signatures_verify() -> Result<()> {
    check_signatures(KeySpec::Ed25519, false)
}

#[test]
fn keys_are_listed_and_deleted() -> Result<()> {
    for backend in backends()? {
        let Some(token) = backend.token().cloned() else {
            continue;
        };
        let a = backend
            .generate(KeySpec::EcP256, "list-a")?
            .context("P-256 key")?;
        let b = backend
            .generate(KeySpec::Rsa2048, "list-b")?
            .context("RSA key")?;
        let listed = token.list()?;
        for key in [&a, &b] {
            let (_, uri, info) = key.token.as_ref().context("token key")?;
            ensure!(
                listed.contains(info),
                "{} missing from list() on {}",
                uri,
                backend.name()
            );
        }
        let (_, uri_a, _) = a.token.as_ref().context("token key")?;
        let uri_a = uri_a.clone();
        drop(a); // deletes the key
        ensure!(!token.list()?.iter().any(|k| k.uri(token.label()) == uri_a));
        ensure!(
            matches!(
                token.find(&uri_a),
                Err(tlsgate_keystore::Error::KeyNotFound { .. })
            ),
            "deleted key still found"
        );
        drop(b);
    }
    Ok(())
}
