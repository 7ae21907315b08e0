//! A session resumes only under the client authentication it was made under, through the real
//! binary and `openssl s_client -sess_out/-sess_in`: for every kind of session (a TLS 1.3
//! ticket, a TLS 1.2 ticket, a TLS 1.2 session id, a fleet ticket taken to a second appliance
//! and to a restarted one) and every change an operator makes to a listener's client auth
//! (none → required, optional without a certificate → required, a CA removed, a certificate
//! revoked by a new CRL), the old session's request never reaches the backend, each refusal is
//! counted once by reason and logged, and a client with a valid certificate still gets a session
//! and resumes it (where only a CRL changed, its session from before the change resumes too).
//!
//! Two appliances share a fleet ticket secret on one SoftHSM2 token: P2 is reloaded (SIGHUP)
//! for every change and carries the local sessions; P1 issues the fleet tickets and is
//! restarted with the new configuration, so a fleet ticket is tried across appliances (on P2)
//! and across a restart (on P1).

mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::policy_support::{eventually, http_get, lab_cert, log_lines, Zone};
use common::{uri, Lab, Serve};

const BODY: &str = "hello from the tlsgate demo backend";
const SECRET: &str = "pkcs11:token=lab;object=tickets;type=secret-key";

/// One change of a listener's client authentication.
struct Change {
    name: &'static str,
    /// `[listener.client_auth]` (empty: none) before and after.
    before: String,
    after: String,
    /// The client (`<zone>-<cn>`) that holds the old session; `None`: no certificate.
    holder: Option<&'static str>,
    /// The `reason` label the refusals are counted under.
    reason: &'static str,
}

fn client_auth(mode: &str, ca: &Path, crls: &[&Path]) -> String {
    let crls: Vec<String> = crls
        .iter()
        .map(|c| format!("\"{}\"", c.display()))
        .collect();
    format!(
        "[listener.client_auth]\nmode = \"{mode}\"\nca = \"{}\"\ncrls = [{}]\n",
        ca.display(),
        crls.join(", ")
    )
}

struct Setup {
    lab: Lab,
    backend: String,
    _backend: common::ChildGuard,
    sw: (PathBuf, PathBuf),
    tok: PathBuf,
    zones: PathBuf,
}

impl Setup {
    /// P1/P2 configuration: listeners `local` (local tickets + cache), `ids` (cache only: TLS
    /// 1.2 session ids) on a software key, `fleet` (fleet tickets) on a token key, all with the
    /// same client auth.
    fn write(&self, file: &str, auth: &str, io: &str) -> Result<PathBuf> {
        let mut toml = format!(
            "[pkcs11]\ntoken = \"lab\"\npin = \"file:{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
             [dataplane]\ncores = [0]\nio = \"{io}\"\n",
            self.lab.p("token/user.pin")
        );
        let sw = format!("file:{}", self.sw.0.display());
        let listeners = [
            ("local", &sw, &self.sw.1, ""),
            ("ids", &sw, &self.sw.1, "tickets = false\n"),
            (
                "fleet",
                &uri("tok"),
                &self.tok,
                &*format!("fleet_secret = \"{SECRET}\"\n"),
            ),
        ];
        for (name, key, chain, session) in listeners {
            write!(
                toml,
                "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nbackend = \"{}\"\n\
                 [listener.session]\n{session}\
                 [[listener.certificate]]\nchain = \"{}\"\nkey = \"{key}\"\n{auth}",
                self.backend,
                chain.display()
            )?;
        }
        let path = self.lab.path(file);
        std::fs::write(&path, toml)?;
        Ok(path)
    }

    /// `openssl s_client` arguments for a client certificate, if any.
    fn cert_args(&self, client: Option<&str>) -> Vec<String> {
        match client {
            None => Vec::new(),
            Some(c) => vec![
                "-cert".into(),
                self.zones.join(format!("{c}.pem")).display().to_string(),
                "-key".into(),
                self.zones.join(format!("{c}.key")).display().to_string(),
            ],
        }
    }
}

/// What one `s_client` connection did.
struct Outcome {
    reached_backend: bool,
    reused: bool,
    text: String,
}

/// One request through `openssl s_client` (`-ign_eof`: it reads until the appliance closes, so
/// TLS 1.3 tickets sent after the handshake are in a saved session).
fn s_client(
    s: &Setup,
    port: u16,
    version: &str,
    client: Option<&str>,
    sess: (&str, &Path),
) -> Result<Outcome> {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args([
            "-servername",
            "localhost",
            "-CAfile",
            &s.lab.p("ca/root.pem"),
        ])
        .args([version, "-verify_return_error", "-ign_eof"])
        .args(s.cert_args(client))
        .arg(sess.0)
        .arg(sess.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"GET /resume HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok(Outcome {
        reached_backend: text.contains(BODY),
        reused: text.contains("\nReused, TLS"),
        text,
    })
}

