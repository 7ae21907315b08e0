//! Session resumption through the real binary: fleet tickets shared by two appliance processes
//! on one SoftHSM2 token, ticket lifetime and rotation, and tickets / the session cache turned
//! off. A rustls client reports whether each handshake resumed (`handshake_kind()`), for
//! listeners whose key is on the token (resumptions run inline under the data plane's tripwire
//! configuration) and in software.

mod common;
mod resumption_support;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{Lab, Serve};
use rustls::HandshakeKind;

use resumption_support::{
    client, connect, lab_with_secret, listeners, listeners_sw, metric_sum, port_of, ports,
    s_client, shim_path, sleep_until, unix_now, uring_or_portable, versions, write_config,
    write_config_with, SECRET,
};

#[test]
fn fleet_tickets_resume_on_a_second_process_sharing_the_token() -> Result<()> {
    let lab = lab_with_secret()?;
    let (_backend, backend) = common::demo_backend(lab.dir.path())?;
    let fleet = format!("fleet_secret = \"{SECRET}\"");
    let mut ls: Vec<(&str, String, PathBuf, String)> = listeners(&lab)?
        .into_iter()
        .map(|(n, k, c)| (n, k, c, fleet.clone()))
        .collect();
    // Same software key, tickets from this process only.
    let (_, sw_key, sw_chain) = listeners_sw(&ls)?;
    ls.push(("local", sw_key, sw_chain, String::new()));
    let metrics = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    // A on the portable driver, B on io_uring where the kernel allows it: the tickets are the
    // same whichever driver carries the handshake.
    let a_cfg = write_config_with(&lab, "a.toml", &backend, &ls, metrics, "portable")?;
    let b_cfg = write_config_with(&lab, "b.toml", &backend, &ls, "", uring_or_portable())?;
    let _a = Serve::start(&lab, &a_cfg)?;
    let _b = Serve::start(&lab, &b_cfg)?;
    let (a, b) = (ports(&a_cfg)?, ports(&b_cfg)?);

    for (vname, version) in versions() {
        for name in ["tok", "sw"] {
            let c = client(&lab, version, false)?;
            let what = format!("{name} {vname}");
            assert_eq!(
                connect(&c, port_of(&a, name)?)?,
                HandshakeKind::Full,
                "{what}: first"
            );
            assert_eq!(
                connect(&c, port_of(&b, name)?)?,
                HandshakeKind::Resumed,
                "{what}: a ticket from process A resumes on process B"
            );
            assert_eq!(
                connect(&c, port_of(&a, name)?)?,
                HandshakeKind::Resumed,
                "{what}: and one from B on A"
            );
        }
        // Zones stay apart: the derivation label is the listener name.
        let c = client(&lab, version, false)?;
        connect(&c, port_of(&a, "sw")?)?;
        assert_eq!(
            connect(&c, port_of(&b, "tok")?)?,
            HandshakeKind::Full,
            "{vname}: a ticket of listener sw does not resume on listener tok"
        );
        // Without a fleet secret, tickets are the process's own.
        let c = client(&lab, version, false)?;
        connect(&c, port_of(&a, "local")?)?;
        assert_eq!(
            connect(&c, port_of(&b, "local")?)?,
            HandshakeKind::Full,
            "{vname}: local tickets do not cross processes"
        );
        assert_eq!(
            connect(&c, port_of(&b, "local")?)?,
            HandshakeKind::Resumed,
            "{vname}: local tickets resume on their own process"
        );
    }

    // OpenSSL as the client: a session saved from A resumes on B.
    for v in ["-tls1_3", "-tls1_2"] {
        let sess = lab.path(&format!("sess{v}.pem"));
        let first = s_client(
            &lab,
            port_of(&a, "tok")?,
            v,
            &["-sess_out", &sess.display().to_string()],
        )?;
        assert!(first.contains("\nNew, TLS"), "{v} first: {first}");
        let again = s_client(
            &lab,
            port_of(&b, "tok")?,
            v,
            &["-sess_in", &sess.display().to_string()],
        )?;
        assert!(
            again.contains("\nReused, TLS"),
            "{v}: an OpenSSL session from process A resumes on process B: {again}"
        );
    }

    // The counters: keys derived through the token, tickets issued and accepted, the zone-
    // crossing and foreign tickets rejected. Cores publish them about once a second.
    let metrics_addr = std::fs::read_to_string(a_cfg.with_extension("ready"))?
        .lines()
        .find_map(|l| l.strip_prefix("metrics ").map(str::to_owned))
        .context("metrics address in the ready file")?;
    let wanted = [
        (
            "tlsgate_ticket_keys_total{",
            "listener=\"tok\"",
            "source=\"fleet\"",
            "result=\"ok\"",
        ),
        (
            "tlsgate_ticket_keys_total{",
            "listener=\"local\"",
            "source=\"local\"",
            "result=\"ok\"",
        ),
        (
            "tlsgate_session_tickets_total{",
            "listener=\"tok\"",
            "result=\"issued\"",
            "",
        ),
        (
            "tlsgate_session_tickets_total{",
            "listener=\"sw\"",
            "result=\"accepted\"",
            "",
        ),
        ("tlsgate_ticket_keys_held{", "listener=\"tok\"", "", ""),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{metrics_addr}/metrics"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(name, a, b, c)| {
                !text
                    .lines()
                    .any(|l| l.starts_with(name) && l.contains(a) && l.contains(b) && l.contains(c))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "metrics missing {missing:?} in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn a_missing_fleet_secret_stops_the_start_with_a_clear_error() -> Result<()> {
    let lab = Lab::new()?;
    let (_backend, backend) = common::demo_backend(lab.dir.path())?;
    let ls: Vec<(&str, String, PathBuf, String)> = listeners(&lab)?
        .into_iter()
        .map(|(n, k, c)| (n, k, c, format!("fleet_secret = \"{SECRET}\"")))
        .collect();
    let cfg = write_config(&lab, "bad.toml", &backend, &ls)?;
    let out = lab
        .cmd(&["serve", "--config", &cfg.display().to_string()])
        .output()?;
    let err = common::fail(out, "serve with a missing fleet secret")?;
    ensure!(
        err.contains("cannot make ticket keys") && err.contains("object=tickets"),
        "{err}"
    );
    // And a fleet secret that names a private key is refused when the file is read.
    let wrong = std::fs::read_to_string(&cfg)?.replace("type=secret-key", "type=private");
    std::fs::write(&cfg, wrong)?;
    let out = lab
        .cmd(&["serve", "--config", &cfg.display().to_string()])
        .output()?;
    let err = common::fail(out, "serve with a private key as fleet secret")?;
    ensure!(err.contains("session.fleet_secret"), "{err}");
    Ok(())
}

#[test]
fn a_previous_epochs_ticket_resumes_and_an_expired_one_is_refused() -> Result<()> {
    const ROTATION: u64 = 2;
    const LIFETIME: u64 = 5;
    let lab = lab_with_secret()?;
    let (_backend, backend) = common::demo_backend(lab.dir.path())?;
    let session = format!(
        "fleet_secret = \"{SECRET}\"\nticket_rotation_secs = {ROTATION}\nlifetime_secs = {LIFETIME}"
    );
    let ls: Vec<(&str, String, PathBuf, String)> = listeners(&lab)?
        .into_iter()
        .map(|(n, k, c)| (n, k, c, session.clone()))
        .collect();
    let a_cfg = write_config(&lab, "a.toml", &backend, &ls)?;
    let b_cfg = write_config(&lab, "b.toml", &backend, &ls)?;
    let _a = Serve::start(&lab, &a_cfg)?;
    let _b = Serve::start(&lab, &b_cfg)?;
    let (a, b) = (ports(&a_cfg)?, ports(&b_cfg)?);

    // Each case: one client to resume in a later epoch, one (frozen clock) to offer its ticket
    // past the lifetime. The server stamps a ticket between the times taken around `connect`.
    let mut cases = Vec::new();
    for (vname, version) in versions() {
        for (name, _, _, _) in &ls {
            let rot = client(&lab, version, false)?;
            let exp = client(&lab, version, true)?;
            let rot_start = unix_now();
            assert_eq!(connect(&rot, port_of(&a, name)?)?, HandshakeKind::Full);
            let rot_end = unix_now();
            assert_eq!(connect(&exp, port_of(&a, name)?)?, HandshakeKind::Full);
            let exp_end = unix_now();
            cases.push((
                format!("{name} {vname}"),
                *name,
                rot,
                exp,
                rot_start,
                rot_end,
                exp_end,
            ));
        }
    }

    // A later epoch: the ticket's key is no longer the one that issues.
    for (what, name, rot, _, rot_start, rot_end, _) in &cases {
        let later_epoch = ((*rot_end as u64) / ROTATION + 1) * ROTATION;
        sleep_until(later_epoch as f64 + 0.1);
        let age = unix_now() - rot_start;
        ensure!(
            age < LIFETIME as f64 - 0.3,
            "{what}: the machine is too slow for this test (ticket {age:.1} s old already)"
        );
        assert_eq!(
            connect(rot, port_of(&b, name)?)?,
            HandshakeKind::Resumed,
            "{what}: a ticket of an earlier epoch, at most {age:.1} s old, resumes on the other process"
        );
    }

    // Past the lifetime: the server refuses, although the (frozen-clock) client still offers it.
    for (what, name, _, exp, _, _, exp_end) in &cases {
        sleep_until(exp_end + LIFETIME as f64 + 1.2);
        assert_eq!(
            connect(exp, port_of(&b, name)?)?,
            HandshakeKind::Full,
            "{what}: a ticket older than lifetime_secs = {LIFETIME} is refused"
        );
    }
    Ok(())
}

#[test]
fn tickets_and_the_session_cache_can_be_turned_off() -> Result<()> {
    let lab = Lab::new()?;
    let (_backend, backend) = common::demo_backend(lab.dir.path())?;
    let base = listeners(&lab)?;
    let mut ls = Vec::new();
    let modes = [
        ("off", "tickets = false\ncache_size = 0"),
        ("cache", "tickets = false\ncache_size = 64"),
        ("tickets", "tickets = true\ncache_size = 0"),
        ("default", ""),
    ];
    for (key_name, key, chain) in &base {
        for (mode, session) in modes {
            let name: &'static str = Box::leak(format!("{key_name}-{mode}").into_boxed_str());
            ls.push((name, key.clone(), chain.clone(), session.to_owned()));
        }
    }
    let cfg = write_config(&lab, "one.toml", &backend, &ls)?;
    let _s = Serve::start(&lab, &cfg)?;
    let p = ports(&cfg)?;

    for (key_name, _, _) in &base {
        for (mode, _) in modes {
            let name = format!("{key_name}-{mode}");
            let port = port_of(&p, &name)?;
            for (vname, version) in versions() {
                let what = format!("{name} {vname}");
                let c = client(&lab, version, false)?;
                assert_eq!(connect(&c, port)?, HandshakeKind::Full, "{what}");
                let second = connect(&c, port)?;
                let tls13_tickets = c.store.tls13_tickets.load(Ordering::Relaxed);
                if mode == "off" {
                    assert_eq!(second, HandshakeKind::Full, "{what}: nothing resumes");
                    if vname == "TLS 1.3" {
                        assert_eq!(tls13_tickets, 0, "{what}: no NewSessionTicket at all");
                    }
                } else {
                    assert_eq!(second, HandshakeKind::Resumed, "{what}");
                }
            }
            // A TLS 1.2 client without ticket support resumes by session id: only from the
            // cache.
            let mut c = client(&lab, &rustls::version::TLS12, false)?;
            let mut cfg = (*c.config).clone();
            cfg.resumption = rustls::client::Resumption::store(c.store.clone())
                .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
            c.config = Arc::new(cfg);
            assert_eq!(connect(&c, port)?, HandshakeKind::Full);
            let expected = match mode {
                "off" | "tickets" => HandshakeKind::Full,
                _ => HandshakeKind::Resumed,
            };
            assert_eq!(
                connect(&c, port)?,
                expected,
                "{name} TLS 1.2 session id (cache_size = 0 means no session-id resumption)"
            );
        }
    }
    Ok(())
}

#[test]
fn a_reload_keeps_ticket_keys_unless_the_session_settings_change() -> Result<()> {
    use std::io::BufRead;
    let lab = Lab::new()?;
    let (_backend, backend) = common::demo_backend(lab.dir.path())?;
    let (_, sw_key, sw_chain) = listeners(&lab)?
        .into_iter()
        .find(|l| l.0 == "sw")
        .context("sw")?;
    let ls = vec![("sw", sw_key, sw_chain, "lifetime_secs = 7200".to_owned())];
    let cfg = write_config(&lab, "reload.toml", &backend, &ls)?;
    let mut serve = Serve::start(&lab, &cfg)?;
    let port = serve.port;
    let stderr = serve.guard.child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let reload = |serve: &Serve| -> Result<()> {
        serve.signal("HUP")?;
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .context("no reload line in the log")?;
            if line.contains("reload") {
                ensure!(line.contains("reloaded"), "reload failed: {line}");
                return Ok(());
            }
        }
    };
    let clients = versions()
        .into_iter()
        .map(|(v, version)| Ok((v, client(&lab, version, false)?)))
        .collect::<Result<Vec<_>>>()?;
    for (v, c) in &clients {
        assert_eq!(connect(c, port)?, HandshakeKind::Full, "{v}");
    }
    reload(&serve)?;
    for (v, c) in &clients {
        assert_eq!(
            connect(c, port)?,
            HandshakeKind::Resumed,
            "{v}: a reload with the same settings keeps the ticket keys and the cache"
        );
    }
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)?.replace("lifetime_secs = 7200", "lifetime_secs = 3600"),
    )?;
    reload(&serve)?;
    for (v, c) in &clients {
        assert_eq!(
            connect(c, port)?,
            HandshakeKind::Full,
            "{v}: new session settings start with new keys"
        );
    }
    Ok(())
}

