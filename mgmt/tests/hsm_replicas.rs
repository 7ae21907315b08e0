//! Several HSMs holding the same key: token A served out of process by p11-kit's server (killed
//! and restarted under load), token B in process (SoftHSM2), both with one PKCS#8 key imported;
//! and a replica whose key differs, refused at start.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::ensure;
use anyhow::{Context, Result};
use common::hsm_support::{
    client_config, get, have_parts, metric, p11_kit_client, scrape, Hsm, SOFTHSM2,
};
use common::{check, demo_backend, uri, Lab, Serve};
use rustls::ClientConfig;

/// The key-op deadline of the appliance under test.
const KEY_OP_DEADLINE: Duration = Duration::from_secs(10);

/// Full-handshake clients until `stop`; (ok, failed).
fn steady_load(
    port: u16,
    config: &Arc<ClientConfig>,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<(u64, u64)>> {
    (0..clients)
        .map(|_| {
            let (config, stop) = (config.clone(), stop.clone());
            thread::spawn(move || {
                let (mut ok, mut failed) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    match get(port, &config) {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect()
}

fn finish(load: Vec<thread::JoinHandle<(u64, u64)>>, stop: &Arc<AtomicBool>) -> Result<(u64, u64)> {
    stop.store(true, Ordering::Relaxed);
    let mut sum = (0, 0);
    for t in load {
        let (ok, failed) = t
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        sum = (sum.0 + ok, sum.1 + failed);
    }
    Ok(sum)
}

#[test]
fn two_hsms_share_the_load_and_losing_one_loses_no_handshake() -> Result<()> {
    if !have_parts() || !common::require("softhsm2-util", "softhsm2") {
        return Ok(());
    }
    const WORKERS: u64 = 4;
    let lab = Lab::new()?;
    // Token B beside token A in the same SoftHSM2 store, with A's PIN; the same key imported
    // into both from one PKCS#8 file.
    let pin = std::fs::read_to_string(lab.path("token/user.pin"))?
        .trim()
        .to_owned();
    check(
        Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", lab.path("token/softhsm2.conf"))
            .args(["--init-token", "--free", "--label", "lab-b"])
            .args(["--so-pin", "so-pin-b-1234", "--pin", &pin])
            .output()?,
        "softhsm2-util --init-token lab-b",
    )?;
    let key = lab.path("web.key");
    check(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .arg("-out")
            .arg(&key)
            .output()?,
        "openssl genpkey",
    )?;
    for token in ["lab", "lab-b"] {
        let mut c = lab.cmd(&[
            "token",
            "import",
            "--label",
            "web",
            "--key-file",
            &lab.p("web.key"),
        ]);
        check(c.env("TLSGATE_TOKEN", token).output()?, "token import")?;
    }
    lab.localhost_chain("web")?;
    let (_backend, backend_addr) = demo_backend(lab.dir.path())?;
    let mut hsm_a = Hsm::start(&lab)?;
    let config = lab.path("two.toml");
    std::fs::write(
        &config,
        format!(
            r#"[pkcs11]
module = "{client}"
token = "lab"
pin = "file:{pin_file}"
probe_interval_ms = 200

[[pkcs11.replica]]
module = "{SOFTHSM2}"
token = "lab-b"
pin = "file:{pin_file}"

[metrics]
listen = "127.0.0.1:0"

[dataplane]
cores = [0]
io = "portable"

[dataplane.key_ops]
workers = {WORKERS}
deadline_ms = {deadline}

[[listener]]
name = "hsm"
bind = "127.0.0.1:0"
backend = "{backend_addr}"

[[listener.certificate]]
chain = "{chain}"
key = "{key}"
"#,
            client = p11_kit_client().display(),
            pin_file = lab.p("token/user.pin"),
            deadline = KEY_OP_DEADLINE.as_millis(),
            chain = lab.p("certs/web.pem"),
            key = uri("web"),
        ),
    )?;
    let serve = Serve::start_with_env(
        &lab,
        &config,
        &[("P11_KIT_SERVER_ADDRESS", hsm_a.address())],
    )?;
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    let metrics = ready
        .lines()
        .find_map(|l| l.strip_prefix("metrics "))
        .context("metrics address")?
        .trim()
        .to_owned();
    let ok_on = |text: &str, token: &str| {
        metric(
            text,
            "tlsgate_hsm_ops_total",
            &[&format!("token=\"{token}\""), "outcome=\"ok\""],
        )
    };
    let full = client_config(&lab, false)?;
    let stop = Arc::new(AtomicBool::new(false));

    // Both in service: the load reaches both.
    let load = steady_load(serve.port, &full, 4, &stop);
    thread::sleep(Duration::from_millis(1500));
    hsm_a.kill()?;
    thread::sleep(Duration::from_millis(2000));
    let (ok, failed) = finish(load, &stop)?;
    println!("A killed under load: {ok} handshakes ok, {failed} failed");
    ensure!(ok > 0, "no handshake completed");
    // A failure on A is retried once on B within the same deadline: at most the signatures in
    // flight on A at that instant (bounded by the workers) may fail, and they are retried too.
    ensure!(
        failed <= WORKERS,
        "{failed} handshakes failed when one of two HSMs died"
    );

    hsm_a.restart()?;
    let start = Instant::now();
    let before = loop {
        let text = scrape(&metrics)?;
        if metric(&text, "tlsgate_hsm_up", &["token=\"lab\""]) == 1.0 {
            break text;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "HSM A not back in service:\n{text}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    stop.store(false, Ordering::Relaxed);
    let load = steady_load(serve.port, &full, 4, &stop);
    thread::sleep(Duration::from_millis(2000));
    let (ok, failed) = finish(load, &stop)?;
    // Counters reach the exporter about once a second.
    thread::sleep(Duration::from_millis(1500));
    let after = scrape(&metrics)?;
    let (a, b) = (
        ok_on(&after, "lab") - ok_on(&before, "lab"),
        ok_on(&after, "lab-b") - ok_on(&before, "lab-b"),
    );
    println!("A back: {ok} ok, {failed} failed; signatures on A {a}, on B {b}");
    ensure!(
        failed == 0,
        "{failed} handshakes failed with both HSMs in service"
    );
    ensure!(
        a > 0.0 && b > 0.0,
        "load did not spread to both HSMs (A {a}, B {b}):\n{after}"
    );
    Ok(())
}

#[test]
fn a_replica_with_another_public_key_is_refused_at_start() -> Result<()> {
    if !common::require("softhsm2-util", "softhsm2") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let chain = lab.token_key_with_chain("ec-p256", "web")?;
    let pin = std::fs::read_to_string(lab.path("token/user.pin"))?
        .trim()
        .to_owned();
    check(
        Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", lab.path("token/softhsm2.conf"))
            .args(["--init-token", "--free", "--label", "lab-c"])
            .args(["--so-pin", "so-pin-c-1234", "--pin", &pin])
            .output()?,
        "softhsm2-util --init-token lab-c",
    )?;
    // Same label, another key.
    let mut c = lab.cmd(&["token", "generate", "--type", "ec-p256", "--label", "web"]);
    check(
        c.env("TLSGATE_TOKEN", "lab-c").output()?,
        "token generate on lab-c",
    )?;
    let config = lab.path("mismatch.toml");
    std::fs::write(
        &config,
        format!(
            r#"[pkcs11]
module = "{SOFTHSM2}"
token = "lab"
pin = "file:{pin_file}"

[[pkcs11.replica]]
module = "{SOFTHSM2}"
token = "lab-c"
pin = "file:{pin_file}"

[dataplane]
cores = [0]
io = "portable"

[[listener]]
name = "hsm"
bind = "127.0.0.1:0"
backend = "127.0.0.1:9"

[[listener.certificate]]
chain = "{chain}"
key = "{key}"
"#,
            pin_file = lab.p("token/user.pin"),
            chain = chain.display(),
            key = uri("web"),
        ),
    )?;
    let mut cmd = common::tlsgate();
    lab.env(&mut cmd);
    let out = cmd.args(["serve", "--config"]).arg(&config).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "serve started with a mismatched replica"
    );
    ensure!(
        stderr.contains("replica token \"lab-c\"") && stderr.contains("another public key"),
        "serve should name the replica and the mismatch: {stderr}"
    );
    Ok(())
}
