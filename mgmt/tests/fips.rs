//! The FIPS build (`--features fips`, run by `scripts/fips.sh`): `tlsgate version` and the
//! `tlsgate_fips_mode` metric say FIPS mode is active, `[tls] require_fips = true` starts, only
//! FIPS-approved suites and groups are negotiated (an X25519-only or ChaCha20-only client is
//! refused; AES-GCM over P-256 and the X25519MLKEM768 hybrid work), with a software key and a key
//! on the SoftHSM2 token, and a custom policy naming a non-approved suite is a config error.
//! Compiled only in the FIPS build; the ordinary build tests that `require_fips` refuses to start
//! (`mgmt/src/config/tests.rs`).
#![cfg(feature = "fips")]

mod common;

use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use common::{check, demo_backend, fail, uri, Lab, Serve};

fn s_client(lab: &Lab, port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost", "-CAfile", &lab.p("ca/root.pem")])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn fips_build_offers_only_approved_algorithms_with_software_and_token_keys() -> Result<()> {
    let version = check(
        common::tlsgate().arg("version").output()?,
        "tlsgate version",
    )?;
    ensure!(version.contains("fips mode: active"), "{version}");
    ensure!(version.contains("FIPS module"), "{version}");

    let lab = Lab::new()?;
    let (sw_key, sw_chain) = lab.software_key_with_chain("EC", "sw")?;
    let tok_chain = lab.token_key_with_chain("ec-p256", "tok")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = lab.path("fips.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\nrequire_fips = true\n\n[pkcs11]\ntoken = \"lab\"\npin = \"file:{pin}\"\n\n[dataplane]\ncores = [0]\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
             [[listener]]\nname = \"sw\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n[[listener.certificate]]\nchain = \"{sw_chain}\"\nkey = \"file:{sw_key}\"\n\n\
             [[listener]]\nname = \"tok\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n[[listener.certificate]]\nchain = \"{tok_chain}\"\nkey = \"{tok_key}\"\n",
            pin = lab.p("token/user.pin"),
            sw_chain = sw_chain.display(),
            sw_key = sw_key.display(),
            tok_chain = tok_chain.display(),
            tok_key = uri("tok"),
        ),
    )?;
    let serve = Serve::start(&lab, &config)?;
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    let port = |name: &str| -> Result<u16> {
        ready
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|a| a.trim().rsplit(':').next())
            .context("listener in the ready file")?
            .parse()
            .context("port")
    };
    for name in ["sw", "tok"] {
        let p = port(name)?;
        // Approved: AES-GCM over P-256, TLS 1.3 and 1.2, and the hybrid group.
        for args in [
            vec!["-tls1_3", "-groups", "P-256"],
            vec!["-tls1_2", "-groups", "P-256"],
        ] {
            let text = s_client(&lab, p, &args)?;
            ensure!(
                text.contains("Verify return code: 0 (ok)")
                    && text.contains("GCM")
                    && !text.contains("Cipher is (NONE)"),
                "{name} {args:?}: {text}"
            );
        }
        // Not approved: plain X25519 and ChaCha20-Poly1305 are not offered at all: the server
        // answers with a handshake_failure alert and no cipher is agreed. (s_client prints
        // "Verify return code: 0" even then: nothing was verified.)
        let refused = |text: &str| {
            text.contains("alert handshake failure") && text.contains("Cipher is (NONE)")
        };
        let x25519 = s_client(&lab, p, &["-tls1_3", "-groups", "X25519"])?;
        ensure!(
            refused(&x25519),
            "{name}: an X25519-only client was not refused: {x25519}"
        );
        let chacha = s_client(
            &lab,
            p,
            &["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"],
        )?;
        ensure!(
            refused(&chacha),
            "{name}: a ChaCha20-only client was not refused: {chacha}"
        );
    }
    let metrics_addr = ready
        .lines()
        .find_map(|l| l.strip_prefix("metrics "))
        .context("metrics endpoint")?
        .trim()
        .to_owned();
    let scrape = check(
        Command::new("curl")
            .args(["-sS", &format!("http://{metrics_addr}/metrics")])
            .output()?,
        "scrape",
    )?;
    ensure!(
        common::metric(&scrape, "tlsgate_fips_mode", &[]) == 1.0,
        "{scrape}"
    );
    drop(serve);

    // A custom policy that names ChaCha20 cannot be honoured: a start error that says so.
    let bad = lab.path("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[[listener]]\nname = \"sw\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend}\"\npolicy = \"custom\"\n[listener.custom_policy]\nversions = [\"TLSv1.3\"]\nsuites = [\"TLS_CHACHA20_POLY1305_SHA256\"]\n[[listener.certificate]]\nchain = \"{}\"\nkey = \"file:{}\"\n",
            sw_chain.display(),
            sw_key.display()
        ),
    )?;
    let err = fail(
        lab.cmd(&["serve", "--config", &bad.display().to_string()])
            .output()?,
        "serve with a ChaCha20 custom policy",
    )?;
    ensure!(err.contains("not FIPS-approved"), "{err}");
    Ok(())
}
