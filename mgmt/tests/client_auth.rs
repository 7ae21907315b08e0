//! Client-certificate authentication per listener against the real `tlsgate` binary: each
//! listener trusts its own zone's CA and CRLs; real clients (curl, openssl s_client,
//! gnutls-cli) with certificates made by rcgen; a CRL replaced at run time (SIGHUP).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::policy_support::{
    lab_cert, log_lines, metrics_addr, negotiated_cipher, run_cmd, s_client, wait_closed_reason,
    wait_log, Run, Zone,
};
use common::{demo_backend, fail, Lab, Serve};

const BODY: &str = "hello from the tlsgate demo backend";

struct Setup {
    lab: Lab,
    zone_a: Zone,
    zone_b: Zone,
    crl: PathBuf,
    config: PathBuf,
    _backend: common::ChildGuard,
}

/// Zone A issues alice, carol, mallory (revoked from the start) and eve (expired); zone B
/// issues bob.
/// Listeners: `required` and `optional`, both trusting zone A only, with zone A's CRL.
fn setup() -> Result<Setup> {
    let lab = Lab::new()?;
    let (key, chain) = lab_cert(&lab, "EC", "server", "localhost", &["localhost"])?;
    let dir = lab.path("zones");
    std::fs::create_dir_all(&dir)?;
    let mut zone_a = Zone::new(&dir, "zone-a")?;
    let mut zone_b = Zone::new(&dir, "zone-b")?;
    for cn in ["alice", "carol", "mallory"] {
        zone_a.client(cn)?;
    }
    zone_a.client_valid("eve", false)?;
    zone_b.client("bob")?;
    let crl = dir.join("zone-a.crl.pem");
    zone_a.write_crl(&crl, 1, &["mallory"])?;
    let (backend, backend_addr) = demo_backend(lab.dir.path())?;
    let mut toml = String::from(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[dataplane]\ncores = [0]\nio = \"portable\"\n",
    );
    for mode in ["required", "optional"] {
        toml += &format!(
            "\n[[listener]]\nname = \"{mode}\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend_addr}\"\n\
             [[listener.certificate]]\nchain = \"{}\"\nkey = \"file:{}\"\n\
             [listener.client_auth]\nmode = \"{mode}\"\nca = \"{}\"\ncrls = [\"{}\"]\n",
            chain.display(),
            key.display(),
            zone_a.ca_path().display(),
            crl.display()
        );
    }
    let config = lab.path("mtls.toml");
    std::fs::write(&config, toml)?;
    Ok(Setup {
        lab,
        zone_a,
        zone_b,
        crl,
        config,
        _backend: backend,
    })
}

fn ports(config: &Path) -> Result<(u16, u16)> {
    let text = std::fs::read_to_string(config.with_extension("ready"))?;
    let port = |name: &str| -> Result<u16> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|a| a.rsplit(':').next())
            .context("listener in ready file")?
            .parse()
            .map_err(Into::into)
    };
    Ok((port("required")?, port("optional")?))
}

/// curl with `client` ("zone-a-alice", ...) or no certificate.
fn curl(s: &Setup, port: u16, client: Option<&str>) -> Result<Run> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "20",
        "--cacert",
        &s.lab.p("ca/root.pem"),
    ])
    .args(["--resolve", &format!("localhost:{port}:127.0.0.1")]);
    if let Some(c) = client {
        let dir = s.lab.path("zones");
        cmd.arg("--cert")
            .arg(dir.join(format!("{c}.pem")))
            .arg("--key")
            .arg(dir.join(format!("{c}.key")));
    }
    cmd.arg(format!("https://localhost:{port}/"));
    run_cmd(&mut cmd)
}

fn accepted(r: &Run) -> bool {
    r.ok && r.text.contains(BODY)
}

