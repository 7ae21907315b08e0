//! Fleet mode on a real 3-member etcd cluster (Debian `etcd-server`) on loopback, appliances
//! with their own state directories and their own tokens or keys: an appliance whose HSM lacks
//! a certificate's key binds the others and reports it; an appliance moved into fleet mode on an
//! empty fleet seeds it with its state directory; two appliances writing one binding at the same
//! instant: one wins, the other gets a conflict.

mod api_support;
mod common;
mod fleet_support;

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use api_support::{file_fingerprint, served_fingerprint};
use common::acme_support::{write_config, Gate};
use common::{check, demo_backend, Lab};
use fleet_support::*;

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

    let ctl_a = |args: &[&str]| ctl_at(&lab, &a.socket, args);
    let upload = |id: &str, key: &str, chain: &Path| upload_at(&lab, &a.socket, id, key, chain);
    // A key on both tokens (imported into each through its appliance's API).
    let clone_key = |label: &str, key: &Path| -> Result<()> {
        let key = key.display().to_string();
        for (l, gate) in [(&lab, &a), (&lab_b, &b)] {
            ctl_at(
                l,
                &gate.socket,
                &["keys", "import", "--label", label, "--key-file", &key],
            )?;
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
    let text = ctl_at(&lab, &a.socket, &["fleet", "status"])?;
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
    upload_at(&lab, &a.socket, "web", "web", &web)?;
    ctl_at(
        &lab,
        &a.socket,
        &["listeners", "bind", "--listener", "web", "--cert", "web"],
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
        upload_at(&lab, &a.socket, id, "web", chain)?;
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
