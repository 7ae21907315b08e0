//! Fleet mode on a real 3-member etcd cluster (Debian `etcd-server`) on loopback: two appliances
//! with their own state directories on one SoftHSM2 token. A certificate uploaded and bound
//! through appliance A is served by B; a malformed certificate written straight into etcd is
//! refused by both, which keep serving the previous one and report it in `ctl fleet status`;
//! with etcd gone, a restarted appliance serves its cached state. Losing one etcd member changes
//! nothing; losing quorum refuses writes with a clear error while both keep serving, and the
//! fleet converges once quorum is back. Audit lines name the appliance and the operator. A CRL
//! uploaded through one appliance revokes a client certificate on both; a client CA bundle
//! uploaded through one changes which clients both let in.

mod api_support;
mod common;
mod fleet_support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use api_support::{file_fingerprint, served_fingerprint};
use common::acme_support::{wait_for, Gate};
use common::policy_support::let_in;
use common::{check, demo_backend, Lab};
use fleet_support::*;

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
    upload_at(&lab, &sock, "web", "web", &web)?;
    ctl_at(
        &lab,
        &sock,
        &[
            "listeners",
            "bind",
            "--listener",
            "web",
            "--cert",
            "web",
            "--default",
            "web",
        ],
    )?;
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
    ctl_at(
        &lab,
        &a.socket,
        &[
            "listeners",
            "bind",
            "--listener",
            "web",
            "--cert",
            "web",
            "--default",
            "web",
        ],
    )?;
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
    let alice =
        |gate: &Gate| -> Result<bool> { let_in(gate.port("web")?, &alice_cert, &alice_key) };
    ensure!(alice(&a)? && alice(&b)?, "alice is let in before the CRL");

    // The CRL revoking alice, uploaded through A only: both refuse her.
    ctl_at(
        &lab,
        &a.socket,
        &[
            "crls",
            "upload",
            "--listener",
            "web",
            "--file",
            &crl.display().to_string(),
        ],
    )?;
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
    ctl_at(
        &lab,
        &b.socket,
        &["crls", "delete", "--listener", "web", "--id", &id],
    )?;
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

#[test]
fn a_client_ca_bundle_uploaded_through_one_appliance_decides_on_both() -> Result<()> {
    if !(common::require("etcd", "etcd-server")
        && common::require("etcdctl", "etcd-client")
        && common::require("curl", "curl"))
    {
        return Ok(());
    }
    let lab = Lab::new()?;
    let etcd = Etcd::start(lab.dir.path())?;
    let dir = lab.path("zones");
    std::fs::create_dir_all(&dir)?;
    let mut zone_a = common::policy_support::Zone::new(&dir, "zone-a")?;
    let mut zone_b = common::policy_support::Zone::new(&dir, "zone-b")?;
    let (alice_cert, alice_key) = zone_a.client("alice")?;
    let (bob_cert, bob_key) = zone_b.client("bob")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let client_auth = format!(
        "[listener.client_auth]\nmode = \"required\"\nca = \"{}\"\n\n",
        zone_a.ca_path().display()
    );
    let (a, b, _) = start_pair(&lab, &etcd, &backend, &client_auth)?;
    wait_members(&lab, &a, "both members reporting", |m| m["error"].is_null())?;
    let let_in = |gate: &Gate, cert: &std::path::Path, key: &std::path::Path| -> Result<bool> {
        let_in(gate.port("web")?, cert, key)
    };
    for gate in [&a, &b] {
        ensure!(
            let_in(gate, &alice_cert, &alice_key)? && !let_in(gate, &bob_cert, &bob_key)?,
            "zone A's clients only, before the upload"
        );
    }

    // Zone B's bundle, uploaded through A only: both let bob in and keep alice out.
    let ca_b = zone_b.ca_path().display().to_string();
    ctl_at(
        &lab,
        &a.socket,
        &["client-ca", "set", "--listener", "web", "--file", &ca_b],
    )?;
    let t = Instant::now();
    wait_for(Duration::from_secs(20), "B letting bob in", || {
        Ok(let_in(&b, &bob_cert, &bob_key)?.then_some(()))
    })?;
    println!(
        "a client CA bundle uploaded on A decided on B after {:?}",
        t.elapsed()
    );
    for gate in [&a, &b] {
        ensure!(
            let_in(gate, &bob_cert, &bob_key)? && !let_in(gate, &alice_cert, &alice_key)?,
            "zone B's clients only, after the upload"
        );
    }
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
        keys.contains(&format!("{PREFIX}/state/client-cas/web")),
        "the bundle is in etcd: {keys}"
    );

    // Cleared through B: zone A's clients again on both.
    ctl_at(
        &lab,
        &b.socket,
        &["client-ca", "clear", "--listener", "web"],
    )?;
    wait_for(Duration::from_secs(20), "A letting alice in again", || {
        Ok(let_in(&a, &alice_cert, &alice_key)?.then_some(()))
    })?;
    for gate in [&a, &b] {
        ensure!(
            let_in(gate, &alice_cert, &alice_key)? && !let_in(gate, &bob_cert, &bob_key)?,
            "zone A's clients only, after the clear"
        );
    }
    Ok(())
}
