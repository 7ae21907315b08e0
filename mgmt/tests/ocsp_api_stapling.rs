//! OCSP stapling of certificates bound through the management API, with the stapler's own task
//! in front of a real test responder (responses signed by `openssl ocsp`): a bound certificate is
//! stapled (`openssl s_client -status`) and re-stapled when its responder has a newer response;
//! API changes and reloads fetch nothing for certificates that did not change (requests counted
//! at the responder); a responder that accepts and never answers delays neither an API call nor
//! a reload (compared with the same calls against a responder that answers).

mod api_support;
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use api_support::{ctl_ok, key_csr_chain, upload_cert};
use common::ocsp_support::{aia_leaf, response_valid, s_client_status, Responder};
use common::{Lab, Serve};

/// The stapled response's `This Update` line, if a good response is stapled.
fn stapled_this_update(port: u16) -> Result<Option<String>> {
    let out = s_client_status(&format!("127.0.0.1:{port}"))?;
    if !(out.contains("OCSP Response Status: successful") && out.contains("Cert Status: good")) {
        return Ok(None);
    }
    Ok(out
        .lines()
        .find(|l| l.trim_start().starts_with("This Update:"))
        .map(|l| l.trim().to_owned()))
}

/// Polls until the listener staples a good response other than `not`, within `limit`.
fn wait_for_staple(port: u16, not: Option<&str>, limit: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        if let Some(t) = stapled_this_update(port)? {
            if Some(t.as_str()) != not {
                return Ok(t);
            }
        }
        ensure!(
            start.elapsed() < limit,
            "no (new) OCSP staple within {limit:?}: {}",
            s_client_status(&format!("127.0.0.1:{port}"))?
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn write_config(lab: &Lab, boot: &Path, timeout_ms: u64) -> Result<std::path::PathBuf> {
    let path = lab.path("ocsp-api.toml");
    std::fs::write(
        &path,
        format!(
            "[pkcs11]\ntoken = \"lab\"\npin = \"file:{pin}\"\n\n[dataplane]\ncores = [0]\nio = \"portable\"\n\n\
             [api]\nsocket = \"{socket}\"\n\n[state]\ndir = \"{state}\"\n\n[ocsp]\ntimeout_ms = {timeout_ms}\n\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:9\"\n\
             [[listener.certificate]]\nchain = \"{boot}\"\nkey = \"{key}\"\n\n\
             [[listener]]\nname = \"other\"\nbind = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:9\"\n\
             [[listener.certificate]]\nchain = \"{boot}\"\nkey = \"{key}\"\n",
            pin = lab.p("token/user.pin"),
            socket = lab.p("api.sock"),
            state = lab.p("state"),
            boot = boot.display(),
            key = common::uri("boot"),
        ),
    )?;
    Ok(path)
}

fn port_of(config: &Path, name: &str) -> Result<u16> {
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    ready
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|a| a.trim().rsplit(':').next()?.parse().ok())
        .with_context(|| format!("{name} in {ready}"))
}

fn upload_and_bind(lab: &Lab, id: &str, key: &Path, chain: &Path, listener: &str) -> Result<()> {
    upload_cert(lab, id, &format!("file:{}", key.display()), chain)?;
    ctl_ok(
        lab,
        &["listeners", "bind", "--listener", listener, "--cert", id],
    )?;
    Ok(())
}

#[test]
fn a_certificate_bound_through_the_api_is_stapled_and_restapled_without_refetching_on_changes(
) -> Result<()> {
    if !common::require("openssl", "openssl") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let responder = Responder::start(false)?;
    let (key, chain, leaf) = aia_leaf(&lab, "api", responder.port, 5151)?;
    // Valid one minute: the stapler refreshes three quarters into that (45 s).
    let signer = ("ca/intermediate.pem", "ca/intermediate.key");
    let first = response_valid(&lab, "first", &leaf, false, signer, &["-nmin", "1"])?;
    responder.set(std::fs::read(&first)?);
    let config = write_config(&lab, &boot, 5_000)?;
    let serve = Serve::start(&lab, &config)?;
    let web = port_of(&config, "web")?;

    upload_and_bind(&lab, "api", &key, &chain, "web")?;
    let stapled = wait_for_staple(web, None, Duration::from_secs(20))?;
    ensure!(responder.requests() == 1, "one fetch for one certificate");

    // API changes that leave the certificate as it is, and a reload: no fetch.
    let other = key_csr_chain(&lab, "other")?;
    ctl_ok(
        &lab,
        &[
            "certs",
            "upload",
            "--id",
            "other",
            "--key",
            "other",
            "--chain",
            &other.display().to_string(),
        ],
    )?;
    ctl_ok(
        &lab,
        &[
            "listeners",
            "bind",
            "--listener",
            "other",
            "--cert",
            "other",
        ],
    )?;
    ctl_ok(
        &lab,
        &["listeners", "bind", "--listener", "web", "--cert", "api"],
    )?;
    ctl_ok(&lab, &["reload"])?;
    ensure!(
        stapled_this_update(web)?.as_deref() == Some(stapled.as_str()),
        "the staple stays through API changes"
    );
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        responder.requests() == 1,
        "API changes and a reload fetched again: {} requests",
        responder.requests()
    );

    // A newer response at the responder is picked up before the first one's nextUpdate.
    std::thread::sleep(Duration::from_millis(1100));
    let second = response_valid(&lab, "second", &leaf, false, signer, &["-nmin", "2"])?;
    responder.set(std::fs::read(&second)?);
    let restapled = wait_for_staple(web, Some(&stapled), Duration::from_secs(90))?;
    ensure!(restapled != stapled && responder.requests() >= 2);
    serve.signal("TERM")?;
    Ok(())
}

