//! A listener's client CA bundle through the API, against a running appliance with real
//! clients (curl with client certificates, `openssl s_client` resuming a saved session):
//! uploading zone B's CA lets B's clients in and keeps zone A's out — also one resuming a
//! session made under zone A — survives a restart, and clearing it brings the configuration's
//! bundle back. A listener without `[listener.client_auth]` and a malformed bundle are refused
//! and change nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use common::acme_support::{write_config, Gate};
use common::policy_support::{let_in, Zone};
use common::{demo_backend, Lab};

/// One TLS 1.3 request with `openssl s_client` and this client certificate, saving the session
/// to `save` or resuming the one in `resume`; returns (resumed, answered).
fn s_client(
    port: u16,
    cert: &Path,
    key: &Path,
    save: Option<&Path>,
    resume: Option<&Path>,
) -> Result<(bool, bool)> {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost", "-tls1_3", "-ign_eof", "-cert"])
        .arg(cert)
        .arg("-key")
        .arg(key);
    if let Some(p) = save {
        cmd.arg("-sess_out").arg(p);
    }
    if let Some(p) = resume {
        cmd.arg("-sess_in").arg(p);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    }
    let text = String::from_utf8_lossy(&child.wait_with_output()?.stdout).into_owned();
    Ok((
        text.contains("Reused, TLSv1.3"),
        text.contains("hello from the tlsgate demo backend"),
    ))
}

fn ctl(lab: &Lab, gate: &Gate, args: &[&str]) -> Result<String> {
    let mut all = vec!["ctl", "--socket", &gate.socket];
    all.extend_from_slice(args);
    lab.run(&all)
}

/// `ctl ARGS` must fail with `code` in its error.
fn refused(lab: &Lab, gate: &Gate, args: &[&str], code: &str) -> Result<()> {
    common::ctl_refused_at(lab, &gate.socket, args, code).map(drop)
}

#[test]
fn an_uploaded_client_ca_bundle_replaces_the_configured_one_and_old_sessions_do_not_resume(
) -> Result<()> {
    if !(common::require("curl", "curl") && common::require("openssl", "openssl")) {
        return Ok(());
    }
    let lab = Lab::new()?;
    let dir = lab.path("zones");
    std::fs::create_dir_all(&dir)?;
    let mut zone_a = Zone::new(&dir, "zone-a")?;
    let mut zone_b = Zone::new(&dir, "zone-b")?;
    let (alice, alice_key) = zone_a.client("alice")?;
    let (bob, bob_key) = zone_b.client("bob")?;
    let ca_b = zone_b.ca_path().display().to_string();
    let garbage: PathBuf = dir.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;

    // A listener without client authentication: a bundle is refused, nothing is stored.
    let plain = Gate::start(&lab, &write_config(&lab, "plain", &backend, "")?)?;
    refused(
        &lab,
        &plain,
        &["client-ca", "set", "--listener", "web", "--file", &ca_b],
        "client_auth_not_configured",
    )?;
    ensure!(
        std::fs::read_dir(lab.path("state-plain/client-cas"))?.count() == 0,
        "nothing stored for a refused bundle"
    );
    drop(plain);

    let more = format!(
        "[listener.client_auth]\nmode = \"required\"\nca = \"{}\"\n",
        zone_a.ca_path().display()
    );
    let config = write_config(&lab, "mtls", &backend, &more)?;
    let gate = Gate::start(&lab, &config)?;
    let port = gate.port("web")?;
    ensure!(
        let_in(port, &alice, &alice_key)? && !let_in(port, &bob, &bob_key)?,
        "the configured bundle (zone A) lets alice in and keeps bob out"
    );
    let session = lab.path("alice.session");
    let (_, answered) = s_client(port, &alice, &alice_key, Some(&session), None)?;
    ensure!(answered, "alice's first session");
    let (resumed, answered) = s_client(port, &alice, &alice_key, None, Some(&session))?;
    ensure!(
        resumed && answered,
        "alice resumes under the configured bundle (the check below could fail)"
    );

    refused(
        &lab,
        &gate,
        &[
            "client-ca",
            "set",
            "--listener",
            "web",
            "--file",
            &garbage.display().to_string(),
        ],
        "client_ca_invalid",
    )?;
    ensure!(
        let_in(port, &alice, &alice_key)?,
        "a refused bundle changed nothing"
    );

    let shown = ctl(
        &lab,
        &gate,
        &["client-ca", "set", "--listener", "web", "--file", &ca_b],
    )?;
    ensure!(shown.contains("CN=zone-b client CA"), "{shown}");
    ensure!(
        let_in(port, &bob, &bob_key)? && !let_in(port, &alice, &alice_key)?,
        "the uploaded bundle (zone B) lets bob in and keeps alice out"
    );
    let (resumed, answered) = s_client(port, &alice, &alice_key, None, Some(&session))?;
    ensure!(
        !resumed && !answered,
        "alice's session from before the change neither resumes nor gets through (resumed {resumed}, answered {answered})"
    );
    let listed = ctl(&lab, &gate, &["listeners", "list"])?;
    ensure!(listed.contains("client_ca=uploaded(1)"), "{listed}");

    // It is state: a restart serves it.
    gate.kill()?;
    let gate = Gate::start(&lab, &config)?;
    let port = gate.port("web")?;
    ensure!(
        let_in(port, &bob, &bob_key)? && !let_in(port, &alice, &alice_key)?,
        "after a restart the uploaded bundle still decides"
    );
    let shown = ctl(
        &lab,
        &gate,
        &["--json", "client-ca", "show", "--listener", "web"],
    )?;
    let v: serde_json::Value = serde_json::from_str(&shown)?;
    ensure!(
        v["certificates"][0]["subject"] == "CN=zone-b client CA",
        "{v}"
    );

    ctl(&lab, &gate, &["client-ca", "clear", "--listener", "web"])?;
    ensure!(
        let_in(port, &alice, &alice_key)? && !let_in(port, &bob, &bob_key)?,
        "cleared: the configured bundle (zone A) decides again"
    );
    refused(
        &lab,
        &gate,
        &["client-ca", "show", "--listener", "web"],
        "client_ca_not_found",
    )?;
    let audit = std::fs::read_to_string(lab.path("state-mtls/audit.log"))?;
    ensure!(
        audit.contains("client_ca.put") && audit.contains("client_ca.delete"),
        "the audit log names the changes: {audit}"
    );
    Ok(())
}
