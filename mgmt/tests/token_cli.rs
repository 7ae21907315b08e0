//! The offline key ceremony through the real `tlsgate` binary on a real SoftHSM2 token:
//! each test makes its own token directory (its own SOFTHSM2_CONF) under a temporary directory.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::{check, fail, tlsgate, uri, Lab};

fn openssl(args: &[&str]) -> Result<String> {
    let out = Command::new("openssl").args(args).output()?;
    check(out, &format!("openssl {}", args.join(" ")))
}

#[test]
fn the_lab_ceremony_makes_keys_and_chains_that_openssl_verifies() -> Result<()> {
    let lab = Lab::new()?;
    let pin_mode = std::fs::metadata(lab.path("token/user.pin"))?
        .permissions()
        .mode();
    assert_eq!(pin_mode & 0o777, 0o600, "PIN file must be owner-only");

    lab.run(&[
        "token",
        "generate",
        "--type",
        "ec-p256",
        "--label",
        "web-ecdsa",
    ])?;
    lab.run(&[
        "token", "generate", "--type", "rsa-2048", "--label", "web-rsa", "--id", "0a0b",
    ])?;

    let keys = lab.list()?;
    assert_eq!(keys.len(), 2, "{keys:?}");
    for k in &keys {
        assert_eq!(k["sensitive"], true, "{k}");
        assert_eq!(k["extractable"], false, "{k}");
        assert_eq!(k["never_extractable"], true, "{k}");
        assert_eq!(k["origin"], "generated", "{k}");
    }
    let rsa = keys
        .iter()
        .find(|k| k["label"] == "web-rsa")
        .context("web-rsa listed")?;
    assert_eq!(rsa["id"], "0a0b");

    lab.run(&[
        "ca",
        "init-lab",
        "--dir",
        lab.path("ca").to_str().context("utf-8")?,
    ])?;
    for key in ["web-ecdsa", "web-rsa"] {
        let pub_path = lab.path(&format!("{key}.pub.pem"));
        lab.run(&[
            "token",
            "export-pubkey",
            "--key",
            &uri(key),
            "--out",
            pub_path.to_str().context("utf-8")?,
        ])?;
        // The exported SPKI parses and is the one the listing fingerprints.
        let der = lab.path(&format!("{key}.pub.der"));
        openssl(&[
            "pkey",
            "-pubin",
            "-in",
            pub_path.to_str().context("utf-8")?,
            "-outform",
            "DER",
            "-out",
            der.to_str().context("utf-8")?,
        ])?;
        let listed = keys.iter().find(|k| k["label"] == key).context("listed")?;
        assert_eq!(
            listed["spki_sha256"].as_str(),
            Some(sha256_hex(&std::fs::read(&der)?).as_str())
        );

        let chain = lab.path(&format!("{key}.chain.pem"));
        lab.run(&[
            "token",
            "issue-cert",
            "--key",
            &uri(key),
            "--ca-dir",
            lab.path("ca").to_str().context("utf-8")?,
            "--cn",
            "localhost",
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
            "--out",
            chain.to_str().context("utf-8")?,
        ])?;
        let (leaf, intermediate) = split_chain(&chain)?;
        let out = openssl(&[
            "verify",
            "-CAfile",
            lab.path("ca/root.pem").to_str().context("utf-8")?,
            "-untrusted",
            intermediate.to_str().context("utf-8")?,
            leaf.to_str().context("utf-8")?,
        ])?;
        assert!(out.contains(": OK"), "{out}");
        // The certificate carries the token key's public half.
        let cert_pub = openssl(&[
            "x509",
            "-in",
            leaf.to_str().context("utf-8")?,
            "-noout",
            "-pubkey",
        ])?;
        assert_eq!(cert_pub.trim(), std::fs::read_to_string(&pub_path)?.trim());
        let text = openssl(&[
            "x509",
            "-in",
            leaf.to_str().context("utf-8")?,
            "-noout",
            "-ext",
            "subjectAltName",
        ])?;
        assert!(
            text.contains("DNS:localhost") && text.contains("IP Address:127.0.0.1"),
            "{text}"
        );
    }

    lab.run(&["token", "delete", "--key", &uri("web-rsa")])?;
    let keys = lab.list()?;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["label"], "web-ecdsa");
    Ok(())
}