#[test]
fn a_silent_responder_delays_no_api_call_and_no_reload() -> Result<()> {
    if !common::require("openssl", "openssl") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let answering = Responder::start(false)?;
    let silent = Responder::start(true)?;
    let (key_a, chain_a, leaf_a) = aia_leaf(&lab, "answered", answering.port, 6161)?;
    let (key_s, chain_s, _) = aia_leaf(&lab, "silent", silent.port, 6262)?;
    let signer = ("ca/intermediate.pem", "ca/intermediate.key");
    answering.set(std::fs::read(response_valid(
        &lab,
        "a",
        &leaf_a,
        false,
        signer,
        &["-ndays", "1"],
    )?)?);
    // A long fetch timeout: a call that waited for the silent responder would take all of it.
    let timeout = Duration::from_secs(20);
    let config = write_config(&lab, &boot, timeout.as_millis() as u64)?;
    let serve = Serve::start(&lab, &config)?;
    let web = port_of(&config, "web")?;

    let t = Instant::now();
    upload_and_bind(&lab, "answered", &key_a, &chain_a, "web")?;
    let normal_call = t.elapsed();
    wait_for_staple(web, None, Duration::from_secs(20))?;
    let t = Instant::now();
    ctl_ok(&lab, &["reload"])?;
    let normal_reload = t.elapsed();

    let t = Instant::now();
    upload_and_bind(&lab, "silent", &key_s, &chain_s, "other")?;
    let silent_call = t.elapsed();
    // The stapler did go to the silent responder (and is waiting on it now).
    let start = Instant::now();
    while silent.connections() == 0 {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the stapler never asked the silent responder"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    ctl_ok(&lab, &["reload"])?;
    let silent_reload = t.elapsed();
    let t = Instant::now();
    ctl_ok(&lab, &["certs", "list"])?;
    let silent_list = t.elapsed();

    // Wide margin: half the fetch timeout above the same call against an answering responder.
    let bound = |normal: Duration| normal + timeout / 2;
    ensure!(
        silent_call < bound(normal_call),
        "upload+bind: {silent_call:?} with a silent responder vs {normal_call:?}"
    );
    ensure!(
        silent_reload < bound(normal_reload) && silent_list < bound(normal_reload),
        "reload: {silent_reload:?} (list {silent_list:?}) with a silent responder vs {normal_reload:?}"
    );
    // The other listener still serves, without a staple.
    ensure!(stapled_this_update(port_of(&config, "other")?)?.is_none());
    serve.signal("TERM")?;
    Ok(())
}
