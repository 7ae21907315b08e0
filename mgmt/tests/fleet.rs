//! Fleet mode on a real 3-member etcd cluster (Debian `etcd-server`) on loopback: two appliances
//! with their own state directories on one SoftHSM2 token. A certificate uploaded and bound
//! through appliance A is served by B; a malformed certificate written straight into etcd is
//! refused by both, which keep serving the previous one and report it in `ctl fleet status`;
//! with etcd gone, a restarted appliance serves its cached state. Losing one etcd member changes
//! nothing; losing quorum refuses writes with a clear error while both keep serving, and the
//! fleet converges once quorum is back. Audit lines name the appliance and the operator. A CRL
//! uploaded through one appliance revokes a client certificate on both. An appliance whose HSM
//! lacks a certificate's key binds the others and reports it. An appliance moved into fleet
//! mode on an empty fleet seeds it with its state directory. Two appliances writing one binding
//! at the same instant: one wins, the other gets a conflict.

mod api_support;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use api_support::{file_fingerprint, served_fingerprint};
use common::acme_support::{free_port, wait_for, write_config, Gate};
use common::{check, demo_backend, ChildGuard, Lab};

const PREFIX: &str = "/tlsgate-test";

/// A 3-member etcd cluster; each member is killed (by its pid) when dropped, or on its own with
/// [`Etcd::kill_member`], and started again on its data directory with [`Etcd::restart_member`].
struct Etcd {
    dir: PathBuf,
    peers: Vec<u16>,
    clients: Vec<u16>,
    members: Vec<Option<ChildGuard>>,
    endpoints: Vec<String>,
}

impl Etcd {
    fn start(dir: &Path) -> Result<Etcd> {
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
        let mut etcd = Etcd {
            dir: dir.to_owned(),
            endpoints: clients
                .iter()
                .map(|p| format!("http://127.0.0.1:{p}"))
                .collect(),
            peers,
            clients,
            members: vec![None, None, None],
        };
        for i in 0..3 {
            etcd.restart_member(i)?;
        }
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    /// Starts member `i` (again): a restarted member keeps its data directory and rejoins.
    fn restart_member(&mut self, i: usize) -> Result<()> {
        let cluster: Vec<String> = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("etcd-m{i}.log")))?;
        let (peer, client) = (self.peers[i], self.clients[i]);
        let child = Command::new("etcd")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.join(format!("etcd-m{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
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
        self.members[i] = Some(ChildGuard {
            child,
            name: "etcd",
        });
        Ok(())
    }

    /// Kills member `i` (SIGKILL, by its pid).
    fn kill_member(&mut self, i: usize) {
        self.members[i] = None;
    }

    /// Waits until member `i` reports no leader (it has lost the quorum).
    fn wait_leaderless(&self, i: usize) -> Result<()> {
        let endpoint = self.endpoints[i].clone();
        wait_for(
            Duration::from_secs(30),
            "the member to lose its leader",
            || {
                let out = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args(["--endpoints", &endpoint, "endpoint", "status", "-w", "json"])
                    .output()?;
                let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
                    Ok(v) => v,
                    Err(_) => return Ok(None),
                };
                let status = &v[0]["Status"];
                // `leader` is left out of the JSON when it is 0.
                Ok(
                    (status.is_object() && status["leader"].as_u64().unwrap_or(0) == 0)
                        .then_some(()),
                )
            },
        )
    }

