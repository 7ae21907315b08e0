//! Fleet mode on a real 3-member etcd cluster (Debian `etcd-server`) on loopback: two appliances
//! with their own state directories on one SoftHSM2 token. A certificate uploaded and bound
//! through appliance A is served by B; a malformed certificate written straight into etcd is
//! refused by both, which keep serving the previous one and report it in `ctl fleet status`;
//! with etcd gone, a restarted appliance serves its cached state.

mod api_support;
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use api_support::{file_fingerprint, served_fingerprint};
use common::acme_support::{free_port, wait_for, write_config, Gate};
use common::{check, demo_backend, ChildGuard, Lab};

const PREFIX: &str = "/tlsgate-test";

/// A 3-member etcd cluster; each member is killed (by its pid) when dropped.
struct Etcd {
    _members: Vec<ChildGuard>,
    endpoints: Vec<String>,
}

impl Etcd {
    fn start(dir: &Path) -> Result<Etcd> {
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
        let cluster: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let mut members = Vec::new();
        for i in 0..3 {
            let log = std::fs::File::create(dir.join(format!("etcd-m{i}.log")))?;
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("etcd-m{i}")))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{}", clients[i]),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{}", clients[i]),
                ])
                .args([
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{}", peers[i]),
                ])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{}", peers[i]),
                ])
                .args(["--initial-cluster", &cluster.join(",")])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "tlsgate-test",
                ])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("etcd")?;
            members.push(ChildGuard {
                child,
                name: "etcd",
            });
        }
        let etcd = Etcd {
            _members: members,
            endpoints: clients
                .iter()
                .map(|p| format!("http://127.0.0.1:{p}"))
                .collect(),
        };
        wait_for(Duration::from_secs(60), "a healthy etcd cluster", || {
            let out = etcd.ctl(&["endpoint", "health"])?;
            Ok(out.status.success().then_some(()))
        })?;
        Ok(etcd)
    }

    fn ctl(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints.join(",")])
            .args(args)
            .output()?)
    }

    fn fleet_section(&self, name: &str) -> String {
        let endpoints: Vec<String> = self.endpoints.iter().map(|e| format!("{e:?}")).collect();
        format!(
            "[fleet]\nendpoints = [{}]\nprefix = \"{PREFIX}\"\nname = \"{name}\"\nlease_ttl_s = 4\n",
            endpoints.join(", ")
        )
    }
}

fn ctl_json(lab: &Lab, gate: &Gate, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["ctl", "--socket", &gate.socket, "--json"];
    all.extend_from_slice(args);
    let out = lab.run(&all)?;
    serde_json::from_str(&out).with_context(|| format!("ctl printed {out}"))
}

/// Waits until `port` serves the certificate whose fingerprint is `want`.
fn wait_served(port: u16, want: &str, what: &str) -> Result<Duration> {
    let start = Instant::now();
    wait_for(Duration::from_secs(30), what, || {
        Ok((served_fingerprint(port)? == want).then_some(()))
    })?;
    Ok(start.elapsed())
}

/// Waits until `ctl fleet status` on `gate` satisfies `f` for both members `a` and `b`.
fn wait_members(
    lab: &Lab,
    gate: &Gate,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let mut last = serde_json::Value::Null;
    wait_for(Duration::from_secs(30), what, || {
        // Not connected yet answers `fleet_unavailable`: asked again.
        let Ok(status) = ctl_json(lab, gate, &["fleet", "status"]) else {
            return Ok(None);
        };
        let members = status["members"].as_array().cloned().unwrap_or_default();
        let ok = ["a", "b"]
            .iter()
            .all(|n| members.iter().any(|m| m["name"] == *n && f(m)));
        last = status.clone();
        Ok(ok.then_some(status))
    })
    .with_context(|| format!("last fleet status: {last}"))
}

