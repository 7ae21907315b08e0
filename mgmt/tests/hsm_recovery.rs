//! The appliance in front of an HSM that dies, loses its token store, or freezes: the real
//! `tlsgate` binary on a SoftHSM2 token served out of process by p11-kit's server
//! (`p11-kit-server` from Debian `p11-kit`), reached through the client module
//! `p11-kit-client.so` (`p11-kit-modules`), the same shape as a network HSM. The server and
//! the `p11-kit-remote` process it starts per client form one process group of this test's
//! own, so killing or freezing "the HSM" touches nothing else. Several HSMs: `hsm_replicas.rs`.

mod common;

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::hsm_support::{client_config, get, have_parts, metric, p11_kit_client, scrape, Hsm};
use common::{check, demo_backend, uri, ChildGuard, Lab, Serve};
use rustls::{ClientConfig, HandshakeKind};
use std::sync::Arc;

/// The key-op deadline of the appliance under test: failures while the HSM is out must come
/// well before it (they fail at once instead of waiting for it).
const KEY_OP_DEADLINE: Duration = Duration::from_secs(10);
/// Issue 15: full handshakes succeed again within 5 s of the HSM being back.
const RECOVERY_BOUND: Duration = Duration::from_secs(5);

struct Appliance {
    lab: Lab,
    hsm: Hsm,
    serve: Serve,
    sw_port: u16,
    metrics: String,
    _backend: ChildGuard,
}

/// The appliance's configuration: the token through p11-kit's client, a token-key listener
/// `hsm` and a software-key listener `sw`; `key_ops` goes under `[dataplane.key_ops]`.
fn config(
    lab: &Lab,
    backend: &str,
    extra_pkcs11: &str,
    with_api: bool,
    key_ops: &str,
) -> Result<PathBuf> {
    let (sw_key, sw_chain) = lab.software_key_with_chain("EC", "sw")?;
    let api = if with_api {
        format!(
            "[api]\nsocket = \"{}\"\n\n[state]\ndir = \"{}\"\n",
            lab.p("api.sock"),
            lab.p("state")
        )
    } else {
        String::new()
    };
    let path = lab.path(if with_api { "hsm.toml" } else { "plain.toml" });
    std::fs::write(
        &path,
        format!(
            r#"[pkcs11]
module = "{client}"
token = "lab"
pin = "file:{pin}"
{extra_pkcs11}

[metrics]
listen = "127.0.0.1:0"

{api}
[dataplane]
cores = [0]
io = "portable"

[dataplane.key_ops]
{key_ops}

[[listener]]
name = "hsm"
bind = "127.0.0.1:0"
backend = "{backend}"

[[listener.certificate]]
chain = "{chain}"
key = "{key}"

[[listener]]
name = "sw"
bind = "127.0.0.1:0"
backend = "{backend}"

[[listener.certificate]]
chain = "{sw_chain}"
key = "file:{sw_key}"
"#,
            client = p11_kit_client().display(),
            pin = lab.p("token/user.pin"),
            chain = lab.p("certs/web.pem"),
            key = uri("web"),
            sw_chain = sw_chain.display(),
            sw_key = sw_key.display(),
        ),
    )?;
    Ok(path)
}

fn start(extra_pkcs11: &str, with_api: bool) -> Result<Appliance> {
    let key_ops = format!("deadline_ms = {}", KEY_OP_DEADLINE.as_millis());
    start_with(extra_pkcs11, with_api, &key_ops)
}

fn start_with(extra_pkcs11: &str, with_api: bool, key_ops: &str) -> Result<Appliance> {
    let lab = Lab::new()?;
    lab.token_key_with_chain("ec-p256", "web")?;
    let (backend, backend_addr) = demo_backend(lab.dir.path())?;
    let hsm = Hsm::start(&lab)?;
    let config = config(&lab, &backend_addr, extra_pkcs11, with_api, key_ops)?;
    let serve = Serve::start_with_env(&lab, &config, &[("P11_KIT_SERVER_ADDRESS", hsm.address())])?;
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    let addr_of = |name: &str| {
        ready
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|a| a.trim().to_owned())
            .with_context(|| format!("{name} in the ready file:\n{ready}"))
    };
    let sw_port = addr_of("sw")?.rsplit(':').next().context("port")?.parse()?;
    let metrics = addr_of("metrics")?;
    Ok(Appliance {
        lab,
        hsm,
        serve,
        sw_port,
        metrics,
        _backend: backend,
    })
}