#[test]
fn when_the_token_fails_held_ticket_keys_keep_resuming_and_derivation_recovers() -> Result<()> {
    const ROTATION: u64 = 2;
    const LIFETIME: u64 = 8;
    let lab = lab_with_secret()?;
    let (_backend, backend) = common::demo_backend(lab.dir.path())?;
    let (_, sw_key, sw_chain) = listeners(&lab)?
        .into_iter()
        .find(|l| l.0 == "sw")
        .context("sw")?;
    let control = lab.path("shim.control");
    std::fs::write(&control, "")?;
    let session = format!(
        "fleet_secret = \"{SECRET}\"\nticket_rotation_secs = {ROTATION}\nlifetime_secs = {LIFETIME}"
    );
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let cfg = write_config_with(
        &lab,
        "faults.toml",
        &backend,
        &[("sw", sw_key, sw_chain, session)],
        extra,
        "portable",
    )?;
    // Through the shim: C_Sign (here only the HMAC derivations; the certificate key is in
    // software) fails while the control file says so.
    let text = std::fs::read_to_string(&cfg)?.replacen(
        "[pkcs11]\n",
        &format!("[pkcs11]\nmodule = \"{}\"\n", shim_path()?.display()),
        1,
    );
    std::fs::write(&cfg, text)?;
    let _serve = Serve::start_with_env(
        &lab,
        &cfg,
        &[
            ("TLSGATE_SHIM_CONTROL", control.display().to_string()),
            (
                "TLSGATE_SHIM_MODULE",
                "/usr/lib/softhsm/libsofthsm2.so".to_owned(),
            ),
        ],
    )?;
    let p = ports(&cfg)?;
    let port = port_of(&p, "sw")?;
    let metrics_addr = std::fs::read_to_string(cfg.with_extension("ready"))?
        .lines()
        .find_map(|l| l.strip_prefix("metrics ").map(str::to_owned))
        .context("metrics address")?;

    let early = client(&lab, &rustls::version::TLS13, false)?;
    assert_eq!(connect(&early, port)?, HandshakeKind::Full);
    let issued = unix_now();
    ensure!(
        early.store.tls13_tickets.load(Ordering::Relaxed) > 0,
        "tickets issued"
    );

    // The token fails. Two epochs later the current key could not be derived ahead.
    let tmp = control.with_extension("tmp");
    std::fs::write(&tmp, "fail C_Sign CKR_DEVICE_ERROR\n")?;
    std::fs::rename(&tmp, &control)?;
    let two_epochs_on = ((issued as u64) / ROTATION + 2) * ROTATION;
    std::thread::sleep(Duration::from_secs_f64(
        (two_epochs_on as f64 + 0.5 - unix_now()).max(0.0),
    ));
    ensure!(unix_now() - issued < LIFETIME as f64 - 1.0, "too slow");
    let before = early.store.tls13_tickets.load(Ordering::Relaxed);
    assert_eq!(
        connect(&early, port)?,
        HandshakeKind::Resumed,
        "a ticket under a key already held resumes while the token fails"
    );
    assert_eq!(
        early.store.tls13_tickets.load(Ordering::Relaxed),
        before,
        "no new ticket without a key for the current epoch"
    );
    let fresh = client(&lab, &rustls::version::TLS13, false)?;
    assert_eq!(
        connect(&fresh, port)?,
        HandshakeKind::Full,
        "handshakes go on"
    );
    assert_eq!(fresh.store.tls13_tickets.load(Ordering::Relaxed), 0);
    ensure!(
        metric_sum(
            &metrics_addr,
            "tlsgate_ticket_keys_total{",
            "result=\"failed\""
        )? > 0.0,
        "derivation failures are counted"
    );

    // The token is back: the maintenance thread derives the current key within a tick.
    std::fs::write(&tmp, "")?;
    std::fs::rename(&tmp, &control)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = client(&lab, &rustls::version::TLS13, false)?;
        connect(&c, port)?;
        if c.store.tls13_tickets.load(Ordering::Relaxed) > 0 {
            assert_eq!(connect(&c, port)?, HandshakeKind::Resumed, "after recovery");
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no tickets 10 s after the token came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn the_ticket_secret_is_generated_listed_and_deleted_by_the_cli() -> Result<()> {
    let lab = lab_with_secret()?;
    let list = lab.run(&["token", "list"])?;
    let row = list
        .lines()
        .find(|l| l.starts_with("tickets "))
        .with_context(|| format!("no secret row in:\n{list}"))?;
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols[2..7],
        ["generic-secret", "32", "true", "false", "true"],
        "type, bytes, sensitive, extractable, sign-only: {row}"
    );
    // The JSON form lists key pairs only, as before.
    assert!(!lab.run(&["token", "list", "--json"])?.contains("tickets"));
    let again = common::fail(
        lab.cmd(&[
            "token",
            "generate",
            "--type",
            "ticket-secret",
            "--label",
            "tickets",
        ])
        .output()?,
        "a second secret with the same label",
    )?;
    assert!(again.contains("already holds"), "{again}");
    let bad = common::fail(
        lab.cmd(&[
            "token",
            "generate",
            "--type",
            "ticket-secrets",
            "--label",
            "x",
        ])
        .output()?,
        "an unknown type",
    )?;
    assert!(
        bad.contains("ticket-secret"),
        "the error lists the types: {bad}"
    );
    lab.run(&["token", "delete", "--key", SECRET])?;
    assert!(!lab.run(&["token", "list"])?.contains("secret keys"));
    Ok(())
}

#[test]
fn a_tls12_session_resumed_again_and_again_still_ends_a_lifetime_after_its_full_handshake(
) -> Result<()> {
    // rustls gives a TLS 1.2 client that resumes with a ticket a new ticket for the same master
    // secret; without care each one would restart the clock and the secret would live forever.
    const LIFETIME: u64 = 4;
    let lab = Lab::new()?;
    let (_backend, backend) = common::demo_backend(lab.dir.path())?;
    let base = listeners(&lab)?;
    let ls: Vec<(&str, String, PathBuf, String)> = base
        .into_iter()
        .map(|(n, k, c)| {
            (
                n,
                k,
                c,
                format!("ticket_rotation_secs = 1\nlifetime_secs = {LIFETIME}\ncache_size = 0"),
            )
        })
        .collect();
    let cfg = write_config(&lab, "chain.toml", &backend, &ls)?;
    let _s = Serve::start(&lab, &cfg)?;
    let p = ports(&cfg)?;
    let mut cases = Vec::new();
    for (name, _, _, _) in &ls {
        let port = port_of(&p, name)?;
        // Frozen clock: the client keeps offering what it holds; the server decides.
        let c = client(&lab, &rustls::version::TLS12, true)?;
        let start = unix_now();
        assert_eq!(connect(&c, port)?, HandshakeKind::Full, "{name}");
        cases.push((*name, port, c, start));
    }
    for (name, port, c, start) in &cases {
        sleep_until(start + 2.0);
        let sessions = c.store.tls12_sessions.load(Ordering::Relaxed);
        assert_eq!(connect(c, *port)?, HandshakeKind::Resumed, "{name}");
        assert!(
            c.store.tls12_sessions.load(Ordering::Relaxed) > sessions,
            "{name}: the resumption brought a new ticket"
        );
    }
    for (name, port, c, start) in &cases {
        // The new ticket is about 2 s old, the session more than its lifetime.
        sleep_until(start + LIFETIME as f64 + 1.2);
        assert_eq!(
            connect(c, *port)?,
            HandshakeKind::Full,
            "{name}: a ticket re-issued on resumption ends with the session's first lifetime"
        );
    }
    Ok(())
}