#[test]
fn a_fleet_converges_refuses_a_bad_state_and_serves_from_cache() -> Result<()> {
    if !(common::require("etcd", "etcd-server")
        && common::require("etcdctl", "etcd-client")
        && common::require("openssl", "openssl"))
    {
        return Ok(());
    }
    let lab = Lab::new()?;
    let etcd = Etcd::start(lab.dir.path())?;
    let web = lab.token_key_with_chain("ec-p256", "web")?;
    let want = file_fingerprint(&web)?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config_a = write_config(&lab, "a", &backend, &etcd.fleet_section("a"))?;
    let config_b = write_config(&lab, "b", &backend, &etcd.fleet_section("b"))?;
    let a = Gate::start(&lab, &config_a)?;
    let b = Gate::start(&lab, &config_b)?;
    let boot = file_fingerprint(&lab.path("certs/boot.pem"))?;
    ensure!(
        served_fingerprint(b.port("web")?)? == boot,
        "B starts on its file's certificate"
    );
    wait_members(&lab, &a, "both members reporting", |m| m["error"].is_null())?;

    // 1. Upload and bind through A's API: B serves it.
    let sock = a.socket.clone();
    lab.run(&[
        "ctl",
        "--socket",
        &sock,
        "certs",
        "upload",
        "--id",
        "web",
        "--key",
        "web",
        "--chain",
        &web.display().to_string(),
    ])?;
    lab.run(&[
        "ctl",
        "--socket",
        &sock,
        "listeners",
        "bind",
        "--listener",
        "web",
        "--cert",
        "web",
        "--default",
        "web",
    ])?;
    let on_a = wait_served(a.port("web")?, &want, "A serving the uploaded certificate")?;
    let on_b = wait_served(
        b.port("web")?,
        &want,
        "B serving the certificate uploaded on A",
    )?;
    println!("served on A after {on_a:?}, on B after {on_b:?}");
    let keys = etcd.ctl(&[
        "get",
        "--prefix",
        "--keys-only",
        &format!("{PREFIX}/state/"),
    ])?;
    let keys = check(keys, "etcdctl get")?;
    ensure!(
        keys.contains(&format!("{PREFIX}/state/certs/web"))
            && keys.contains(&format!("{PREFIX}/state/bindings/web")),
        "the state is in etcd: {keys}"
    );
    let stored = check(
        etcd.ctl(&[
            "get",
            "--print-value-only",
            &format!("{PREFIX}/state/certs/web"),
        ])?,
        "get",
    )?;
    ensure!(
        !stored.contains("PRIVATE KEY"),
        "never key bytes in etcd: {stored}"
    );
    let status = wait_members(&lab, &b, "both members at lag 0", |m| {
        m["lag"] == 0 && m["error"].is_null()
    })?;
    println!("fleet status: {status}");

    // 2. A writer that has not read the newest state (no revisions read at all) loses: one
    //    transaction compares every key it writes, so nothing changes.
    let before = check(
        etcd.ctl(&["get", &format!("{PREFIX}/state/bindings/web")])?,
        "get",
    )?;
    let section: toml::Table = toml::from_str(&etcd.fleet_section("stale"))?;
    let stale_config: tlsgate_mgmt::config::fleet::FleetConfig =
        section["fleet"].clone().try_into()?;
    let stale = tlsgate_mgmt::fleet::Fleet::new(&stale_config)?;
    stale
        .connect_only()
        .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
    let unbound = tlsgate_mgmt::state::StateData::default();
    let mut bound = unbound.clone();
    bound.bindings.insert(
        "web".into(),
        std::sync::Arc::new(tlsgate_mgmt::state::Binding {
            listener: "web".into(),
            certificates: vec![],
        }),
    );
    use tlsgate_mgmt::api::FleetStore;
    let err = stale
        .write(&unbound, &bound)
        .expect_err("a stale writer must conflict");
    ensure!(
        err.code == "fleet_conflict",
        "{}: {}",
        err.code,
        err.message
    );
    let after = check(
        etcd.ctl(&["get", &format!("{PREFIX}/state/bindings/web")])?,
        "get",
    )?;
    ensure!(
        before == after,
        "the conflicting write changed nothing: {before} / {after}"
    );
    drop(stale);

    // 3. A malformed certificate written straight into etcd: refused by both, reported, and
    //    both keep serving the previous one.
    let bad = serde_json::json!({
        "id": "web",
        "key": "web",
        "chain_pem": "-----BEGIN CERTIFICATE-----\nTUFMRk9STUVE\n-----END CERTIFICATE-----\n",
        "updated_unix": 1,
    });
    check(
        etcd.ctl(&[
            "put",
            &format!("{PREFIX}/state/certs/web"),
            &bad.to_string(),
        ])?,
        "etcdctl put",
    )?;
    let status = wait_members(&lab, &a, "both members reporting the refused state", |m| {
        m["error"].as_str().is_some_and(|e| e.contains("web")) && m["lag"].as_i64() > Some(0)
    })?;
    println!("fleet status after the malformed certificate: {status}");
    ensure!(
        served_fingerprint(a.port("web")?)? == want,
        "A keeps serving the good certificate"
    );
    ensure!(
        served_fingerprint(b.port("web")?)? == want,
        "B keeps serving the good certificate"
    );

    // 4. etcd gone entirely; B restarted serves its cached state.
    let b_config = config_b.clone();
    b.kill()?;
    drop(etcd);
    let b = Gate::start(&lab, &b_config)?;
    ensure!(
        served_fingerprint(b.port("web")?)? == want,
        "B restarted without etcd serves the cached certificate"
    );
    let out = lab
        .cmd(&["ctl", "--socket", &b.socket, "fleet", "status"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("fleet_unavailable"),
        "{stderr}"
    );
    drop(a);
    Ok(())
}
