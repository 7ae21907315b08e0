//! Each failure a caller can act on gives its own error variant.

use std::os::unix::fs::PermissionsExt;

use anyhow::{bail, ensure, Result};
use tlsgate_hw_tests::softhsm::{self, TestToken};
use tlsgate_keystore::{Error, KeySpec, PinSource, Pkcs11Uri, Token, TokenSelector, UriError};

fn skip() -> bool {
    match softhsm::unavailable() {
        Some(why) => {
            tlsgate_hw_tests::skip::missing(why);
            true
        }
        None => false,
    }
}

#[test]
fn wrong_pin_is_pin_incorrect() -> Result<()> {
    if skip() {
        return Ok(());
    }
    // A token nobody in this process has logged in to: PKCS#11 login state is per application,
    // so a token already logged in would answer "already logged in" to any PIN.
    let token = TestToken::new()?;
    let dir = tempfile::tempdir()?;
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, "not-the-pin\n")?;
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600))?;
    match Token::open(
        &token.module_path(),
        TokenSelector::Label(token.label().into()),
        &PinSource::File(pin_file),
    ) {
        Err(Error::PinIncorrect { token: t }) => ensure!(t == token.label()),
        other => bail!("expected PinIncorrect, got {other:?}"),
    }
    // The right PIN still works afterwards.
    token.open()?;
    Ok(())
}

#[test]
fn group_readable_pin_file_is_refused() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let token = TestToken::new()?;
    let dir = tempfile::tempdir()?;
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, token.pin())?;
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o640))?;
    match Token::open(
        &token.module_path(),
        TokenSelector::Label(token.label().into()),
        &PinSource::File(pin_file.clone()),
    ) {
        Err(Error::PinFilePermissions { path, mode }) => {
            ensure!(path == pin_file && mode == 0o640);
        }
        other => bail!("expected PinFilePermissions, got {other:?}"),
    }
    Ok(())
}

#[test]
fn missing_token_module_and_key() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let token = TestToken::new()?;
    match Token::open(
        &token.module_path(),
        TokenSelector::Label("no-such-token".into()),
        &token.pin_source(),
    ) {
        Err(Error::TokenNotFound { label, .. }) => ensure!(label == "no-such-token"),
        other => bail!("expected TokenNotFound, got {other:?}"),
    }
    match Token::open(
        &token.module_path(),
        TokenSelector::Serial("0000000000000000".into()),
        &token.pin_source(),
    ) {
        Err(Error::TokenNotFound { .. }) => {}
        other => bail!("expected TokenNotFound for a serial, got {other:?}"),
    }
    let missing_module = std::path::Path::new("/nonexistent/libpkcs11.so");
    match Token::open(
        missing_module,
        TokenSelector::Label("x".into()),
        &token.pin_source(),
    ) {
        Err(Error::ModuleLoad { path, .. }) => ensure!(path == missing_module),
        other => bail!("expected ModuleLoad, got {other:?}"),
    }

    let opened = token.open()?;
    let uri = Pkcs11Uri::private_key(token.label(), "no-such-key");
    match opened.signing_key(&uri) {
        Err(Error::KeyNotFound { uri: u }) => ensure!(u.contains("no-such-key")),
        other => bail!("expected KeyNotFound, got {other:?}"),
    }
    match opened.delete(&uri) {
        Err(Error::KeyNotFound { .. }) => {}
        other => bail!("expected KeyNotFound from delete, got {other:?}"),
    }
    let elsewhere = Pkcs11Uri::private_key("another-token", "k");
    match opened.find(&elsewhere) {
        Err(Error::WrongToken { wanted, .. }) => ensure!(wanted == "another-token"),
        other => bail!("expected WrongToken, got {other:?}"),
    }
    let no_object: Pkcs11Uri = format!("pkcs11:token={}", token.label()).parse()?;
    match opened.find(&no_object) {
        Err(Error::Uri(UriError::MissingObject)) => {}
        other => bail!("expected MissingObject, got {other:?}"),
    }
    Ok(())
}

#[test]
fn labels_are_unique_and_ids_select() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let token = TestToken::new()?;
    let opened = token.open()?;
    let info = opened.generate(KeySpec::EcP256, "dup", Some(b"\xaa"))?;
    match opened.generate(KeySpec::EcP256, "dup", None) {
        Err(Error::KeyExists { label, .. }) => ensure!(label == "dup"),
        other => bail!("expected KeyExists, got {other:?}"),
    }
    match opened.generate(KeySpec::EcP256, "other", Some(b"\xaa")) {
        Err(Error::KeyIdExists { id_hex, .. }) => ensure!(id_hex == "aa"),
        other => bail!("expected KeyIdExists, got {other:?}"),
    }
    // By id alone, and a wrong id next to the right label finds nothing.
    let by_id: Pkcs11Uri = format!("pkcs11:token={};id=%AA", token.label()).parse()?;
    ensure!(opened.find(&by_id)? == info);
    let wrong_id: Pkcs11Uri =
        format!("pkcs11:token={};object=dup;id=%AB", token.label()).parse()?;
    ensure!(matches!(
        opened.find(&wrong_id),
        Err(Error::KeyNotFound { .. })
    ));
    Ok(())
}

#[test]
fn unsupported_key_spec_is_a_typed_error() -> Result<()> {
    ensure!(matches!(
        "rsa-1024".parse::<KeySpec>(),
        Err(Error::UnsupportedKey { .. })
    ));
    Ok(())
}