#[test]
fn client_certificates_are_checked_against_the_listeners_zone_and_crl_with_curl() -> Result<()> {
    let s = setup()?;
    let mut serve = Serve::start(&s.lab, &s.config)?;
    let logs = log_lines(&mut serve)?;
    let (required, optional) = ports(&s.config)?;

    // required: only a current certificate from zone A gets through.
    let r = curl(&s, required, Some("zone-a-alice"))?;
    ensure!(accepted(&r), "alice (zone A) refused:\n{}", r.text);
    let r = curl(&s, required, Some("zone-b-bob"))?;
    ensure!(
        !accepted(&r) && r.text.contains("unknown ca"),
        "bob (zone B) must be refused as unknown CA:\n{}",
        r.text
    );
    let r = curl(&s, required, Some("zone-a-mallory"))?;
    ensure!(
        !accepted(&r) && r.text.contains("certificate revoked"),
        "mallory (revoked) must be refused as revoked:\n{}",
        r.text
    );
    let r = curl(&s, required, Some("zone-a-eve"))?;
    ensure!(
        !accepted(&r) && r.text.contains("certificate expired"),
        "eve (expired) must be refused as expired:\n{}",
        r.text
    );
    let r = curl(&s, required, None)?;
    ensure!(
        !accepted(&r) && r.text.contains("certificate required"),
        "no certificate must be refused:\n{}",
        r.text
    );

    // optional: no certificate is fine; a presented one must still pass.
    let r = curl(&s, optional, None)?;
    ensure!(
        accepted(&r),
        "optional mode refused a client without certificate:\n{}",
        r.text
    );
    let r = curl(&s, optional, Some("zone-a-alice"))?;
    ensure!(accepted(&r), "{}", r.text);
    let r = curl(&s, optional, Some("zone-b-bob"))?;
    ensure!(!accepted(&r) && r.text.contains("unknown ca"), "{}", r.text);
    let r = curl(&s, optional, Some("zone-a-mallory"))?;
    ensure!(
        !accepted(&r) && r.text.contains("certificate revoked"),
        "{}",
        r.text
    );

    // Five refusals so far, each counted as the client's certificate failing.
    let (seen, last) = wait_closed_reason(&metrics_addr(&s.config)?, "client_cert_rejected", 5.0)?;
    ensure!(
        seen,
        "no client_cert_rejected count of 5 in /metrics:\n{last}"
    );

    // A new CRL revoking alice, picked up at run time.
    s.zone_a.write_crl(&s.crl, 2, &["mallory", "alice"])?;
    serve.signal("HUP")?;
    wait_log(&logs, "reloaded")?;
    let r = curl(&s, required, Some("zone-a-alice"))?;
    ensure!(
        !accepted(&r) && r.text.contains("certificate revoked"),
        "alice revoked at run time must be refused:\n{}",
        r.text
    );
    let r = curl(&s, required, Some("zone-a-carol"))?;
    ensure!(accepted(&r), "carol is not revoked:\n{}", r.text);

    // A CRL from another zone (or garbage) is refused on reload; the running one stays.
    s.zone_b.write_crl(&s.crl, 3, &["bob"])?;
    serve.signal("HUP")?;
    let line = wait_log(&logs, "reload refused")?;
    ensure!(line.contains("not a CA of this listener"), "{line}");
    let r = curl(&s, required, Some("zone-a-alice"))?;
    ensure!(
        !accepted(&r),
        "the refused reload must not drop the revocation"
    );
    let r = curl(&s, required, Some("zone-a-carol"))?;
    ensure!(accepted(&r), "{}", r.text);
    Ok(())
}

