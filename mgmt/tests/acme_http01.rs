//! ACME through `http-01` against pebble: the `[acme_http01]` listener answers the validation
//! (and redirects other requests to https). Pebble rejects half of the valid nonces and, until
//! the test points its DNS at tlsgate, validates against an address where nothing listens:
//! attempts fail with the CA's problem document in status, are retried with back-off and
//! counted, and the order completes once validation can succeed.

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::acme_support::{
    acme_entry, free_port, have_pebble, s_client_chain, wait_for, write_config, Gate, Pebble,
    PebbleOpts,
};
use common::{demo_backend, metric, Lab};

#[test]
fn http_01_issues_through_bad_nonces_and_failed_validations() -> Result<()> {
    if !have_pebble() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let pebble_port = free_port()?;
    let directory = format!("https://127.0.0.1:{pebble_port}/dir");
    let more = format!(
        "[acme_http01]\nlisten = \"127.0.0.1:0\"\nredirect_https = true\n\n{}",
        acme_entry(
            &lab,
            "api",
            &directory,
            &["api.acme.test"],
            "challenge = \"http-01\""
        )
    );
    let config = write_config(&lab, "h", &backend, &more)?;
    let gate = Gate::start(&lab, &config)?;
    let http = gate.port("acme-http01")?;
    let pebble = Pebble::start(
        &lab,
        PebbleOpts {
            port: pebble_port,
            tls_port: 1,
            http_port: http,
            // Nothing listens on 127.0.0.2: validations fail until the DNS changes.
            ipv4: "127.0.0.2",
            env: vec![("PEBBLE_WFE_NONCEREJECT", "50".into())],
            ..PebbleOpts::default()
        },
    )?;

    // Validation fails: status carries the CA's problem, the existing certificate still serves.
    let failing = wait_for(
        Duration::from_secs(60),
        "a failed validation in status",
        || {
            let s = gate.status(&lab, "api")?;
            let e = &s["last_error"];
            let failed = e["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("urn:ietf:params:acme:error:"))
                && e.to_string().contains("127.0.0.2");
            Ok(failed.then_some(s))
        },
    )
    .with_context(|| gate.log_text())?;
    ensure!(
        failing["state"] == "retrying" && failing["serial"].is_null(),
        "{failing}"
    );
    let served = s_client_chain(gate.port("web")?, "localhost")?;
    ensure!(served.contains("CN = localhost"), "{served}");

    // The DNS now points at tlsgate: the next attempt validates and issues.
    pebble.set_ipv4("127.0.0.1")?;
    let issued = gate.wait_issued(&lab, "api", None, Duration::from_secs(90))?;
    ensure!(
        issued["state"] == "valid" && issued["last_error"].is_null(),
        "{issued}"
    );
    let chain = s_client_chain(gate.port("web")?, "api.acme.test")?;
    ensure!(
        chain.contains("CN = api.acme.test") && chain.contains("i:CN = Pebble Intermediate CA"),
        "{chain}"
    );
    let key = issued["key"].as_str().context("key")?;
    let keys = lab.list()?;
    let k = keys
        .iter()
        .find(|k| k["label"] == key)
        .context("key on the token")?;
    ensure!(k["sensitive"] == true && k["extractable"] == false, "{k}");

    // Failures were counted and retried; one issuance.
    let scrape = Command::new("curl")
        .args(["-sS", &format!("http://{}/metrics", gate.ready["metrics"])])
        .output()?;
    let m = String::from_utf8_lossy(&scrape.stdout);
    let failed = metric(
        &m,
        "tlsgate_acme_orders_total",
        &["acme=\"api\"", "outcome=\"failed\""],
    );
    let ok = metric(
        &m,
        "tlsgate_acme_orders_total",
        &["acme=\"api\"", "outcome=\"issued\""],
    );
    ensure!(
        failed >= 1.0 && ok == 1.0,
        "failed={failed} issued={ok}\n{m}"
    );
    ensure!(
        metric(
            &m,
            "tlsgate_acme_next_renewal_timestamp_seconds",
            &["acme=\"api\""]
        ) > 1.7e9,
        "{m}"
    );
    let log = gate.log_text();
    ensure!(
        log.contains("ACME attempt failed; the served certificate stays"),
        "{log}"
    );

    // Other requests on the http-01 port: a redirect to https.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
        ])
        .args(["-H", "Host: api.acme.test"])
        .arg(format!("http://127.0.0.1:{http}/some/path?q=1"))
        .output()?;
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(
        answer == "301 https://api.acme.test/some/path?q=1",
        "{answer}"
    );
    Ok(())
}
