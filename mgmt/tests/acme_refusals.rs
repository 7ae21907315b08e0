//! ACME failures that are the operator's to fix, against pebble (External Account Binding
//! required, one name on its blocklist): an unreachable directory, a name the CA refuses, an
//! account with a bad EAB key. Each shows in `ctl acme status` with the CA's problem document
//! (or the network error), is logged, retried with back-off, and the certificate the listener
//! already serves keeps serving.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::acme_support::{
    acme_entry, free_port, have_pebble, s_client_chain, wait_for, write_config, Gate, Pebble,
    PebbleOpts,
};
use common::{demo_backend, Lab};

/// pebble's example EAB key for `kid-1` (base64url).
const EAB_KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
const WRONG_KEY: &str = "b10lLJs8l1GPIzsLP0s6pMt8O0XVGnfTaCeROxQM0BIt2XrJMDHJZBM5NuQmQJQH";

#[test]
fn unreachable_directory_refused_name_and_bad_eab_are_clear_and_keep_serving() -> Result<()> {
    if !have_pebble() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let pebble_port = free_port()?;
    let directory = format!("https://127.0.0.1:{pebble_port}/dir");
    let nowhere = format!("https://127.0.0.1:{}/dir", free_port()?);
    std::fs::write(lab.path("eab.key"), EAB_KEY)?;
    std::fs::write(lab.path("wrong.key"), WRONG_KEY)?;
    for f in ["eab.key", "wrong.key"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(lab.path(f), std::fs::Permissions::from_mode(0o600))?;
    }
    let eab = |file: &str| {
        format!(
            "eab = {{ kid = \"kid-1\", hmac_key = \"file:{}\" }}",
            lab.p(file)
        )
    };
    let more = [
        acme_entry(&lab, "down", &nowhere, &["down.acme.test"], ""),
        acme_entry(
            &lab,
            "blocked",
            &directory,
            &["blocked.acme.test"],
            &eab("eab.key"),
        ),
        acme_entry(
            &lab,
            "badeab",
            &directory,
            &["ok.acme.test"],
            &eab("wrong.key"),
        ),
    ]
    .join("\n");
    let config = write_config(&lab, "r", &backend, &more)?;
    let gate = Gate::start(&lab, &config)?;
    let web = gate.port("web")?;
    let _pebble = Pebble::start(
        &lab,
        PebbleOpts {
            port: pebble_port,
            tls_port: web,
            http_port: 1,
            ipv4: "127.0.0.1",
            eab: vec![("kid-1".into(), EAB_KEY.into())],
            blocklist: vec!["blocked.acme.test"],
            env: vec![("PEBBLE_WFE_NONCEREJECT", "0".into())],
        },
    )?;

    let failed = |name: &'static str, want: &'static dyn Fn(&serde_json::Value) -> bool| {
        wait_for(Duration::from_secs(60), name, || {
            let s = gate.status(&lab, name)?;
            Ok((s["failures"].as_u64().unwrap_or(0) >= 2 && want(&s["last_error"])).then_some(s))
        })
        .with_context(|| format!("{:?}", gate.status(&lab, name)))
    };
    let down = failed("down", &|e| {
        e["type"] == "tlsgate:network"
            && e["detail"].as_str().is_some_and(|d| d.contains("connect"))
    })?;
    let blocked = failed("blocked", &|e| {
        e["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:ietf:params:acme:error:"))
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("new order"))
    })?;
    let badeab = failed("badeab", &|e| {
        e["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:ietf:params:acme:error:"))
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("new account"))
    })?;
    for s in [&down, &blocked, &badeab] {
        ensure!(s["state"] == "retrying" && s["serial"].is_null(), "{s}");
    }
    ensure!(
        blocked["last_error"]
            .to_string()
            .contains("blocked.acme.test"),
        "the refusal does not name the refused name: {blocked}"
    );

    // The file's certificate serves throughout; no ACME certificate was made.
    let served = s_client_chain(web, "localhost")?;
    ensure!(served.contains("CN = localhost"), "{served}");
    let keys = lab.list()?;
    ensure!(
        !keys
            .iter()
            .any(|k| k["label"].as_str().is_some_and(|l| l.starts_with("acme-"))),
        "a key was generated for an order that never got that far: {keys:?}"
    );
    // The text view and the log say the same.
    let text = lab.run(&["ctl", "--socket", &gate.socket, "acme", "status"])?;
    ensure!(text.contains("last_error: tlsgate:network"), "{text}");
    let log = gate.log_text();
    for name in ["acme=down", "acme=blocked", "acme=badeab"] {
        ensure!(
            log.lines()
                .any(|l| l.contains("ACME attempt failed") && l.contains(name)),
            "no failure logged for {name}:\n{log}"
        );
    }
    Ok(())
}
