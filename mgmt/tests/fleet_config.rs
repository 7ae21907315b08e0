//! The fleet's share of the configuration (backend pools, routes, session policy) in etcd, on a
//! real 3-member etcd cluster and two appliances: set through one, both route to the fleet's
//! pool and announce its ticket lifetime; a document that does not make a valid configuration
//! is refused through the API and, written straight into etcd, refused by both (they keep
//! serving and report it); cleared through the other, both are back to their files; with etcd
//! gone, a restarted appliance routes as the fleet said from its cache.

mod api_support;
mod common;
mod fleet_support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::acme_support::{wait_for, Gate};
use common::{check, demo_backend, Lab};
use fleet_support::*;

const POOL_ANSWER: &str = "from the fleet's pool";

/// A backend that answers every request with [`POOL_ANSWER`]; returns its port.
fn pool_server() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let body = format!("{POOL_ANSWER}\n");
                let _ = c.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
    Ok(port)
}

/// What `gate` answers a request with (the backend it routes to).
fn answer(gate: &Gate) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5"])
        .arg(format!("https://127.0.0.1:{}/", gate.port("web")?))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The TLS 1.3 ticket lifetime `gate` announces (seconds), from `openssl s_client`.
fn ticket_lifetime(gate: &Gate) -> Result<Option<u64>> {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", gate.port("web")?),
        ])
        .args(["-servername", "localhost", "-tls1_3", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let text = String::from_utf8_lossy(&child.wait_with_output()?.stdout).into_owned();
    Ok(text
        .lines()
        .find_map(|l| l.trim().strip_prefix("TLS session ticket lifetime hint: "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok()))
}

#[test]
fn pools_routes_and_ticket_policy_set_through_one_appliance_apply_on_both() -> Result<()> {
    if !(common::require("etcd", "etcd-server")
        && common::require("etcdctl", "etcd-client")
        && common::require("curl", "curl")
        && common::require("openssl", "openssl"))
    {
        return Ok(());
    }
    let lab = Lab::new()?;
    let mut etcd = Etcd::start(lab.dir.path())?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let pool_port = pool_server()?;
    let (a, b, config_b) = start_pair(&lab, &etcd, &backend, "")?;
    wait_members(&lab, &a, "both members reporting", |m| m["error"].is_null())?;
    let demo = "hello from the tlsgate demo backend";
    for gate in [&a, &b] {
        ensure!(answer(gate)?.contains(demo), "the file's backend first");
        ensure!(
            ticket_lifetime(gate)? != Some(1234),
            "the file's ticket lifetime first"
        );
    }

    let fleet_toml = lab.path("fleet.toml");
    std::fs::write(
        &fleet_toml,
        format!(
            "[[backend]]\nname = \"fleetpool\"\nservers = [{{ address = \"127.0.0.1:{pool_port}\" }}]\n\n\
             [[listener]]\nname = \"web\"\ndefault_backend = \"fleetpool\"\n\n\
             [listener.session]\nlifetime_secs = 1234\n"
        ),
    )?;
    let fleet_file = fleet_toml.display().to_string();
    // Refused through the API: a key local to each appliance, a pool that does not exist.
    let bad = lab.path("bad.toml");
    let bad_file = bad.display().to_string();
    for (text, why) in [
        (
            "[[listener]]\nname = \"web\"\nbind = \"0.0.0.0:1\"\n",
            "local to each appliance",
        ),
        (
            "[[listener]]\nname = \"web\"\ndefault_backend = \"nowhere\"\n",
            "nowhere",
        ),
    ] {
        std::fs::write(&bad, text)?;
        let why_said = common::ctl_refused_at(
            &lab,
            &a.socket,
            &["fleet", "config", "set", "--file", &bad_file],
            "fleet_config_invalid",
        )?;
        ensure!(
            why_said.contains(why),
            "the refusal says why ({why}): {why_said}"
        );
    }

    ctl_at(
        &lab,
        &a.socket,
        &["fleet", "config", "set", "--file", &fleet_file],
    )?;
    let t = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "B routing to the fleet's pool",
        || Ok(answer(&b)?.contains(POOL_ANSWER).then_some(())),
    )?;
    println!(
        "the fleet configuration set on A routed B to the fleet's pool after {:?}",
        t.elapsed()
    );
    for gate in [&a, &b] {
        ensure!(
            answer(gate)?.contains(POOL_ANSWER),
            "both route to the fleet's pool"
        );
        ensure!(
            ticket_lifetime(gate)? == Some(1234),
            "both announce the fleet's ticket lifetime"
        );
    }
    let shown = ctl_at(&lab, &b.socket, &["fleet", "config", "show"])?;
    ensure!(
        shown.contains("fleetpool"),
        "B shows the fleet's configuration: {shown}"
    );

    // Written straight into etcd, a document naming a listener the appliances lack: both
    // refuse it, keep routing as before and report it; a write through the API repairs it.
    check(
        etcd.ctl(&[
            "put",
            &format!("{PREFIX}/state/config"),
            "[[listener]]\nname = \"nope\"\ndefault_backend = \"fleetpool\"\n",
        ])?,
        "etcdctl put",
    )?;
    wait_members(&lab, &a, "both refusing the fleet configuration", |m| {
        m["error"]
            .as_str()
            .is_some_and(|e| e.contains("fleet_config_invalid") && e.contains("nope"))
    })?;
    for gate in [&a, &b] {
        ensure!(
            answer(gate)?.contains(POOL_ANSWER),
            "the last good configuration serves"
        );
    }
    ctl_at(
        &lab,
        &b.socket,
        &["fleet", "config", "set", "--file", &fleet_file],
    )?;
    wait_members(&lab, &a, "both applying the repaired configuration", |m| {
        m["error"].is_null() && m["lag"] == 0
    })?;

    // Cleared through B: both are back to their files.
    ctl_at(&lab, &b.socket, &["fleet", "config", "clear"])?;
    wait_for(
        Duration::from_secs(20),
        "A back to its file's backend",
        || Ok(answer(&a)?.contains(demo).then_some(())),
    )?;
    ensure!(answer(&b)?.contains(demo), "B back to its file's backend");

    // Set again; then etcd goes away and B restarts: it routes as the fleet said (its cache).
    ctl_at(
        &lab,
        &a.socket,
        &["fleet", "config", "set", "--file", &fleet_file],
    )?;
    wait_for(
        Duration::from_secs(20),
        "B routing to the fleet's pool again",
        || Ok(answer(&b)?.contains(POOL_ANSWER).then_some(())),
    )?;
    for i in 0..3 {
        etcd.kill_member(i);
    }
    b.kill()?;
    let b = Gate::start(&lab, &config_b)?;
    ensure!(
        answer(&b)?.contains(POOL_ANSWER) && ticket_lifetime(&b)? == Some(1234),
        "B restarted without etcd routes and issues tickets as the fleet said"
    );
    drop(a);
    Ok(())
}
