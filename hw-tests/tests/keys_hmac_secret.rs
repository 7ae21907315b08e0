//! HMAC secrets on a real SoftHSM2 token (the root of fleet session-ticket keys): generated
//! sensitive, non-extractable and sign-only (checked past the keystore with cryptoki), the
//! token's CKM_SHA256_HMAC equals aws-lc-rs's HMAC for a known secret, and outputs are
//! deterministic across sessions and threads and differ by input and by secret.

use std::sync::Arc;

use anyhow::{bail, ensure, Context as _, Result};
use aws_lc_rs::hmac;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use tlsgate_hw_tests::softhsm::{self, TestToken};
use tlsgate_keystore::{Error, KeySpec, Pkcs11Uri};

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

fn secret_uri(token: &TestToken, label: &str) -> Result<Pkcs11Uri> {
    Ok(format!(
        "pkcs11:token={};object={label};type=secret-key",
        token.label()
    )
    .parse()?)
}

fn skip() -> bool {
    if let Some(why) = softhsm::unavailable() {
        tlsgate_hw_tests::skip::missing(why);
        return true;
    }
    false
}

#[test]
fn a_ticket_secret_is_sensitive_non_extractable_and_sign_only() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let test_token = TestToken::new()?;
    let token = test_token.open()?;
    let info = token.generate_hmac_secret("tickets", Some(&[7, 7]))?;
    ensure!(info.key_type == "generic-secret", "{info:?}");
    ensure!(info.value_len == Some(32), "{info:?}");
    ensure!(
        info.sensitive && !info.extractable && info.sign && !info.other_uses,
        "{info:?}"
    );
    ensure!(info
        .uri(token.label())
        .to_string()
        .contains("type=secret-key"));
    ensure!(token.find_secret(&secret_uri(&test_token, "tickets")?)? == info);

    // Past the keystore: the value cannot be read and extraction cannot be turned back on.
    let session = raw_session(&test_token)?;
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(b"tickets".to_vec()),
    ])?;
    let [key] = found.as_slice() else {
        bail!("{} secret keys labelled tickets", found.len())
    };
    ensure!(
        session
            .get_attributes(*key, &[AttributeType::Value])?
            .is_empty(),
        "the token revealed CKA_VALUE"
    );
    let value_info = session.get_attribute_info(*key, &[AttributeType::Value])?;
    ensure!(
        matches!(value_info.as_slice(), [AttributeInfo::Sensitive]),
        "{value_info:?}"
    );
    ensure!(
        session
            .update_attributes(*key, &[Attribute::Extractable(true)])
            .is_err(),
        "CKA_EXTRACTABLE could be set back to true"
    );
    let flags = session.get_attributes(
        *key,
        &[
            AttributeType::Private,
            AttributeType::Token,
            AttributeType::Encrypt,
            AttributeType::Wrap,
        ],
    )?;
    ensure!(
        flags
            == vec![
                Attribute::Private(true),
                Attribute::Token(true),
                Attribute::Encrypt(false),
                Attribute::Wrap(false)
            ],
        "{flags:?}"
    );

    // A second secret under the same label is refused; an unknown one is not found; a URI that
    // says it names a private key is not taken for a secret.
    ensure!(matches!(
        token.generate_hmac_secret("tickets", None),
        Err(Error::KeyExists { .. })
    ));
    ensure!(matches!(
        token.hmac_sha256(&secret_uri(&test_token, "nope")?, b"x"),
        Err(Error::KeyNotFound { .. })
    ));
    token.generate(KeySpec::EcP256, "ec", None)?;
    let private: Pkcs11Uri =
        format!("pkcs11:token={};object=ec;type=private", token.label()).parse()?;
    ensure!(matches!(
        token.hmac_sha256(&private, b"x"),
        Err(Error::UnsupportedKey { .. })
    ));
    let untyped: Pkcs11Uri = format!("pkcs11:token={};object=ec", token.label()).parse()?;
    ensure!(matches!(
        token.hmac_sha256(&untyped, b"x"),
        Err(Error::KeyNotFound { .. })
    ));

    token.delete_secret(&secret_uri(&test_token, "tickets")?)?;
    ensure!(token.list_secrets()?.is_empty());
    Ok(())
}