/// A full handshake whose session is saved to `sess`; it must reach the backend.
fn new_session(
    s: &Setup,
    port: u16,
    version: &str,
    client: Option<&str>,
    sess: &Path,
    what: &str,
) -> Result<Outcome> {
    let o = s_client(s, port, version, client, ("-sess_out", sess))?;
    ensure!(
        o.reached_backend && o.text.contains("\nNew, TLS"),
        "{what}: no full handshake through to the backend:\n{}",
        o.text
    );
    Ok(o)
}

/// Resumes the session in `sess`; it must resume and reach the backend.
fn resumes(
    s: &Setup,
    port: u16,
    version: &str,
    client: Option<&str>,
    sess: &Path,
    what: &str,
) -> Result<()> {
    let o = s_client(s, port, version, client, ("-sess_in", sess))?;
    ensure!(
        o.reached_backend && o.reused,
        "{what}: did not resume through to the backend:\n{}",
        o.text
    );
    Ok(())
}

/// Offers the session in `sess`; its request must not reach the backend. With `fallback`, the
/// server must also have declined the session (a full handshake under the current policy).
fn refused(
    s: &Setup,
    port: u16,
    version: &str,
    client: Option<&str>,
    sess: &Path,
    fallback: bool,
    what: &str,
) -> Result<()> {
    let o = s_client(s, port, version, client, ("-sess_in", sess))?;
    ensure!(
        !o.reached_backend,
        "{what}: the old session's request reached the backend:\n{}",
        o.text
    );
    ensure!(
        !fallback || !o.reused,
        "{what}: the old session was resumed (expected a full handshake):\n{}",
        o.text
    );
    Ok(())
}

fn ports(config: &Path) -> Result<(Vec<(String, u16)>, String)> {
    let text = std::fs::read_to_string(config.with_extension("ready"))?;
    let mut listeners = Vec::new();
    let mut metrics = String::new();
    for l in text.lines() {
        let (name, addr) = l.split_once(' ').context("ready line")?;
        if name == "metrics" {
            metrics = addr.to_owned();
        } else {
            let port = addr.rsplit(':').next().context("port")?.parse()?;
            listeners.push((name.to_owned(), port));
        }
    }
    Ok((listeners, metrics))
}

fn port(ports: &[(String, u16)], name: &str) -> Result<u16> {
    ports
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| *p)
        .with_context(|| format!("no listener {name}"))
}

/// `tlsgate_resumption_refused_total` for a listener and reason, once it reaches `want`
/// (or the last value seen, after 10 s).
fn refusals(metrics: &str, listener: &str, reason: &str, want: f64) -> Result<f64> {
    let mut seen = 0.0;
    let (l, r) = (
        format!("listener=\"{listener}\""),
        format!("reason=\"{reason}\""),
    );
    eventually(Duration::from_secs(10), || {
        let text = http_get(metrics, "/metrics")?;
        seen = text
            .lines()
            .filter(|x| x.starts_with("tlsgate_resumption_refused_total{"))
            .filter(|x| x.contains(&l) && x.contains(&r))
            .filter_map(|x| x.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Ok(seen >= want)
    })?;
    Ok(seen)
}

/// A server's log lines, all kept.
struct Logs {
    rx: Receiver<String>,
    kept: Vec<String>,
}

impl Logs {
    fn of(p: &mut Serve) -> Result<Logs> {
        Ok(Logs {
            rx: log_lines(p)?,
            kept: Vec::new(),
        })
    }

    /// Waits for a line with every one of `needles` among those from the `since`-th on.
    fn wait(&mut self, needles: &[&str], since: usize) -> Result<()> {
        let matches = |l: &str| needles.iter().all(|n| l.contains(n));
        if self.kept.iter().skip(since).any(|l| matches(l)) {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .rx
                .recv_timeout(left)
                .with_context(|| format!("no log line with {needles:?} in 20 s"))?;
            let found = matches(&line);
            self.kept.push(line);
            if found {
                return Ok(());
            }
        }
    }

    /// SIGHUP, then waits for this reload's "reloaded" line.
    fn reload(&mut self, p: &Serve) -> Result<()> {
        let since = self.kept.len();
        p.signal("HUP")?;
        self.wait(&["reloaded"], since)
    }
}

/// Whether the change alters the recorded policy (mode or CAs), not only the CRLs.
fn policy_changes(c: &Change) -> bool {
    c.reason == "policy_changed"
}

/// `uring` when the kernel allows io_uring, else `portable`.
fn uring_or_portable() -> &'static str {
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(v) if v.trim() != "0" => "portable",
        _ => "uring",
    }
}