    fn wait_healthy(&self) -> Result<()> {
        wait_for(Duration::from_secs(60), "a healthy etcd cluster", || {
            let out = self.ctl(&["endpoint", "health"])?;
            Ok(out.status.success().then_some(()))
        })
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

/// Appliances `a` and `b` in one fleet on `etcd`, `more` added to each one's configuration;
/// returns them and B's configuration file (to start it again).
fn start_pair(lab: &Lab, etcd: &Etcd, backend: &str, more: &str) -> Result<(Gate, Gate, PathBuf)> {
    let config_a = write_config(
        lab,
        "a",
        backend,
        &format!("{more}{}", etcd.fleet_section("a")),
    )?;
    let config_b = write_config(
        lab,
        "b",
        backend,
        &format!("{more}{}", etcd.fleet_section("b")),
    )?;
    Ok((
        Gate::start(lab, &config_a)?,
        Gate::start(lab, &config_b)?,
        config_b,
    ))
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
    let (a, b, config_b) = start_pair(&lab, &etcd, &backend, "")?;
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
        std::sync::Arc::new(tlsgate_mgmt::state::Binding::new("web".into(), vec![])),
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
    let b_config = config_b;
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

/// `ctl certs upload --id web --key web --chain <chain>` on `gate`.
fn upload(lab: &Lab, gate: &Gate, chain: &Path) -> Command {
    lab.cmd(&[
        "ctl",
        "--socket",
        &gate.socket,
        "certs",
        "upload",
        "--id",
        "web",
        "--key",
        "web",
        "--chain",
        &chain.display().to_string(),
    ])
}

/// A new chain for the token key `web` (a new serial, so a new fingerprint), kept as `name`.
fn new_chain(lab: &Lab, name: &str) -> Result<(PathBuf, String)> {
    let chain = lab.path(name);
    std::fs::copy(lab.localhost_chain("web")?, &chain)?;
    let fingerprint = file_fingerprint(&chain)?;
    Ok((chain, fingerprint))
}

#[test]
fn losing_quorum_keeps_serving_refuses_writes_and_converges_after() -> Result<()> {
    if !(common::require("etcd", "etcd-server")
        && common::require("etcdctl", "etcd-client")
        && common::require("openssl", "openssl"))
    {
        return Ok(());
    }
    let lab = Lab::new()?;
    let mut etcd = Etcd::start(lab.dir.path())?;
    lab.token_key_with_chain("ec-p256", "web")?;
    let (chain1, fp1) = new_chain(&lab, "web-1.pem")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let (a, b, _) = start_pair(&lab, &etcd, &backend, "")?;
    wait_members(&lab, &a, "both members reporting", |m| m["error"].is_null())?;
    check(upload(&lab, &a, &chain1).output()?, "upload 1")?;
    lab.run(&[
        "ctl",
        "--socket",
        &a.socket,
        "listeners",
        "bind",
        "--listener",
        "web",
        "--cert",
        "web",
        "--default",
        "web",
    ])?;
    wait_served(b.port("web")?, &fp1, "B serving the first certificate")?;

    // 1. One member of three down: a majority remains; nothing changes for writers or clients.
    etcd.kill_member(2);
    let (chain2, fp2) = new_chain(&lab, "web-2.pem")?;
    // A write racing the election of a new leader may time out (etcd drops proposals in
    // flight to the old leader); an operator retries, and so does this test, within 20 s.
    let t = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "a write accepted with one member down",
        || {
            Ok(upload(&lab, &a, &chain2)
                .output()?
                .status
                .success()
                .then_some(()))
        },
    )?;
    println!(
        "one etcd member down: write accepted after {:?}",
        t.elapsed()
    );
    let took = wait_served(
        b.port("web")?,
        &fp2,
        "B serving the rotation made with one member down",
    )?;
    println!("one etcd member down: the rotation reached B after {took:?}");

    // 2. Two down: no quorum. Once the last member knows it has no leader, a write is refused
    //    with a clear error, changes nothing (now or later), and both appliances keep serving.
    etcd.kill_member(1);
    etcd.wait_leaderless(0)?;
    let (chain3, fp3) = new_chain(&lab, "web-3.pem")?;
    let t = Instant::now();
    let out = upload(&lab, &a, &chain3).output()?;
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "without quorum the write answered after {took:?}: {}",
        stderr.trim()
    );
    ensure!(
        !out.status.success()
            && stderr.contains("fleet_unavailable")
            && stderr.contains("no leader"),
        "a write without quorum: {stderr}"
    );
    ensure!(took < Duration::from_secs(30), "refused after {took:?}");
    for (gate, name) in [(&a, "A"), (&b, "B")] {
        ensure!(
            served_fingerprint(gate.port("web")?)? == fp2,
            "{name} keeps serving its last state without quorum"
        );
    }
    let shown = ctl_json(&lab, &a, &["certs", "show", "--id", "web"])?;
    ensure!(
        shown["fingerprint_sha256"]
            .as_str()
            .is_some_and(|f| f.replace(':', "").eq_ignore_ascii_case(&fp2)),
        "the refused write changed nothing on A: {shown}"
    );

    // 3. Quorum back: the refused write did not land later, and the next write converges.
    etcd.restart_member(1)?;
    etcd.restart_member(2)?;
    etcd.wait_healthy()?;
    wait_members(
        &lab,
        &a,
        "both members reporting after quorum returned",
        |m| m["error"].is_null() && m["lag"] == 0,
    )?;
    for (gate, name) in [(&a, "A"), (&b, "B")] {
        ensure!(
            served_fingerprint(gate.port("web")?)? == fp2,
            "{name} still serves the last accepted state once quorum returned"
        );
    }
    let t = Instant::now();
    wait_for(Duration::from_secs(30), "a write accepted again", || {
        Ok(upload(&lab, &a, &chain3)
            .output()?
            .status
            .success()
            .then_some(()))
    })?;
    let on_b = wait_served(
        b.port("web")?,
        &fp3,
        "B serving the write made after quorum returned",
    )?;
    println!(
        "quorum back: write accepted after {:?}, served on B {on_b:?} later",
        t.elapsed()
    );

    // Every line of A's audit log names A and the operator; the refused write is there too.
    let audit = std::fs::read_to_string(lab.path("state-a/audit.log"))?;
    let puts: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["operation"] == "certificate.put")
        .collect();
    ensure!(
        puts.iter().all(|v| v["appliance"] == "a"
            && v["client"].as_str().is_some_and(|c| c.starts_with("uid:"))),
        "audit lines name the appliance and the operator: {puts:?}"
    );
    ensure!(
        puts.iter().any(|v| v["result"] == "fleet_unavailable")
            && puts.iter().filter(|v| v["result"] == "ok").count() >= 3,
        "the refused and the accepted writes are audited: {puts:?}"
    );
    drop(b);
    drop(a);
    Ok(())
}

