//! An order interrupted mid-way. pebble's tls-alpn-01 validation is held by a relay while the
//! test restarts one side:
//! - tlsgate killed (SIGKILL) with the order in flight and started again: it resumes the order
//!   from its state directory (the same order URL), answers the validation, and pebble saw one
//!   order only.
//! - pebble killed and started again: pebble keeps its state in memory, so the order (and the
//!   account) are gone; tlsgate says so, registers again and places one new order.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::acme_support::{
    acme_entry, free_port, have_pebble, wait_for, write_config, Gate, Pebble, PebbleOpts, Stall,
};
use common::{demo_backend, Lab};

struct Setup {
    lab: Lab,
    _backend: common::ChildGuard,
    config: std::path::PathBuf,
    pebble: Pebble,
    stall: Stall,
}

/// tlsgate with an order in flight whose validation the relay holds.
fn order_in_flight(tag: &str) -> Result<(Setup, Gate, String)> {
    let lab = Lab::new()?;
    let (backend_guard, backend) = demo_backend(lab.dir.path())?;
    let stall = Stall::start()?;
    let pebble_port = free_port()?;
    let directory = format!("https://127.0.0.1:{pebble_port}/dir");
    let entry = acme_entry(&lab, "www", &directory, &["www.acme.test"], "");
    let config = write_config(&lab, tag, &backend, &entry)?;
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
    let gate = Gate::start(&lab, &config)?;
    wait_for(Duration::from_secs(30), "pebble validating", || {
        Ok((stall.accepted() >= 1).then_some(()))
    })
    .with_context(|| gate.log_text())?;
    let order = gate.status(&lab, "www")?["order_url"]
        .as_str()
        .context("an order in flight")?
        .to_owned();
    Ok((
        Setup {
            lab,
            _backend: backend_guard,
            config,
            pebble,
            stall,
        },
        gate,
        order,
    ))
}

#[test]
fn tlsgate_restarted_mid_order_resumes_it_without_a_second_order() -> Result<()> {
    if !have_pebble() {
        return Ok(());
    }
    let (s, gate, order) = order_in_flight("k")?;
    ensure!(
        s.pebble.orders()? == 1,
        "orders at pebble before the restart"
    );
    gate.kill()?;
    let gate = Gate::start(&s.lab, &s.config)?;
    // Once the new process has published the challenge again, the held validation goes on.
    wait_for(
        Duration::from_secs(20),
        "the resumed order's challenge",
        || {
            let log = gate.log_text();
            let resumed = log.split("resuming the ACME order in flight").nth(1);
            Ok(resumed
                .is_some_and(|after| after.contains("challenge published"))
                .then_some(()))
        },
    )
    .with_context(|| gate.log_text())?;
    s.stall.forward(gate.port("web")?);
    let issued = gate.wait_issued(&s.lab, "www", None, Duration::from_secs(60))?;
    ensure!(issued["orders_placed"] == 1, "{issued}");
    ensure!(
        gate.log_text().contains(&format!(
            "resuming the ACME order in flight acme=www order={order}"
        )),
        "{}",
        gate.log_text()
    );
    ensure!(s.pebble.orders()? == 1, "pebble saw a second order");
    Ok(())
}

#[test]
fn pebble_restarted_mid_order_gets_one_new_order() -> Result<()> {
    if !have_pebble() {
        return Ok(());
    }
    let (mut s, gate, _order) = order_in_flight("p")?;
    s.pebble.stop()?;
    s.stall.forward(gate.port("web")?);
    s.pebble.run()?;
    let issued = gate.wait_issued(&s.lab, "www", None, Duration::from_secs(60))?;
    ensure!(issued["orders_placed"] == 2, "{issued}");
    let log = gate.log_text();
    ensure!(log.contains("placing a new one"), "{log}");
    ensure!(
        s.pebble.orders()? == 2,
        "orders at pebble: {}",
        s.pebble.orders()?
    );
    Ok(())
}