#[test]
fn an_imported_key_is_marked_imported_and_non_extractable() -> Result<()> {
    let lab = Lab::new()?;
    let key = lab.path("old.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        key.to_str().context("utf-8")?,
    ])?;
    lab.run(&[
        "token",
        "import",
        "--key-file",
        key.to_str().context("utf-8")?,
        "--label",
        "old",
    ])?;
    let keys = lab.list()?;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["origin"], "imported");
    assert_eq!(keys[0]["sensitive"], true);
    assert_eq!(keys[0]["extractable"], false);
    // The token holds the same key: its public half matches the file's.
    let from_file = openssl(&["pkey", "-in", key.to_str().context("utf-8")?, "-pubout"])?;
    let from_token = lab.run(&["token", "export-pubkey", "--key", &uri("old")])?;
    assert_eq!(from_file.trim(), from_token.trim());
    Ok(())
}

#[test]
fn a_wrong_pin_is_refused_with_its_own_message() -> Result<()> {
    let lab = Lab::new()?;
    let bad = lab.path("bad.pin");
    std::fs::write(&bad, "0000000000000000")?;
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600))?;
    let err = fail(
        lab.cmd(&["token", "list"])
            .env("TLSGATE_PIN", format!("file:{}", bad.display()))
            .output()?,
        "list with a wrong PIN",
    )?;
    assert!(err.contains("CKR_PIN_INCORRECT"), "{err}");
    Ok(())
}

#[test]
fn a_pin_file_others_can_read_is_refused() -> Result<()> {
    let lab = Lab::new()?;
    let pin = lab.path("token/user.pin");
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644))?;
    let err = fail(
        lab.cmd(&["token", "list"]).output()?,
        "list with a 0644 PIN file",
    )?;
    assert!(err.contains("chmod 600"), "{err}");
    Ok(())
}

#[test]
fn a_pin_from_the_environment_works() -> Result<()> {
    let lab = Lab::new()?;
    let pin = std::fs::read_to_string(lab.path("token/user.pin"))?;
    let out = lab
        .cmd(&["token", "list"])
        .env("TLSGATE_PIN", "env:LAB_PIN_FOR_TEST")
        .env("LAB_PIN_FOR_TEST", pin.trim())
        .output()?;
    let stdout = check(out, "list with env: PIN")?;
    assert!(stdout.contains("no private keys"), "{stdout}");
    Ok(())
}

#[test]
fn a_missing_token_and_a_missing_key_say_so() -> Result<()> {
    let lab = Lab::new()?;
    let err = fail(
        lab.cmd(&["token", "list"])
            .env("TLSGATE_TOKEN", "nope")
            .output()?,
        "unknown token",
    )?;
    assert!(err.contains("no token \"nope\""), "{err}");
    let err = fail(
        lab.cmd(&["token", "export-pubkey", "--key", &uri("ghost")])
            .output()?,
        "unknown key",
    )?;
    assert!(err.contains("no private key matches"), "{err}");
    let err = fail(
        lab.cmd(&["token", "export-pubkey", "--key", "pkcs11:tokn=lab"])
            .output()?,
        "bad uri",
    )?;
    assert!(err.contains("tokn"), "{err}");
    Ok(())
}

#[test]
fn every_command_has_help() -> Result<()> {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["token", "--help"],
        vec!["ca", "--help"],
        vec!["demo-backend", "--help"],
    ] {
        check(tlsgate().args(&args).output()?, &args.join(" "))?;
    }
    for sub in [
        "init-lab",
        "generate",
        "import",
        "list",
        "export-pubkey",
        "csr",
        "issue-cert",
        "delete",
    ] {
        let out = check(tlsgate().args(["token", sub, "--help"]).output()?, sub)?;
        assert!(out.contains("Usage:"), "{out}");
    }
    Ok(())
}

fn split_chain(chain: &Path) -> Result<(PathBuf, PathBuf)> {
    let pem = std::fs::read_to_string(chain)?;
    let blocks: Vec<String> = pem
        .split_inclusive("-----END CERTIFICATE-----")
        .map(|b| b.trim().to_owned())
        .filter(|b| !b.is_empty())
        .collect();
    ensure!(
        blocks.len() == 2,
        "expected leaf + intermediate, got {} blocks",
        blocks.len()
    );
    let leaf = chain.with_extension("leaf.pem");
    let inter = chain.with_extension("inter.pem");
    std::fs::write(&leaf, format!("{}\n", blocks[0]))?;
    std::fs::write(&inter, format!("{}\n", blocks[1]))?;
    Ok((leaf, inter))
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .map(|mut s| s.write_all(bytes))
                .transpose()?;
            child.wait_with_output()
        });
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
        Err(_) => String::new(),
    }
}
