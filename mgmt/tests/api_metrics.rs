//! The Prometheus endpoint after real traffic through a certificate bound by the API: the
//! certificate expiry gauge per certificate and SNI name (NaN once no longer served), token
//! signature durations by backend and scheme, errors by source; and `promtool check metrics`
//! accepts the whole output; every metric the shipped dashboard and alerts (`contrib/`) name is in
//! that output, and the alerts pass their `promtool test rules` unit tests.

mod api_support;
mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use api_support::*;
use common::{demo_backend, Lab, Serve};

fn scrape(addr: &str) -> Result<String> {
    common::check(
        Command::new("curl")
            .args(["-sS", "--max-time", "10", &format!("http://{addr}/metrics")])
            .output()?,
        "scrape",
    )
}

/// The value of the first sample whose line starts with `series` (name and labels, as printed).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next())
        .map(|v| {
            if v == "NaN" {
                f64::NAN
            } else {
                v.parse().unwrap_or(f64::NAN)
            }
        })
        .next()
}

#[test]
fn metrics_move_with_traffic_and_pass_promtool() -> Result<()> {
    if !common::require("promtool", "prometheus") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "met")?;
    let text = std::fs::read_to_string(&config)?
        .replace("[api]", "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[api]");
    // An ACME entry whose CA never answers: its series (named by the alerts) exist all the same.
    let text = format!(
        "{text}\n[[acme]]\nname = \"met\"\ndirectory = \"https://127.0.0.1:1/directory\"\nnames = [\"met.acme.test\"]\nlisteners = [\"web\"]\n"
    );
    std::fs::write(&config, text)?;
    let serve = Serve::start(&lab, &config)?;
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    let metrics_addr = ready
        .lines()
        .find_map(|l| l.strip_prefix("metrics "))
        .context("ready file names the metrics endpoint")?
        .trim()
        .to_owned();

    // The file's certificate is served and has its gauge.
    let m = scrape(&metrics_addr)?;
    let boot_gauge = value(
        &m,
        "tlsgate_certificate_not_after_seconds",
        &[
            ("listener", "web"),
            ("certificate", "config:0"),
            ("name", "localhost"),
        ],
    );
    ensure!(boot_gauge.is_some_and(|v| v > 1.7e9), "{m}");

    // Bind an API certificate: its gauge appears with its not-after; the file's goes NaN.
    let chain = key_csr_chain(&lab, "met")?;
    let cert = ctl_json(
        &lab,
        &[
            "certs",
            "upload",
            "--id",
            "web",
            "--key",
            "met",
            "--chain",
            &chain.display().to_string(),
        ],
    )?;
    ctl_ok(
        &lab,
        &["listeners", "bind", "--listener", "web", "--cert", "web"],
    )?;
    let m = scrape(&metrics_addr)?;
    let gauge = value(
        &m,
        "tlsgate_certificate_not_after_seconds",
        &[
            ("listener", "web"),
            ("certificate", "web"),
            ("name", "localhost"),
        ],
    );
    ensure!(
        gauge == cert["not_after_unix"].as_f64(),
        "gauge {gauge:?} vs {}",
        cert["not_after_unix"]
    );
    let stale = value(
        &m,
        "tlsgate_certificate_not_after_seconds",
        &[("certificate", "config:0")],
    );
    ensure!(
        stale.is_some_and(f64::is_nan),
        "the unbound file certificate still has {stale:?}"
    );

    // Traffic: full handshakes signed on the token, and a peer that sends garbage.
    for _ in 0..5 {
        common::check(common::curl(&lab, serve.port, "/m", &[])?, "curl")?;
    }
    let mut s = std::net::TcpStream::connect(("127.0.0.1", serve.port))?;
    s.write_all(b"GET / HTTP/1.1\r\n\r\n")?;
    drop(s);

    // Cores and signing threads flush about once a second.
    let start = Instant::now();
    let m = loop {
        let m = scrape(&metrics_addr)?;
        let signed = value(
            &m,
            "tlsgate_key_sign_duration_seconds_count",
            &[
                ("backend", "pkcs11"),
                ("mechanism", "ecdsa_nistp256_sha256"),
            ],
        );
        let peer = value(&m, "tlsgate_errors_total", &[("source", "peer")]);
        let ok = value(
            &m,
            "tlsgate_handshakes_total",
            &[("listener", "web"), ("result", "ok")],
        );
        if signed.is_some_and(|v| v >= 5.0)
            && peer.is_some_and(|v| v >= 1.0)
            && ok.is_some_and(|v| v >= 5.0)
        {
            break m;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(15),
            "metrics did not move: signed {signed:?} peer errors {peer:?} handshakes {ok:?}\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(value(
        &m,
        "tlsgate_key_sign_duration_seconds_sum",
        &[("backend", "pkcs11")]
    )
    .is_some_and(|v| v > 0.0));

    // promtool's own checks of the exposition format and naming conventions.
    let mut promtool = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(p) => p,
        Err(e) => anyhow::bail!(
            "promtool is needed (Debian package `prometheus`, installed by scripts/test.sh): {e}"
        ),
    };
    promtool
        .stdin
        .take()
        .context("stdin")?
        .write_all(m.as_bytes())?;
    let out = promtool.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every metric the shipped dashboard and alerts query exists in this scrape, so neither can
    // rot when a metric is renamed. (Series with label values known up front exist at zero from
    // the first flush: errors by source, accept errors, refused resumptions per listener.)
    let exposed: std::collections::BTreeSet<&str> = m
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut missing = Vec::new();
    for file in [DASHBOARD, ALERTS] {
        let text = std::fs::read_to_string(contrib(file))?;
        for name in metric_names(&text) {
            if !exposed.contains(name.as_str()) {
                missing.push(format!("{name} (in {file})"));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "queried but not exposed: {missing:?}\n{m}"
    );
    Ok(())
}

const DASHBOARD: &str = "contrib/grafana/tlsgate.json";
const ALERTS: &str = "contrib/prometheus/alerts.yml";
const ALERT_TESTS: &str = "contrib/prometheus/alerts_test.yml";

/// A file of the repository (read only).
fn contrib(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(file)
}

/// Every `tlsgate_…` metric name in a text, once each.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tlsgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The shipped alerting rules are valid, each alert's unit tests pass (`promtool test rules`),
/// every alert has a test, and the dashboard is JSON whose every panel queries something.
#[test]
fn shipped_alerts_pass_their_unit_tests_and_the_dashboard_parses() -> Result<()> {
    if !common::require("promtool", "prometheus") {
        return Ok(());
    }
    for args in [
        vec!["check", "rules", ALERTS],
        vec!["test", "rules", ALERT_TESTS],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(contrib(""))
            .output()?;
        ensure!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let alerts = std::fs::read_to_string(contrib(ALERTS))?;
    let tests = std::fs::read_to_string(contrib(ALERT_TESTS))?;
    let names: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    ensure!(names.len() >= 8, "alerts found: {names:?}");
    for name in &names {
        ensure!(
            tests.contains(&format!("alertname: {name}\n")),
            "alert {name} has no unit test in {ALERT_TESTS}"
        );
    }

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(contrib(DASHBOARD))?)?;
    let panels = dashboard["panels"].as_array().context("panels")?;
    let mut queried = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().context("targets")?;
        ensure!(
            !targets.is_empty() && targets.iter().all(|t| t["expr"].is_string()),
            "panel {} has no query",
            panel["title"]
        );
        queried += 1;
    }
    ensure!(queried >= 10, "{queried} panels");
    Ok(())
}
