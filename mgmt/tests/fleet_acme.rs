//! ACME for a fleet, on a real 3-member etcd cluster (Debian `etcd-server`) and a real ACME CA
//! (Debian `pebble`): one appliance orders; the challenge it publishes is answered by the
//! others too; killed mid-order, another appliance takes the order over and completes it (one
//! order at the CA), and the issued certificate reaches every appliance.

mod api_support;
mod common;
mod fleet_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use api_support::served_fingerprint_for;
use common::acme_support::{
    acme_entry, free_port, have_pebble, wait_for, write_config, Gate, Pebble, PebbleOpts, Stall,
};
use common::{demo_backend, Lab};
use fleet_support::*;

const NAME: &str = "www.acme.test";

/// Whether `port` answers a `tls-alpn-01` validation for [`NAME`]: the certificate it gives a
/// client offering only `acme-tls/1` carries the critical `acmeIdentifier` extension.
fn answers_challenge(port: u16) -> Result<bool> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", NAME, "-alpn", "acme-tls/1"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-text"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    {
        use std::io::Write as _;
        let mut stdin = x509.stdin.take().context("stdin")?;
        stdin.write_all(&out.stdout)?;
    }
    let text = String::from_utf8_lossy(&x509.wait_with_output()?.stdout).into_owned();
    Ok(text.contains("1.3.6.1.5.5.7.1.31: critical"))
}

/// `etcdctl ARGS` on the cluster, which must succeed; its stdout.
fn etcdctl(etcd: &Etcd, args: &[&str]) -> Result<String> {
    let out = etcd.ctl(args)?;
    ensure!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A and B share one token (a network HSM) and one `[[acme]]` entry. A orders: it places the
/// order and publishes the challenge in etcd, and B answers it. A member that never loads
/// challenges (a record written straight into etcd) holds A back from asking the CA to
/// validate; A is killed (SIGKILL) in that window. B takes the role over when A's lease ends,
/// resumes the same order from the progress A recorded, completes it, and serves the
/// certificate; A started again serves the same certificate from the fleet, as a standby.
#[test]
fn the_orderer_killed_mid_order_is_taken_over_and_every_appliance_serves_the_certificate(
) -> Result<()> {
    if !(have_pebble()
        && common::require("etcd", "etcd-server")
        && common::require("etcdctl", "etcd-client"))
    {
        return Ok(());
    }
    let lab = Lab::new()?;
    let etcd = Etcd::start(lab.dir.path())?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    // pebble validates through the relay: held until the test says where to.
    let stall = Stall::start()?;
    let pebble_port = free_port()?;
    let directory = format!("https://127.0.0.1:{pebble_port}/dir");
    let pebble = Pebble::start(
        &lab,
        PebbleOpts {
            port: pebble_port,
            tls_port: stall.port,
            http_port: 1,
            ipv4: "127.0.0.1",
            env: vec![("PEBBLE_WFE_NONCEREJECT", "0".into())],
            ..PebbleOpts::default()
        },
    )?;
    let entry = acme_entry(&lab, "www", &directory, &[NAME], "");
    // A member that never acknowledges a challenge: the orderer waits for it (up to 10 s).
    let laggard = format!("{PREFIX}/members/c");
    etcdctl(&etcd, &["put", &laggard, r#"{"name":"c"}"#])?;

    let config_a = write_config(
        &lab,
        "a",
        &backend,
        &format!("{entry}{}", etcd.fleet_section("a")),
    )?;
    let config_b = write_config(
        &lab,
        "b",
        &backend,
        &format!("{entry}{}", etcd.fleet_section("b")),
    )?;
    let a = Gate::start(&lab, &config_a)?;
    let b = Gate::start(&lab, &config_b)?;
    let challenges = format!("{PREFIX}/acme/challenges/");
    wait_for(Duration::from_secs(20), "A's challenge in etcd", || {
        let keys = etcdctl(&etcd, &["get", "--prefix", "--keys-only", &challenges])?;
        Ok(keys.contains("tls-alpn-01/www.acme.test").then_some(()))
    })
    .with_context(|| a.log_text())?;
    let status_a = a.status(&lab, "www")?;
    let status_b = b.status(&lab, "www")?;
    ensure!(
        status_a["orderer"] == "a" && status_b["state"] == "standby" && status_b["orderer"] == "a",
        "A orders, B stands by: {status_a} / {status_b}"
    );
    let order = status_a["order_url"]
        .as_str()
        .context("A has an order in flight")?
        .to_owned();
    // B answers the challenge A published (so may the CA's validation reach it).
    let port_b = b.port("web")?;
    wait_for(Duration::from_secs(5), "B answering A's challenge", || {
        Ok(answers_challenge(port_b)?.then_some(()))
    })
    .with_context(|| b.log_text())?;
    ensure!(pebble.orders()? == 1, "one order at pebble");
    ensure!(
        stall.accepted() == 0,
        "A has not asked pebble to validate yet"
    );

    // Kill the orderer mid-order; the laggard goes too, so B's validation is not held.
    a.kill()?;
    etcdctl(&etcd, &["del", &laggard])?;
    stall.forward(port_b);
    let took_over = std::time::Instant::now();
    let issued = b
        .wait_issued(&lab, "www", None, Duration::from_secs(60))
        .with_context(|| {
            format!(
                "pebble log: {}",
                std::fs::read_to_string(&pebble.log).unwrap_or_default()
            )
        })?;
    eprintln!(
        "B completed the order {:.1} s after A was killed: {issued}",
        took_over.elapsed().as_secs_f64()
    );
    ensure!(issued["orderer"] == "b", "B orders now: {issued}");
    ensure!(
        pebble.orders()? == 1,
        "B resumed A's order (one order at pebble), got {}",
        pebble.orders()?
    );
    let log_b = b.log_text();
    ensure!(
        log_b.contains("resuming the ACME order in flight") && log_b.contains(&order),
        "B's log names A's order {order}"
    );
    ensure!(stall.accepted() >= 1, "pebble validated through the relay");
    let fp_b = served_fingerprint_for(port_b, NAME)?;

    // The certificate is the fleet's: A started again serves it, and stands by.
    let a = Gate::start(&lab, &config_a)?;
    let port_a = a.port("web")?;
    wait_for(
        Duration::from_secs(30),
        "A serving the fleet's ACME certificate",
        || Ok((served_fingerprint_for(port_a, NAME)? == fp_b).then_some(())),
    )?;
    // Its status follows within a standby refresh (2 s).
    let mut last = serde_json::Value::Null;
    wait_for(
        Duration::from_secs(15),
        "A standing by with the fleet's certificate",
        || {
            last = a.status(&lab, "www")?;
            Ok((last["state"] == "standby"
                && last["orderer"] == "b"
                && last["serial"] == issued["serial"])
                .then_some(()))
        },
    )
    .with_context(|| format!("A's status: {last}"))?;
    // No challenge is left published.
    let left = etcdctl(&etcd, &["get", "--prefix", "--keys-only", &challenges])?;
    ensure!(left.trim().is_empty(), "challenges left in etcd: {left}");
    Ok(())
}