/// Waits (up to `limit`) until the exporter shows `name{labels}` == `want` (it publishes the
/// HSM's state about once a second).
fn wait_metric(app: &Appliance, name: &str, labels: &[&str], want: f64) -> Result<String> {
    let start = Instant::now();
    loop {
        let text = scrape(&app.metrics)?;
        if metric(&text, name, labels) == want {
            return Ok(text);
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("{name}{labels:?} never became {want}:\n{text}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Full handshakes fail at once while the HSM is out: each well before the key-op deadline.
fn full_handshakes_fail_fast(app: &Appliance, full: &Arc<ClientConfig>) -> Result<()> {
    for _ in 0..3 {
        let t0 = Instant::now();
        ensure!(
            get(app.serve.port, full).is_err(),
            "a full handshake succeeded while the HSM is out"
        );
        let took = t0.elapsed();
        ensure!(
            took * 4 < KEY_OP_DEADLINE,
            "a failing full handshake took {took:?}: it waited for the HSM instead of failing at once"
        );
    }
    Ok(())
}

/// Polls full handshakes from `since` until one succeeds; how long after `since` it did.
fn back_within(
    app: &Appliance,
    full: &Arc<ClientConfig>,
    since: Instant,
    what: &str,
) -> Result<Duration> {
    loop {
        if get(app.serve.port, full).is_ok() {
            return Ok(since.elapsed());
        }
        ensure!(
            since.elapsed() <= RECOVERY_BOUND,
            "{what}: no full handshake succeeded within {RECOVERY_BOUND:?}; HSM metrics:\n{}",
            hsm_metrics(app)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn hsm_metrics(app: &Appliance) -> String {
    // What the exporter says about the HSM, for a failure message.
    scrape(&app.metrics)
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("hsm"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[test]
fn a_killed_hsm_is_back_in_service_without_a_restart() -> Result<()> {
    if !have_parts() {
        return Ok(());
    }
    let mut app = start("", false)?;
    let full = client_config(&app.lab, false)?;
    let resuming = client_config(&app.lab, true)?;
    ensure!(get(app.serve.port, &full)? == HandshakeKind::Full);
    // A session to resume while the HSM is out.
    ensure!(get(app.serve.port, &resuming)? == HandshakeKind::Full);
    wait_metric(&app, "tlsgate_hsm_up", &["token=\"lab\""], 1.0)?;

    app.hsm.kill()?;
    full_handshakes_fail_fast(&app, &full)?;
    ensure!(
        get(app.serve.port, &resuming).context("resumption while the HSM is out")?
            == HandshakeKind::Resumed,
        "the resumption needed the HSM"
    );
    ensure!(
        get(app.sw_port, &full).context("software-key listener while the HSM is out")?
            == HandshakeKind::Full
    );
    wait_metric(&app, "tlsgate_hsm_up", &["token=\"lab\""], 0.0)?;

    app.hsm.restart()?;
    let back = Instant::now();
    let took = back_within(&app, &full, back, "HSM restarted")?;
    println!("full handshakes back {took:?} after the HSM restarted");

    let text = wait_metric(&app, "tlsgate_hsm_up", &["token=\"lab\""], 1.0)?;
    ensure!(
        metric(&text, "tlsgate_hsm_recoveries_total", &[]) >= 1.0,
        "{text}"
    );
    ensure!(
        metric(&text, "tlsgate_hsm_reinitialisations_total", &[]) >= 1.0,
        "a restarted p11-kit server needs the module re-initialised:\n{text}"
    );
    ensure!(
        metric(&text, "tlsgate_hsm_ops_total", &["outcome=\"unavailable\""]) >= 2.0,
        "fast failures are counted:\n{text}"
    );
    Ok(())
}

#[test]
fn a_token_store_moved_away_and_back_is_back_in_service() -> Result<()> {
    if !have_parts() {
        return Ok(());
    }
    let app = start("", false)?;
    let full = client_config(&app.lab, false)?;
    ensure!(get(app.serve.port, &full)? == HandshakeKind::Full);

    let store = app.lab.path("token/tokens");
    let away = app.lab.path("token/tokens.away");
    std::fs::rename(&store, &away)?;
    // The first failure finds out; the ones after fail at once.
    ensure!(
        get(app.serve.port, &full).is_err(),
        "signed without a token store"
    );
    full_handshakes_fail_fast(&app, &full)?;
    ensure!(get(app.sw_port, &full)? == HandshakeKind::Full);

    std::fs::rename(&away, &store)?;
    let took = back_within(&app, &full, Instant::now(), "token store back")?;
    println!("full handshakes back {took:?} after the token store came back");
    Ok(())
}

/// `tlsgate ctl --socket <lab>/api.sock ARGS`, timed.
fn ctl(lab: &Lab, args: &[&str]) -> Result<(std::process::Output, Duration)> {
    let t0 = Instant::now();
    let out = common::tlsgate()
        .args(["ctl", "--socket", &lab.p("api.sock")])
        .args(args)
        .output()?;
    Ok((out, t0.elapsed()))
}

#[test]
fn a_frozen_hsm_gets_deadlines_for_management_and_start_up() -> Result<()> {
    if !have_parts() {
        return Ok(());
    }
    const CALL_MS: u64 = 1500;
    const OPEN_MS: u64 = 1500;
    let app = start(
        &format!("call_timeout_ms = {CALL_MS}\nopen_timeout_ms = {OPEN_MS}"),
        true,
    )?;
    let (out, _) = ctl(&app.lab, &["keys", "list"])?;
    let listed = check(out, "ctl keys list")?;
    ensure!(listed.contains("web"), "{listed}");

    app.hsm.signal("-STOP")?;
    let (out, took) = ctl(&app.lab, &["keys", "list"])?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "ctl keys list succeeded on a frozen HSM"
    );
    ensure!(
        stderr.contains("hsm_timeout") && stderr.contains(&format!("{CALL_MS} ms")),
        "ctl keys list should name the timeout: {stderr}"
    );
    let call = Duration::from_millis(CALL_MS);
    ensure!(
        took >= call && took < 3 * call,
        "ctl keys list answered after {took:?}, its deadline is {call:?}"
    );

    // A second appliance on the frozen HSM (its own ports, no API): start-up gives up with the
    // reason instead of hanging.
    let plain = config(
        &app.lab,
        "127.0.0.1:9",
        &format!("open_timeout_ms = {OPEN_MS}"),
        false,
        "",
    )?;
    let t0 = Instant::now();
    let mut cmd = common::tlsgate();
    app.lab.env(&mut cmd);
    let out = cmd
        .env("P11_KIT_SERVER_ADDRESS", app.hsm.address())
        .args(["serve", "--config"])
        .arg(&plain)
        .output()?;
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "serve started on a frozen HSM");
    ensure!(
        stderr.contains("did not answer within") && stderr.contains("opening token"),
        "serve should say why it stopped: {stderr}"
    );
    let open = Duration::from_millis(OPEN_MS);
    ensure!(
        took >= open && took < 4 * open,
        "serve gave up after {took:?}, its start-up deadline is {open:?}"
    );

    // Thawed, the same call answers again.
    app.hsm.signal("-CONT")?;
    let start = Instant::now();
    loop {
        let (out, _) = ctl(&app.lab, &["keys", "list"])?;
        if out.status.success() {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "ctl keys list still fails after the thaw: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        thread::sleep(Duration::from_millis(100));
    }

    // Frozen again, with a management call stuck on it: SIGTERM still ends the process.
    app.hsm.signal("-STOP")?;
    let (out, _) = ctl(&app.lab, &["keys", "list"])?;
    ensure!(
        !out.status.success(),
        "ctl keys list succeeded on a frozen HSM"
    );
    app.serve.signal("TERM")?;
    let mut serve = app.serve;
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = serve.guard.child.try_wait()? {
            break status;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "serve did not exit on SIGTERM while a call hangs on the frozen HSM"
        );
        thread::sleep(Duration::from_millis(50));
    };
    ensure!(status.success(), "serve exited with {status}");
    app.hsm.signal("-CONT")?;
    Ok(())
}

#[test]
fn a_stalled_hsm_shows_in_the_queue_depth_and_late_answers_are_counted() -> Result<()> {
    if !have_parts() {
        return Ok(());
    }
    const WORKERS: usize = 2;
    const HANDSHAKES: usize = 6;
    let app = start_with(
        "",
        false,
        &format!("workers = {WORKERS}\ndeadline_ms = 1000"),
    )?;
    let full = client_config(&app.lab, false)?;
    ensure!(get(app.serve.port, &full)? == HandshakeKind::Full);

    app.hsm.signal("-STOP")?;
    // A reload now hangs on the frozen token (off the signal loop, with a deadline): the loop
    // must go on publishing metrics, or the queue depth below is never seen.
    app.serve.signal("HUP")?;
    thread::sleep(Duration::from_millis(200));
    // Two requests hang in the token, the rest wait in the queue behind them.
    let clients: Vec<_> = (0..HANDSHAKES)
        .map(|_| {
            let (port, full) = (app.serve.port, full.clone());
            thread::spawn(move || get(port, &full).is_ok())
        })
        .collect();
    let text = wait_metric_at_least(&app, "tlsgate_key_op_queue_depth", HANDSHAKES as f64)?;
    let depth = metric(&text, "tlsgate_key_op_queue_depth", &[]);
    for c in clients {
        ensure!(
            !c.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))?,
            "a full handshake succeeded on a frozen HSM"
        );
    }
    app.hsm.signal("-CONT")?;

    // Thawed: the two hung signatures finish after their deadline (late), the queued ones are
    // taken after theirs and never run (timeout); the queue empties.
    let text = wait_metric(&app, "tlsgate_key_op_queue_depth", &[], 0.0)?;
    let late = metric(&text, "tlsgate_hsm_ops_total", &["outcome=\"late\""]);
    let timeout = metric(&text, "tlsgate_hsm_ops_total", &["outcome=\"timeout\""]);
    println!("queue depth while frozen {depth}; late {late}, timeout {timeout}");
    ensure!(late >= 1.0, "no late completion counted:\n{text}");
    ensure!(timeout >= 1.0, "no request expired in the queue:\n{text}");
    ensure!(
        late + timeout >= HANDSHAKES as f64,
        "every stalled request is either late or timed out:\n{text}"
    );
    // And the HSM serves again (nothing here was a device error).
    ensure!(get(app.serve.port, &full)? == HandshakeKind::Full);
    Ok(())
}

/// Waits (up to 10 s) until the exporter shows `name` at `want` or more.
fn wait_metric_at_least(app: &Appliance, name: &str, want: f64) -> Result<String> {
    let start = Instant::now();
    loop {
        let text = scrape(&app.metrics)?;
        if metric(&text, name, &[]) >= want {
            return Ok(text);
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("{name} never reached {want}:\n{text}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_outage_is_found_by_the_probe_before_a_handshake_meets_it() -> Result<()> {
    if !have_parts() {
        return Ok(());
    }
    let mut app = start("probe_interval_ms = 200", false)?;
    let full = client_config(&app.lab, false)?;
    ensure!(get(app.serve.port, &full)? == HandshakeKind::Full);
    wait_metric(&app, "tlsgate_hsm_up", &["token=\"lab\""], 1.0)?;

    // No traffic: only the probe can find out.
    app.hsm.kill()?;
    let text = wait_metric(&app, "tlsgate_hsm_up", &["token=\"lab\""], 0.0)?;
    ensure!(
        metric(&text, "tlsgate_hsm_ops_total", &["outcome=\"error\""]) == 0.0,
        "a signature met the outage before the probe did:\n{text}"
    );

    app.hsm.restart()?;
    wait_metric(&app, "tlsgate_hsm_up", &["token=\"lab\""], 1.0)?;
    // Back in service before any client asked: the first full handshake succeeds.
    ensure!(get(app.serve.port, &full)? == HandshakeKind::Full);
    let text = scrape(&app.metrics)?;
    ensure!(
        metric(&text, "tlsgate_hsm_ops_total", &["outcome=\"error\""]) == 0.0
            && metric(&text, "tlsgate_hsm_ops_total", &["outcome=\"unavailable\""]) == 0.0,
        "no handshake should have failed:\n{text}"
    );
    Ok(())
}

#[test]
fn start_degraded_serves_software_keys_on_a_frozen_hsm_and_token_keys_once_it_thaws() -> Result<()>
{
    if !have_parts() {
        return Ok(());
    }
    const OPEN_MS: u64 = 1500;
    let lab = Lab::new()?;
    lab.token_key_with_chain("ec-p256", "web")?;
    let (backend, backend_addr) = demo_backend(lab.dir.path())?;
    let hsm = Hsm::start(&lab)?;
    let path = config(
        &lab,
        &backend_addr,
        &format!("open_timeout_ms = {OPEN_MS}\nstart_degraded = true"),
        false,
        &format!("deadline_ms = {}", KEY_OP_DEADLINE.as_millis()),
    )?;
    hsm.signal("-STOP")?;
    let t0 = Instant::now();
    let serve = Serve::start_with_env(&lab, &path, &[("P11_KIT_SERVER_ADDRESS", hsm.address())])?;
    let started = t0.elapsed();
    let took = started;
    let open = Duration::from_millis(OPEN_MS);
    // Started (ready file written) after giving the HSM its open_timeout, not waiting for it.
    ensure!(
        took >= open && took < 4 * open,
        "serve became ready after {took:?} on a frozen HSM, its start-up deadline is {open:?}"
    );
    let ready = std::fs::read_to_string(path.with_extension("ready"))?;
    let addr_of = |name: &str| {
        ready
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|a| a.trim().to_owned())
            .with_context(|| format!("{name} in the ready file:\n{ready}"))
    };
    let sw_port: u16 = addr_of("sw")?.rsplit(':').next().context("port")?.parse()?;
    let app = Appliance {
        sw_port,
        metrics: addr_of("metrics")?,
        lab,
        hsm,
        serve,
        _backend: backend,
    };
    let full = client_config(&app.lab, false)?;
    get(app.sw_port, &full).context("the software-key listener while degraded")?;
    full_handshakes_fail_fast(&app, &full)?;
    let text = wait_metric(&app, "tlsgate_hsm_up", &["token=\"lab\""], 0.0)?;
    ensure!(
        metric(&text, "tlsgate_hsm_breaker_state", &["token=\"lab\""]) == 2.0,
        "breaker not open while degraded:\n{text}"
    );
    ensure!(
        metric(&text, "tlsgate_certificates_awaiting_token", &[]) == 1.0,
        "the token-key certificate is not shown waiting for the token:\n{text}"
    );
    wait_metric_at_least_labels(
        &app,
        "tlsgate_hsm_ops_total",
        &["outcome=\"unavailable\""],
        3.0,
    )?;

    app.hsm.signal("-CONT")?;
    let thawed = Instant::now();
    let took = back_within(&app, &full, thawed, "thawed after a degraded start")?;
    println!(
        "degraded start ready after {started:?}; token-key handshakes back {took:?} after the thaw"
    );
    wait_metric(&app, "tlsgate_hsm_up", &["token=\"lab\""], 1.0)?;
    wait_metric(&app, "tlsgate_certificates_awaiting_token", &[], 0.0)?;
    get(app.sw_port, &full).context("the software-key listener after the thaw")?;
    Ok(())
}

/// Waits (up to 10 s) until `name{labels}` is at least `want`.
fn wait_metric_at_least_labels(
    app: &Appliance,
    name: &str,
    labels: &[&str],
    want: f64,
) -> Result<String> {
    let start = Instant::now();
    loop {
        let text = scrape(&app.metrics)?;
        if metric(&text, name, labels) >= want {
            return Ok(text);
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("{name}{labels:?} never reached {want}:\n{text}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}