#[test]
fn an_old_session_never_outlives_a_stricter_client_auth_policy() -> Result<()> {
    let lab = Lab::new()?;
    let out = lab.run(&[
        "token",
        "generate",
        "--type",
        "ticket-secret",
        "--label",
        "tickets",
    ])?;
    ensure!(out.contains("type=secret-key"), "{out}");
    let sw = lab_cert(&lab, "EC", "server", "localhost", &["localhost"])?;
    let tok = lab.token_key_with_chain("ec-p256", "tok")?;
    let zones = lab.path("zones");
    std::fs::create_dir_all(&zones)?;
    let mut a = Zone::new(&zones, "zone-a")?;
    let mut b = Zone::new(&zones, "zone-b")?;
    a.client("alice")?;
    a.client("carol")?;
    b.client("bob")?;
    let (crl_a, crl_a_revoking, crl_b) = (
        zones.join("a.crl.pem"),
        zones.join("a-revoking.crl.pem"),
        zones.join("b.crl.pem"),
    );
    a.write_crl(&crl_a, 1, &[])?;
    a.write_crl(&crl_a_revoking, 2, &["carol"])?;
    b.write_crl(&crl_b, 1, &[])?;
    let both = zones.join("a-and-b.pem");
    std::fs::write(
        &both,
        std::fs::read_to_string(a.ca_path())? + &std::fs::read_to_string(b.ca_path())?,
    )?;
    let (backend_guard, backend) = common::demo_backend(lab.dir.path())?;
    let s = Setup {
        lab,
        backend,
        _backend: backend_guard,
        sw,
        tok,
        zones,
    };

    let required_a = client_auth("required", &a.ca_path(), &[&crl_a]);
    let changes = [
        Change {
            name: "none -> required",
            before: String::new(),
            after: required_a.clone(),
            holder: None,
            reason: "policy_changed",
        },
        Change {
            name: "optional without a certificate -> required",
            before: client_auth("optional", &a.ca_path(), &[&crl_a]),
            after: required_a.clone(),
            holder: None,
            reason: "policy_changed",
        },
        Change {
            name: "CA of zone B removed",
            before: client_auth("required", &both, &[&crl_a, &crl_b]),
            after: required_a.clone(),
            holder: Some("zone-b-bob"),
            reason: "policy_changed",
        },
        Change {
            name: "carol revoked by a new CRL",
            before: required_a.clone(),
            after: client_auth("required", &a.ca_path(), &[&crl_a_revoking]),
            holder: Some("zone-a-carol"),
            reason: "client_certificate_rejected",
        },
    ];

    let p1_cfg = s.write("p1.toml", &changes[0].before, "portable")?;
    let p2_cfg = s.write("p2.toml", &changes[0].before, uring_or_portable())?;
    let mut p1 = Serve::start(&s.lab, &p1_cfg)?;
    let mut p1_logs = Logs::of(&mut p1)?;
    let mut p2 = Serve::start(&s.lab, &p2_cfg)?;
    let mut p2_logs = Logs::of(&mut p2)?;
    let (p2_ports, p2_metrics) = ports(&p2_cfg)?;
    let versions = [("TLS 1.3", "-tls1_3"), ("TLS 1.2", "-tls1_2")];
    // Refusals counted on P2 so far, by (listener, reason).
    let mut p2_count = std::collections::HashMap::<(&str, &str), f64>::new();

    for (i, c) in changes.iter().enumerate() {
        let sess = |what: &str| s.lab.path(&format!("{i}-{what}.sess"));
        if i > 0 {
            s.write("p1.toml", &c.before, "portable")?;
            s.write("p2.toml", &c.before, uring_or_portable())?;
            p1_logs.reload(&p1)?;
            p2_logs.reload(&p2)?;
        }
        let (p1_ports, _) = ports(&p1_cfg)?;

        // Sessions under the old policy, each shown to resume before the change.
        let mut held = Vec::new();
        for (vname, v) in versions {
            let kind = if v == "-tls1_3" { "13" } else { "12" };
            held.push((
                format!("{vname} ticket"),
                "local",
                v,
                sess(&format!("local{kind}")),
            ));
            held.push((
                format!("{vname} fleet ticket"),
                "fleet",
                v,
                sess(&format!("fleet{kind}")),
            ));
        }
        held.push(("TLS 1.2 session id".into(), "ids", "-tls1_2", sess("ids")));
        for (what, listener, v, file) in &held {
            let what = format!("{}: {what}", c.name);
            // Fleet tickets come from P1 and are shown to resume on P2.
            let (from, to) = if *listener == "fleet" {
                (port(&p1_ports, listener)?, port(&p2_ports, listener)?)
            } else {
                (port(&p2_ports, listener)?, port(&p2_ports, listener)?)
            };
            let o = new_session(&s, from, v, c.holder, file, &what)?;
            // TLS 1.2: a ticket where tickets are on, only a session id where they are off.
            if *v == "-tls1_2" {
                ensure!(
                    o.text.contains("TLS session ticket:") == (*listener != "ids"),
                    "{what}: wrong kind of session:\n{}",
                    o.text
                );
            }
            resumes(
                &s,
                to,
                v,
                c.holder,
                file,
                &format!("{what}, before the change"),
            )?;
            // Where only a CRL changes, the recorded policy stays: a certificate that is not
            // revoked keeps its session (kept in `<file>.alice`).
            if !policy_changes(c) {
                let alice = file.with_extension("alice");
                new_session(&s, from, v, Some("zone-a-alice"), &alice, &what)?;
            }
        }

        // The change: P2 reloads, P1 restarts with the new file.
        s.write("p1.toml", &c.after, "portable")?;
        s.write("p2.toml", &c.after, uring_or_portable())?;
        p2_logs.reload(&p2)?;
        drop(p1);
        p1 = Serve::start(&s.lab, &p1_cfg)?;
        p1_logs = Logs::of(&mut p1)?;
        let (p1_ports, p1_metrics) = ports(&p1_cfg)?;

        // A policy change is refused before resumption (full handshake, which then fails for
        // the old client); a revoked certificate is refused by the data plane's re-check.
        let fallback = policy_changes(c);
        for (what, listener, v, file) in &held {
            let what = format!("{}: {what}", c.name);
            if !fallback {
                let alice = file.with_extension("alice");
                let what = format!("{what}, alice's session from before the new CRL");
                resumes(
                    &s,
                    port(&p2_ports, listener)?,
                    v,
                    Some("zone-a-alice"),
                    &alice,
                    &what,
                )?;
                if *listener == "fleet" {
                    let what = format!("{what}, on a restarted appliance");
                    resumes(
                        &s,
                        port(&p1_ports, listener)?,
                        v,
                        Some("zone-a-alice"),
                        &alice,
                        &what,
                    )?;
                }
            }
            refused(
                &s,
                port(&p2_ports, listener)?,
                v,
                c.holder,
                file,
                fallback,
                &what,
            )?;
            *p2_count.entry((*listener, c.reason)).or_default() += 1.0;
            if *listener == "fleet" {
                refused(
                    &s,
                    port(&p1_ports, listener)?,
                    v,
                    c.holder,
                    file,
                    fallback,
                    &format!("{what}, on a restarted appliance"),
                )?;
            }
        }

        // A client with a valid certificate still gets a session and resumes it.
        for (what, listener, v, _) in &held {
            let what = format!("{}: {what}, alice after the change", c.name);
            let file = sess("alice");
            let (from, to) = if *listener == "fleet" {
                (port(&p1_ports, listener)?, port(&p2_ports, listener)?)
            } else {
                (port(&p2_ports, listener)?, port(&p2_ports, listener)?)
            };
            new_session(&s, from, v, Some("zone-a-alice"), &file, &what)?;
            resumes(&s, to, v, Some("zone-a-alice"), &file, &what)?;
        }

        // Every refusal counted once, by reason (P1 counts only since its restart).
        for listener in ["local", "ids", "fleet"] {
            let want = p2_count[&(listener, c.reason)];
            let seen = refusals(&p2_metrics, listener, c.reason, want)?;
            ensure!(
                seen == want,
                "{}: P2 counted {seen} refusals for {listener}/{}, wanted {want}",
                c.name,
                c.reason
            );
        }
        let seen = refusals(&p1_metrics, "fleet", c.reason, 2.0)?;
        ensure!(
            seen == 2.0,
            "{}: P1 counted {seen} fleet refusals, wanted 2",
            c.name
        );
    }
    // An info line per listener and reason (rate-limited), saying why.
    for listener in ["local", "ids", "fleet"] {
        for (reason, why) in [
            ("policy_changed", "made under another client-auth policy"),
            (
                "client_certificate_rejected",
                "its client certificate no longer passes",
            ),
        ] {
            let listener = format!("listener=\"{listener}\"");
            let reason = format!("reason=\"{reason}\"");
            p2_logs.wait(&["INFO", why, &listener, &reason], 0)?;
        }
    }
    Ok(())
}