#[test]
fn a_crl_uploaded_through_one_appliance_revokes_a_client_on_both() -> Result<()> {
    if !(common::require("etcd", "etcd-server")
        && common::require("etcdctl", "etcd-client")
        && common::require("curl", "curl"))
    {
        return Ok(());
    }
    let lab = Lab::new()?;
    let etcd = Etcd::start(lab.dir.path())?;
    let dir = lab.path("zone");
    std::fs::create_dir_all(&dir)?;
    let mut zone = common::policy_support::Zone::new(&dir, "clients")?;
    let (alice_cert, alice_key) = zone.client("alice")?;
    let crl = dir.join("clients.crl.pem");
    zone.write_crl(&crl, 1, &["alice"])?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let client_auth = format!(
        "[listener.client_auth]\nmode = \"required\"\nca = \"{}\"\n\n",
        zone.ca_path().display()
    );
    let (a, b, _) = start_pair(&lab, &etcd, &backend, &client_auth)?;
    wait_members(&lab, &a, "both members reporting", |m| m["error"].is_null())?;
    // alice's certificate is accepted by both.
    let alice = |gate: &Gate| -> Result<bool> {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "5", "--cert"])
            .arg(&alice_cert)
            .arg("--key")
            .arg(&alice_key)
            .arg(format!("https://127.0.0.1:{}/", gate.port("web")?))
            .output()?;
        Ok(out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("hello from the tlsgate demo backend"))
    };
    ensure!(alice(&a)? && alice(&b)?, "alice is let in before the CRL");

    // The CRL revoking alice, uploaded through A only: both refuse her.
    lab.run(&[
        "ctl",
        "--socket",
        &a.socket,
        "crls",
        "upload",
        "--listener",
        "web",
        "--file",
        &crl.display().to_string(),
    ])?;
    let t = Instant::now();
    wait_for(Duration::from_secs(20), "B refusing alice", || {
        Ok((!alice(&b)?).then_some(()))
    })?;
    println!(
        "a CRL uploaded on A revoked alice on B after {:?}",
        t.elapsed()
    );
    ensure!(!alice(&a)?, "A refuses alice too");
    let keys = check(
        etcd.ctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX}/state/"),
        ])?,
        "etcdctl get",
    )?;
    ensure!(
        keys.contains(&format!("{PREFIX}/state/crls/web")),
        "the CRL is in etcd: {keys}"
    );

    // Deleted through B: both let her in again, and the key is gone.
    let listed = ctl_json(&lab, &b, &["crls", "list", "--listener", "web"])?;
    let id = listed["items"][0]["id"]
        .as_str()
        .context("a CRL id on B")?
        .to_owned();
    lab.run(&[
        "ctl",
        "--socket",
        &b.socket,
        "crls",
        "delete",
        "--listener",
        "web",
        "--id",
        &id,
    ])?;
    wait_for(Duration::from_secs(20), "A letting alice in again", || {
        Ok(alice(&a)?.then_some(()))
    })?;
    ensure!(alice(&b)?, "B lets alice in again");
    let keys = check(
        etcd.ctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX}/state/"),
        ])?,
        "etcdctl get",
    )?;
    ensure!(
        !keys.contains("/state/crls/"),
        "no CRL key left in etcd: {keys}"
    );
    drop(b);
    drop(a);
    Ok(())
}