#[test]
fn the_tokens_hmac_matches_aws_lc_for_a_known_secret() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let test_token = TestToken::new()?;
    let token = test_token.open()?;
    // Created in the clear through cryptoki only for this comparison: a generated secret's
    // value can never be read, so a known one is the only way to check the mechanism.
    let known = [0x5au8; 32];
    let session = raw_session(&test_token)?;
    session.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::Label(b"known".to_vec()),
        Attribute::Value(known.to_vec()),
    ])?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, &known);
    for data in [&b""[..], b"tlsgate ticket key v1", &[0xffu8; 1000]] {
        let ours = token.hmac_sha256(&secret_uri(&test_token, "known")?, data)?;
        let expected = hmac::sign(&key, data);
        ensure!(
            ours[..] == *expected.as_ref(),
            "token HMAC differs from aws-lc-rs for {} bytes",
            data.len()
        );
    }
    Ok(())
}

#[test]
fn hmac_outputs_are_deterministic_and_separate_inputs_and_secrets() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let test_token = TestToken::new()?;
    let token = test_token.open()?;
    token.generate_hmac_secret("a", None)?;
    token.generate_hmac_secret("b", None)?;
    let a = secret_uri(&test_token, "a")?;
    let b = secret_uri(&test_token, "b")?;
    let first = token.hmac_sha256(&a, b"epoch 1")?;
    // Concurrent callers each take a session of their own: same answer from every session.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let token = Arc::clone(&token);
            let a = a.clone();
            std::thread::spawn(move || -> Result<Vec<[u8; 32]>> {
                (0..10)
                    .map(|_| Ok(*token.hmac_sha256(&a, b"epoch 1")?))
                    .collect()
            })
        })
        .collect();
    for t in threads {
        for mac in t.join().map_err(|_| anyhow::anyhow!("thread panicked"))?? {
            ensure!(mac == *first, "HMAC differs between sessions");
        }
    }
    ensure!(
        *token.hmac_sha256(&a, b"epoch 2")? != *first,
        "inputs not separated"
    );
    ensure!(
        *token.hmac_sha256(&b, b"epoch 1")? != *first,
        "secrets not separated"
    );
    // A second login (a new Token, as a restarted process would make) gets the same answer.
    let again = test_token.open()?;
    ensure!(*again.hmac_sha256(&a, b"epoch 1")? == *first);
    Ok(())
}

/// Set in the child processes of the cross-process test: they open the token named by the
/// environment, compute one HMAC, print it and exit.
const CHILD: &str = "TLSGATE_TEST_HMAC_CHILD";
const CHILD_TOKEN: &str = "TLSGATE_TEST_HMAC_TOKEN";
const CHILD_PIN: &str = "TLSGATE_TEST_HMAC_PIN";
const CHILD_GENERATE: &str = "TLSGATE_TEST_HMAC_GENERATE";
const CROSS_PROCESS_TEST: &str = "the_same_secret_gives_the_same_hmac_in_separate_processes";

fn child() -> Result<()> {
    let label = std::env::var(CHILD_TOKEN)?;
    let token = tlsgate_keystore::Token::open(
        &softhsm::module_path(),
        tlsgate_keystore::TokenSelector::Label(label.clone()),
        &tlsgate_keystore::PinSource::Env(CHILD_PIN.into()),
    )?;
    if std::env::var_os(CHILD_GENERATE).is_some() {
        token.generate_hmac_secret("fleet", None)?;
    }
    let uri: Pkcs11Uri = format!("pkcs11:token={label};object=fleet;type=secret-key").parse()?;
    let mac = token.hmac_sha256(&uri, b"tlsgate ticket key v1\0\0\x03web")?;
    println!("HMAC={}", hex::encode(&mac[..]));
    Ok(())
}

#[test]
fn the_same_secret_gives_the_same_hmac_in_separate_processes() -> Result<()> {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    if skip() {
        return Ok(());
    }
    // A token of its own configuration: only the child processes open it.
    let token = TestToken::new_isolated()?;
    let run = |generate: bool| -> Result<String> {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args([
            "--exact",
            CROSS_PROCESS_TEST,
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(token.env())
        .env(CHILD, "1")
        .env(CHILD_TOKEN, token.label())
        .env(CHILD_PIN, token.pin());
        if generate {
            cmd.env(CHILD_GENERATE, "1");
        }
        let out = cmd.output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "child failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The harness prints its own words on the same line.
        stdout
            .split("HMAC=")
            .nth(1)
            .map(|rest| rest.chars().take_while(char::is_ascii_hexdigit).collect())
            .with_context(|| format!("no HMAC in: {stdout}"))
    };
    let first = run(true)?;
    ensure!(first.len() == 64, "{first}");
    for _ in 0..2 {
        let again = run(false)?;
        ensure!(
            again == first,
            "another process derived {again}, the first {first}"
        );
    }
    Ok(())
}