#[test]
fn openssl_and_gnutls_clients_are_accepted_or_refused_as_configured() -> Result<()> {
    let s = setup()?;
    let _serve = Serve::start(&s.lab, &s.config)?;
    let (required, _) = ports(&s.config)?;
    let dir = s.lab.path("zones");
    let cert = |c: &str| dir.join(format!("{c}.pem")).display().to_string();
    let key = |c: &str| dir.join(format!("{c}.key")).display().to_string();
    // TLS 1.2: the server checks the client certificate before its Finished.
    for (client, ok, alert) in [
        ("zone-a-alice", true, ""),
        ("zone-b-bob", false, "unknown ca"),
        ("zone-a-mallory", false, "certificate revoked"),
    ] {
        let (c, k) = (cert(client), key(client));
        let r = s_client(
            required,
            &[
                "-servername",
                "localhost",
                "-tls1_2",
                "-cert",
                &c,
                "-key",
                &k,
            ],
        )?;
        // s_client prints the session even when the server's answer to its Finished is an
        // alert: the alert decides.
        let refused = r.text.contains("SSL alert number");
        ensure!(
            negotiated_cipher(&r.text).is_some() && refused != ok && r.text.contains(alert),
            "s_client {client}: wanted ok={ok} {alert:?}:\n{}",
            r.text
        );
        // The server asks for certificates of zone A only.
        ensure!(
            r.text.contains("zone-a client CA"),
            "CA names sent:\n{}",
            r.text
        );
    }
    // A resumed session's certificate is checked again by the listener's current verifier: a
    // current certificate resumes.
    let sess = s.lab.path("alice.sess");
    let sess = sess.display().to_string();
    let (c, k) = (cert("zone-a-alice"), key("zone-a-alice"));
    let base = [
        "-servername",
        "localhost",
        "-tls1_2",
        "-cert",
        &c,
        "-key",
        &k,
    ];
    let r = s_client(required, &[&base[..], &["-sess_out", &sess]].concat())?;
    ensure!(r.text.contains("New, TLSv1.2"), "{}", r.text);
    let r = s_client(required, &[&base[..], &["-sess_in", &sess]].concat())?;
    ensure!(
        r.text.contains("Reused, TLSv1.2") && !r.text.contains("SSL alert number"),
        "alice's session should resume:\n{}",
        r.text
    );
    if !common::require("gnutls-cli", "gnutls-bin") {
        return Ok(());
    }
    for (client, ok) in [
        ("zone-a-alice", true),
        ("zone-b-bob", false),
        ("zone-a-mallory", false),
    ] {
        let r = run_cmd(
            Command::new("gnutls-cli")
                .args(["--x509cafile", &s.lab.p("ca/root.pem")])
                .args([
                    "--x509certfile",
                    &cert(client),
                    "--x509keyfile",
                    &key(client),
                ])
                .args(["--priority", "NORMAL:-VERS-ALL:+VERS-TLS1.2"])
                .args([
                    "--sni-hostname",
                    "localhost",
                    "--verify-hostname",
                    "localhost",
                ])
                .args(["-p", &required.to_string(), "127.0.0.1"]),
        )?;
        let handshake = r.ok && r.text.contains("- Handshake was completed");
        ensure!(
            handshake == ok,
            "gnutls-cli {client}: wanted ok={ok}:\n{}",
            r.text
        );
    }
    Ok(())
}

#[test]
fn a_crl_from_another_zone_or_a_bad_ca_file_stops_the_start_with_a_clear_error() -> Result<()> {
    let s = setup()?;
    s.zone_b.write_crl(&s.crl, 1, &[])?;
    let out = s
        .lab
        .cmd(&["serve", "--config", &s.config.display().to_string()])
        .output()?;
    let err = fail(out, "serve with zone B's CRL on a zone A listener")?;
    ensure!(
        err.contains("client_auth")
            && err.contains("zone-b client CA")
            && err.contains("not a CA of this listener"),
        "{err}"
    );
    s.zone_a.write_crl(&s.crl, 1, &[])?;
    std::fs::write(s.zone_a.ca_path(), "not a certificate\n")?;
    let out = s
        .lab
        .cmd(&["serve", "--config", &s.config.display().to_string()])
        .output()?;
    let err = fail(out, "serve with an empty CA bundle")?;
    ensure!(
        err.contains("client_auth") && err.contains("no PEM CERTIFICATE"),
        "{err}"
    );
    Ok(())
}