/// Appliance B's HSM (its own token) lacks the key of one of the two certificates A binds (the
/// other key is cloned into both tokens, as in an HSM cluster): B binds the other one, reports
/// the missing key in `ctl fleet status`, and keeps converging (a later rotation through A
/// reaches it); A serves both.
#[test]
fn an_appliance_whose_hsm_lacks_a_key_binds_the_rest_and_reports_it() -> Result<()> {
    if !(common::require("etcd", "etcd-server")
        && common::require("etcdctl", "etcd-client")
        && common::require("openssl", "openssl"))
    {
        return Ok(());
    }
    let lab = Lab::new()?;
    // B's own token: a second HSM that does not hold A's token key `web`.
    let lab_b = Lab::new()?;
    let etcd = Etcd::start(lab.dir.path())?;
    let web = lab.token_key_with_chain("ec-p256", "web")?;
    let (soft_key, soft) = lab.software_key_with_chain("EC", "soft")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let a = Gate::start(
        &lab,
        &write_config(&lab, "a", &backend, &etcd.fleet_section("a"))?,
    )?;
    let b = Gate::start(
        &lab_b,
        &write_config(&lab_b, "b", &backend, &etcd.fleet_section("b"))?,
    )?;
    wait_members(&lab, &a, "both members reporting", |m| m["error"].is_null())?;

    let ctl_a = |args: &[&str]| -> Result<String> {
        let mut all = vec!["ctl", "--socket", &a.socket];
        all.extend_from_slice(args);
        lab.run(&all)
    };
    let upload = |id: &str, key: &str, chain: &Path| -> Result<String> {
        ctl_a(&[
            "certs",
            "upload",
            "--id",
            id,
            "--key",
            key,
            "--chain",
            &chain.display().to_string(),
        ])
    };
    // A key on both tokens (imported into each through its appliance's API).
    let clone_key = |label: &str, key: &Path| -> Result<()> {
        let key = key.display().to_string();
        for (l, gate) in [(&lab, &a), (&lab_b, &b)] {
            l.run(&[
                "ctl",
                "--socket",
                &gate.socket,
                "keys",
                "import",
                "--label",
                label,
                "--key-file",
                &key,
            ])?;
        }
        Ok(())
    };
    clone_key("shared", &soft_key)?;
    upload("web", "web", &web)?;
    upload("soft", "shared", &soft)?;
    ctl_a(&[
        "listeners",
        "bind",
        "--listener",
        "web",
        "--cert",
        "web",
        "--cert",
        "soft",
        "--default",
        "web",
    ])?;
    wait_served(
        a.port("web")?,
        &file_fingerprint(&web)?,
        "A serving its token certificate",
    )?;
    wait_served(
        b.port("web")?,
        &file_fingerprint(&soft)?,
        "B serving the certificate whose key it has",
    )
    .with_context(|| std::fs::read_to_string(&b.log).unwrap_or_default())?;
    let status = wait_members(&lab, &a, "B reporting the missing key", |m| {
        m["error"].is_null()
            && m["lag"] == 0
            && if m["name"] == "b" {
                m["missing_keys"] == serde_json::json!(["web"])
            } else {
                m["missing_keys"] == serde_json::json!([])
            }
    })?;
    println!("fleet status: {status}");
    let text = lab.run(&["ctl", "--socket", &a.socket, "fleet", "status"])?;
    ensure!(
        text.contains("key missing on its HSM (not bound there): web"),
        "{text}"
    );

    // A later change still reaches B (the missing key does not stop it converging).
    let (soft2_key, soft2) = lab.software_cert("EC", "soft2", "localhost", "DNS:localhost")?;
    clone_key("shared2", &soft2_key)?;
    upload("soft", "shared2", &soft2)?;
    wait_served(
        b.port("web")?,
        &file_fingerprint(&soft2)?,
        "B serving the rotated certificate",
    )?;
    ensure!(
        served_fingerprint(a.port("web")?)? == file_fingerprint(&web)?,
        "A still prefers its token certificate"
    );
    drop(b);
    drop(a);
    Ok(())
}

