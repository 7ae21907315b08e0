//! What the token refuses, checked past the keystore with cryptoki: generated and imported keys
//! are sensitive, non-extractable and sign-only, and their secret attributes cannot be read.

use anyhow::{bail, ensure, Context as _, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use tlsgate_hw_tests::backend::software_pkcs8;
use tlsgate_hw_tests::softhsm::{self, TestToken};
use tlsgate_hw_tests::verify::verify;
use tlsgate_keystore::{software, Error, KeyKind, KeyOrigin, KeySpec};
use zeroize::Zeroizing;

/// A raw session on the test token, logged in as the user.
fn raw_session(token: &TestToken) -> Result<Session> {
    let ctx = Pkcs11::new(token.module_path())?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e.into()),
    }
    let slot = ctx
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == token.label())
        })
        .context("test token not in the slot list")?;
    let session = ctx.open_rw_session(slot)?;
    match session.login(UserType::User, Some(&AuthPin::from(token.pin()))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(e) => Err(e.into()),
    }
}

fn assert_protected(session: &Session, label: &str, kind: KeyKind) -> Result<()> {
    let handles = session.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    let [key] = handles.as_slice() else {
        bail!("{label}: {} private keys", handles.len())
    };
    let secret = match kind {
        KeyKind::Rsa { .. } => vec![
            AttributeType::PrivateExponent,
            AttributeType::Prime1,
            AttributeType::Prime2,
            AttributeType::Coefficient,
        ],
        _ => vec![AttributeType::Value],
    };
    // cryptoki drops attributes the token will not reveal instead of failing: nothing comes back.
    let got = session.get_attributes(*key, &secret)?;
    ensure!(
        got.is_empty(),
        "{label}: the token revealed secret attributes: {:?}",
        got.len()
    );
    let info = session.get_attribute_info(*key, &secret)?;
    ensure!(
        info.iter().all(|i| matches!(i, AttributeInfo::Sensitive)),
        "{label}: secret attributes not reported sensitive: {info:?}"
    );
    let flags = session.get_attributes(
        *key,
        &[
            AttributeType::Sign,
            AttributeType::Decrypt,
            AttributeType::Unwrap,
            AttributeType::Derive,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::Private,
            AttributeType::Token,
        ],
    )?;
    for a in &flags {
        let ok = match a {
            Attribute::Sign(v)
            | Attribute::Sensitive(v)
            | Attribute::Private(v)
            | Attribute::Token(v) => *v,
            Attribute::Decrypt(v)
            | Attribute::Unwrap(v)
            | Attribute::Derive(v)
            | Attribute::Extractable(v) => !*v,
            _ => true,
        };
        ensure!(ok, "{label}: {a:?}");
    }
    ensure!(
        flags.len() == 8,
        "{label}: only {} of 8 flags readable",
        flags.len()
    );
    // Turning extraction back on must be refused (CKA_EXTRACTABLE can only go true → false).
    ensure!(
        session
            .update_attributes(*key, &[Attribute::Extractable(true)])
            .is_err(),
        "{label}: CKA_EXTRACTABLE could be set back to true"
    );
    Ok(())
}

#[test]
fn generated_keys_cannot_leave_the_token() -> Result<()> {
    if let Some(why) = softhsm::unavailable() {
        tlsgate_hw_tests::skip::missing(why);
        return Ok(());
    }
    let test_token = TestToken::new()?;
    let token = test_token.open()?;
    let session = raw_session(&test_token)?;
    for (n, spec) in [KeySpec::EcP256, KeySpec::Rsa2048, KeySpec::Ed25519]
        .into_iter()
        .enumerate()
    {
        let label = format!("gen-{spec}");
        let id = [0x01, n as u8];
        let info = token.generate(spec, &label, Some(&id))?;
        ensure!(info.id == id);
        ensure!(info.origin == KeyOrigin::Generated);
        assert_protected(&session, &label, info.kind)?;
    }
    Ok(())
}

#[test]
fn imported_keys_are_protected_marked_imported_and_sign() -> Result<()> {
    if let Some(why) = softhsm::unavailable() {
        tlsgate_hw_tests::skip::missing(why);
        return Ok(());
    }
    let test_token = TestToken::new()?;
    let token = test_token.open()?;
    let session = raw_session(&test_token)?;
    for spec in [
        KeySpec::EcP256,
        KeySpec::EcP384,
        KeySpec::Rsa2048,
        KeySpec::Ed25519,
    ] {
        let der = software_pkcs8(spec)?;
        let original = software::from_pkcs8_der(&der)?;
        let label = format!("imp-{spec}");
        let info = token.import_pkcs8(Zeroizing::new(der), &label, None)?;
        ensure!(
            info.origin == KeyOrigin::Imported,
            "{spec}: origin {:?}",
            info.origin
        );
        ensure!(info.sensitive && !info.extractable, "{spec}: {info:?}");
        ensure!(
            info.spki_der == original.spki_der,
            "{spec}: token SPKI differs from the file's"
        );
        assert_protected(&session, &label, info.kind)?;

        let key = token.signing_key(&info.uri(token.label()))?;
        let signer = key
            .choose_scheme(&[
                rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
                rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
                rustls::SignatureScheme::RSA_PSS_SHA256,
                rustls::SignatureScheme::ED25519,
            ])
            .context("no scheme")?;
        let sig = signer.sign(b"imported")?;
        verify(&original.spki_der, signer.scheme(), b"imported", &sig)?;

        match token.import_pkcs8(Zeroizing::new(software_pkcs8(spec)?), &label, None) {
            Err(Error::KeyExists { label: l, .. }) => ensure!(l == label),
            other => bail!("{spec}: second import under one label gave {other:?}"),
        }
    }
    match token.import_pkcs8(
        Zeroizing::new(b"\x30\x03\x02\x01\x00".to_vec()),
        "junk",
        None,
    ) {
        Err(Error::KeyParse { .. }) => Ok(()),
        other => bail!("garbage import gave {other:?}"),
    }
}
