//! CRLs per listener through the API: upload (checked), list, survive a restart, delete; a
//! malformed CRL is refused and changes nothing. Also `tlsgate ctl --url` over HTTPS, and the
//! `[api]` checks at start.

mod api_support;
mod common;

use anyhow::{ensure, Result};
use api_support::*;
use common::{demo_backend, Lab, Serve};

/// A CRL from a throwaway CA revoking one serial.
fn crl_pem() -> Result<String> {
    use rcgen::{
        CertificateParams, CertificateRevocationListParams, IsCa, Issuer, KeyIdMethod, KeyPair,
        KeyUsagePurpose, RevokedCertParams, SerialNumber,
    };
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "crl test ca");
    let issuer = Issuer::new(params, key);
    let now = time::OffsetDateTime::now_utc();
    let crl = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(7),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(0x1234u64),
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    Ok(crl.pem()?)
}

#[test]
fn crls_upload_list_restart_delete_and_ctl_over_https() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "crl")?;
    let serve = Serve::start(&lab, &config)?;
    let port = api_port(&config)?;

    std::fs::write(lab.path("test.crl"), crl_pem()?)?;
    let crl = ctl_json(
        &lab,
        &[
            "crls",
            "upload",
            "--listener",
            "web",
            "--file",
            &lab.p("test.crl"),
        ],
    )?;
    ensure!(
        crl["revoked"] == 1 && crl["issuer"] == "CN=crl test ca",
        "{crl}"
    );
    let id = crl["id"].as_str().unwrap_or_default().to_owned();
    ensure!(id.len() == 16, "{crl}");

    std::fs::write(
        lab.path("bad.crl"),
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )?;
    ctl_refused(
        &lab,
        &[
            "crls",
            "upload",
            "--listener",
            "web",
            "--file",
            &lab.p("bad.crl"),
        ],
        "crl_invalid",
    )?;
    ctl_refused(
        &lab,
        &[
            "crls",
            "upload",
            "--listener",
            "web",
            "--file",
            &boot.display().to_string(),
        ],
        "crl_pem_invalid",
    )?;
    ctl_refused(
        &lab,
        &[
            "crls",
            "upload",
            "--listener",
            "nope",
            "--file",
            &lab.p("test.crl"),
        ],
        "listener_not_found",
    )?;

    // ctl over HTTPS with the management client certificate.
    let url = format!("https://localhost:{port}");
    let https = |args: &[&str]| -> Result<std::process::Output> {
        let mut c = common::tlsgate();
        c.args(["ctl", "--json", "--url", &url, "--cert"])
            .arg(&pki.client_chain)
            .arg("--key")
            .arg(&pki.client_key)
            .arg("--cacert")
            .arg(&pki.ca_root)
            .args(args);
        Ok(c.output()?)
    };
    let out = common::check(
        https(&["crls", "list", "--listener", "web"])?,
        "ctl --url crls list",
    )?;
    let list: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(list["items"].as_array().map(Vec::len) == Some(1), "{list}");
    // A client certificate from another CA: ctl cannot reach the API (exit 3).
    let mut c = common::tlsgate();
    c.args(["ctl", "--url", &url, "--cert"])
        .arg(&pki.foreign_chain)
        .arg("--key")
        .arg(&pki.foreign_key)
        .arg("--cacert")
        .arg(&pki.ca_root)
        .args(["keys", "list"]);
    let out = c.output()?;
    ensure!(
        out.status.code() == Some(3),
        "foreign client: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // Exit codes: 2 for local input that cannot be used, 3 when there is no API to reach.
    let out = ctl(
        &lab,
        &[
            "certs",
            "upload",
            "--id",
            "x",
            "--key",
            "k",
            "--chain",
            &lab.p("missing.pem"),
        ],
    )?;
    ensure!(
        out.status.code() == Some(2),
        "missing file: {:?}",
        out.status
    );
    let out = common::tlsgate()
        .args(["ctl", "--socket", &lab.p("no.sock"), "keys", "list"])
        .output()?;
    ensure!(out.status.code() == Some(3), "no socket: {:?}", out.status);
    let out = common::tlsgate()
        .args(["ctl", "keys", "generate", "--label", "x"])
        .output()?;
    ensure!(out.status.code() == Some(2), "usage: {:?}", out.status);

    // Restart keeps it; delete removes it.
    drop(serve);
    let _serve = Serve::start(&lab, &config)?;
    let listeners = ctl_json(&lab, &["listeners", "list"])?;
    ensure!(
        listeners["items"][0]["crls"][0]["id"] == id.as_str(),
        "{listeners}"
    );
    ctl_ok(&lab, &["crls", "delete", "--listener", "web", "--id", &id])?;
    ctl_refused(
        &lab,
        &["crls", "delete", "--listener", "web", "--id", &id],
        "crl_not_found",
    )?;
    ensure!(
        ctl_json(&lab, &["crls", "list", "--listener", "web"])?["items"] == serde_json::json!([])
    );
    Ok(())
}

#[test]
fn api_settings_are_checked_at_start() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let config = write_config(
        &lab,
        &pki,
        "127.0.0.1:9",
        &boot,
        &common::uri("boot"),
        "bad",
    )?;
    let good = std::fs::read_to_string(&config)?;
    for (from, to, key) in [
        ("client_ca = ", "# client_ca = ", "api.client_ca"),
        (
            "socket = ",
            "socket_mode = 0o666\nsocket = ",
            "api.socket_mode",
        ),
        ("listen = \"127.0.0.1:0\"\ncert", "bogus = 1\ncert", "bogus"),
    ] {
        std::fs::write(&config, good.replacen(from, to, 1))?;
        let out = lab
            .cmd(&["serve", "--config", &config.display().to_string()])
            .output()?;
        let err = common::fail(out, "serve with a bad [api]")?;
        ensure!(err.contains(key), "error does not name {key}: {err}");
    }
    Ok(())
}