/// An appliance that served certificates from its own state directory is moved into fleet
/// mode on an empty fleet: it seeds the fleet with its state (it keeps serving it), and a new
/// appliance joining the fleet serves the same.
#[test]
fn an_appliance_moved_into_an_empty_fleet_seeds_it_with_its_state() -> Result<()> {
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
    // A alone first: its state directory holds the certificate and the binding.
    let a = Gate::start(&lab, &write_config(&lab, "a", &backend, "")?)?;
    let on_a = |args: &[&str], gate: &Gate| -> Result<String> {
        let mut all = vec!["ctl", "--socket", &gate.socket];
        all.extend_from_slice(args);
        lab.run(&all)
    };
    on_a(
        &[
            "certs",
            "upload",
            "--id",
            "web",
            "--key",
            "web",
            "--chain",
            &web.display().to_string(),
        ],
        &a,
    )?;
    on_a(
        &["listeners", "bind", "--listener", "web", "--cert", "web"],
        &a,
    )?;
    wait_served(a.port("web")?, &want, "A serving its uploaded certificate")?;
    a.kill()?;

    // A again, now in a fleet whose etcd is empty; then B, new.
    let a = Gate::start(
        &lab,
        &write_config(&lab, "a", &backend, &etcd.fleet_section("a"))?,
    )?;
    ensure!(
        served_fingerprint(a.port("web")?)? == want,
        "A in fleet mode keeps serving its state"
    );
    let b = Gate::start(
        &lab,
        &write_config(&lab, "b", &backend, &etcd.fleet_section("b"))?,
    )?;
    wait_served(b.port("web")?, &want, "B serving A's seeded certificate")?;
    let keys = check(
        etcd.ctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX}/state/"),
        ])?,
        "etcdctl get",
    )?;
    ensure!(
        keys.contains(&format!("{PREFIX}/state/certs/web"))
            && keys.contains(&format!("{PREFIX}/state/bindings/web")),
        "A's state is in etcd: {keys}"
    );
    wait_members(&lab, &a, "both members serving the seeded state", |m| {
        m["error"].is_null() && m["lag"] == 0 && m["applied_revision"].as_i64() > Some(0)
    })?;
    drop(b);
    drop(a);
    Ok(())
}

/// One `PUT /v1/listeners/web/binding` over `socket`, its request already connected: sent when
/// `go` opens; returns the status code and the body.
fn racing_bind(
    socket: &str,
    cert: &str,
    go: std::sync::Arc<std::sync::Barrier>,
) -> std::thread::JoinHandle<Result<(u16, String)>> {
    use std::io::{Read, Write};
    let body =
        serde_json::json!({ "certificates": [{ "cert": cert, "default": true }] }).to_string();
    let request = format!(
        "PUT /v1/listeners/web/binding HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let socket = socket.to_owned();
    std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&socket)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        go.wait();
        s.write_all(request.as_bytes())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP answer: {answer:?}"))?;
        Ok((status, answer))
    })
}

/// Two appliances write the same binding at the same instant, round after round: in every
/// round at least one wins and the other either wins after it (it read the newer state) or
/// gets `409 fleet_conflict` — never two failures, never another error — and at least one round
/// ends in a conflict; both appliances then serve what etcd holds.
#[test]
fn concurrent_writes_to_one_binding_from_two_appliances_one_wins_one_conflicts() -> Result<()> {
    if !(common::require("etcd", "etcd-server")
        && common::require("etcdctl", "etcd-client")
        && common::require("openssl", "openssl"))
    {
        return Ok(());
    }
    let lab = Lab::new()?;
    let etcd = Etcd::start(lab.dir.path())?;
    lab.token_key_with_chain("ec-p256", "web")?;
    let mut certs = Vec::new();
    for id in ["one", "two", "three"] {
        let (chain, fingerprint) = new_chain(&lab, &format!("{id}.pem"))?;
        certs.push((id, chain, fingerprint));
    }
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let (a, b, _) = start_pair(&lab, &etcd, &backend, "")?;
    wait_members(&lab, &a, "both members reporting", |m| m["error"].is_null())?;
    for (id, chain, _) in &certs {
        lab.run(&[
            "ctl",
            "--socket",
            &a.socket,
            "certs",
            "upload",
            "--id",
            id,
            "--key",
            "web",
            "--chain",
            &chain.display().to_string(),
        ])?;
    }
    // The certificate etcd's binding names, if any.
    let held = || -> Result<Option<usize>> {
        let value = check(
            etcd.ctl(&[
                "get",
                "--print-value-only",
                &format!("{PREFIX}/state/bindings/web"),
            ])?,
            "get",
        )?;
        Ok(certs
            .iter()
            .position(|(id, _, _)| value.contains(&format!("\"{id}\""))))
    };
    let mut conflicts = 0;
    let mut rounds = 0;
    while rounds < 30 && conflicts < 3 {
        rounds += 1;
        // Both appliances have applied the newest state before the round starts.
        wait_members(&lab, &a, "both members at lag 0", |m| {
            m["lag"] == 0 && m["error"].is_null()
        })?;
        let go = std::sync::Arc::new(std::sync::Barrier::new(2));
        // Each writes a binding other than the one held, so both are changes.
        let held_now = held()?;
        let mut others = (0..certs.len()).filter(|&i| Some(i) != held_now);
        let (first, second) = match (others.next(), others.next()) {
            (Some(x), Some(y)) => (certs[x].0, certs[y].0),
            _ => anyhow::bail!("three certificates, at most one held"),
        };
        let on_a = racing_bind(&a.socket, first, go.clone());
        let on_b = racing_bind(&b.socket, second, go);
        let ra = on_a.join().map_err(|_| anyhow::anyhow!("thread"))??;
        let rb = on_b.join().map_err(|_| anyhow::anyhow!("thread"))??;
        for (status, answer) in [&ra, &rb] {
            ensure!(
                *status == 204 || (*status == 409 && answer.contains("fleet_conflict")),
                "round {rounds}: neither a success nor a conflict: {answer}"
            );
        }
        ensure!(
            ra.0 == 204 || rb.0 == 204,
            "round {rounds}: both writes failed:\n{}\n{}",
            ra.1,
            rb.1
        );
        conflicts += usize::from(ra.0 == 409 || rb.0 == 409);
    }
    println!("{conflicts} conflicts in {rounds} rounds");
    ensure!(
        conflicts > 0,
        "{rounds} rounds of simultaneous writes and never a conflict"
    );
    // Both serve the binding etcd holds.
    let want = &certs[held()?.context("etcd holds a binding")?].2;
    wait_served(a.port("web")?, want, "A serving etcd's binding")?;
    wait_served(b.port("web")?, want, "B serving etcd's binding")?;
    drop(b);
    drop(a);
    Ok(())
}
