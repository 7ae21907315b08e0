//! Backend pools through the real binary with real clients: three named demo backends, curl
//! (HTTP/2 and HTTP/1.1), openssl s_client (ALPN and SNI alerts), `tlsgate ctl backends`, a
//! client loop while a backend is killed and started again, and reloads (one valid, one not).
//! Both io drivers.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{check, drivers, tlsgate, ChildGuard, Lab, Serve};

/// A demo backend named `name` on `listen`; returns it and its address.
fn backend(dir: &Path, name: &str, listen: &str) -> Result<(ChildGuard, String)> {
    common::demo_backend_named(dir, Some(name), listen)
}

fn config(lab: &Lab, io: &str, b: &[String; 3], key: &Path, chain: &Path) -> String {
    format!(
        r#"
[dataplane]
cores = [0]
io = "{io}"

[api]
socket = "{socket}"

[metrics]
listen = "127.0.0.1:0"

[state]
dir = "{state}"

[[backend]]
name = "web"
servers = [{{ address = "{b0}" }}, {{ address = "{b1}" }}, {{ address = "{b2}" }}]
alpn = ["h2", "http/1.1"]
retries = 2
eject_after = 2
eject_backoff_ms = 60000
[backend.health_check]
kind = "http"
path = "/health"
interval_ms = 100
timeout_ms = 500
rise = 3
fall = 2

[[backend]]
name = "sticky"
servers = [{{ address = "{b0}" }}, {{ address = "{b1}" }}, {{ address = "{b2}" }}]
alpn = ["http/1.1"]
balance = "consistent_hash"

[[backend]]
name = "plain"
servers = [{{ address = "{b2}" }}]

[[listener]]
name = "edge"
bind = "127.0.0.1:0"
default_backend = "web"
[[listener.route]]
sni = "sticky.localhost"
backend = "sticky"
[[listener.route]]
sni = "*.wild.localhost"
backend = "plain"
[[listener.certificate]]
chain = "{chain}"
key = "file:{key}"

[[listener]]
name = "strict"
bind = "127.0.0.1:0"
[[listener.route]]
sni = "api.localhost"
backend = "sticky"
[[listener.certificate]]
chain = "{chain}"
key = "file:{key}"
"#,
        socket = lab.p("api.sock"),
        state = lab.p("state"),
        b0 = b[0],
        b1 = b[1],
        b2 = b[2],
        chain = chain.display(),
        key = key.display(),
    )
}

/// curl to `name` (resolved to 127.0.0.1) on `port`: (HTTP version, x-backend).
fn curl(lab: &Lab, port: u16, name: &str, extra: &[&str]) -> Result<(String, String)> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-i",
            "--max-time",
            "10",
            "--cacert",
            &lab.p("ca/root.pem"),
        ])
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .args(extra)
        .arg(format!("https://{name}:{port}/"))
        .output()?;
    let text = check(out, &format!("curl {name}"))?;
    let version = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let backend = text
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .context("x-backend header")?
        .trim()
        .to_owned();
    Ok((version, backend))
}

/// openssl s_client's output (stdout + stderr) for `name` with `extra`.
fn s_client(port: u16, name: &str, extra: &[&str]) -> Result<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", name])
        .args(extra)
        .stdin(Stdio::null())
        .output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn ctl(lab: &Lab, args: &[&str]) -> Result<String> {
    check(
        tlsgate()
            .args(["ctl", "--socket", &lab.p("api.sock")])
            .args(args)
            .output()?,
        &format!("ctl {args:?}"),
    )
}

/// (state, health, active) of `server` in `pool` from `ctl --json backends list`.
fn server_state(lab: &Lab, pool: &str, server: &str) -> Result<(String, String, u64)> {
    let v: serde_json::Value = serde_json::from_str(&ctl(lab, &["--json", "backends", "list"])?)?;
    let items = v["items"].as_array().context("items")?;
    let p = items
        .iter()
        .find(|p| p["name"] == pool)
        .context("pool listed")?;
    let s = p["servers"]
        .as_array()
        .context("servers")?
        .iter()
        .find(|s| s["address"] == server)
        .context("server listed")?;
    Ok((
        s["state"].as_str().unwrap_or_default().to_owned(),
        s["health"].as_str().unwrap_or_default().to_owned(),
        s["active"].as_u64().unwrap_or_default(),
    ))
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<Instant> {
    let end = Instant::now() + limit;
    loop {
        if f()? {
            return Ok(Instant::now());
        }
        ensure!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request over a fresh TLS connection: the backend's name, or why it failed.
fn one_request(port: u16, tls: &Arc<rustls::ClientConfig>) -> Result<String, String> {
    let sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(tls.clone(), name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .map(|b| b.trim().to_owned())
        .ok_or_else(|| format!("no answer ({} bytes)", answer.len()))
}

fn client_config(lab: &Lab) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(lab.path("ca/root.pem"))? {
        roots.add(c?)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    ))
}

type Log = Arc<Mutex<Vec<(Instant, Result<String, String>)>>>;

/// Two client threads at about 100 connections/s each until `stop`.
fn load(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    stop: Arc<AtomicBool>,
) -> (Log, Vec<std::thread::JoinHandle<()>>) {
    let log: Log = Arc::default();
    let threads = (0..2)
        .map(|_| {
            let (log, tls, stop) = (log.clone(), tls.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let started = Instant::now();
                    let r = one_request(port, &tls);
                    log.lock().expect("log").push((started, r));
                    if let Some(rest) = Duration::from_millis(10).checked_sub(started.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
            })
        })
        .collect();
    (log, threads)
}

fn ports(config: &Path) -> Result<(u16, u16)> {
    let text = std::fs::read_to_string(config.with_extension("ready"))?;
    let port = |name: &str| -> Result<u16> {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .context("listener")?;
        Ok(line.rsplit(':').next().context("port")?.trim().parse()?)
    };
    Ok((port("edge")?, port("strict")?))
}

#[test]
fn pools_route_by_sni_and_alpn_balance_and_survive_a_dead_backend() -> Result<()> {
    if !common::require("curl", "curl") || !common::require("openssl", "openssl") {
        return Ok(());
    }
    for io in drivers() {
        run(io).with_context(|| format!("io = {io}"))?;
    }
    Ok(())
}

fn run(io: &str) -> Result<()> {
    let lab = Lab::new()?;
    let (key, chain) = lab.software_cert(
        "EC",
        "edge",
        "localhost",
        "DNS:localhost,DNS:sticky.localhost,DNS:api.localhost,DNS:other.localhost,DNS:*.wild.localhost",
    )?;
    let mut guards = Vec::new();
    let mut addrs = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let (g, a) = backend(lab.dir.path(), name, "127.0.0.1:0")?;
        guards.push(g);
        addrs.push(a);
    }
    let b: [String; 3] = [addrs[0].clone(), addrs[1].clone(), addrs[2].clone()];
    let path = lab.path("pools.toml");
    std::fs::write(&path, config(&lab, io, &b, &key, &chain))?;
    let serve = Serve::start(&lab, &path)?;
    let (edge, strict) = ports(&path)?;

    // ALPN: h2 end to end through a pool that speaks it; http/1.1 where the pool does not.
    let (v, who) = curl(&lab, edge, "localhost", &["--http2"])?;
    ensure!(v == "HTTP/2", "web pool speaks h2: {v}");
    ensure!(["alpha", "beta", "gamma"].contains(&who.as_str()));
    let (v, _) = curl(&lab, edge, "sticky.localhost", &["--http2"])?;
    ensure!(v == "HTTP/1.1", "sticky pool speaks only http/1.1: {v}");
    let (v, who) = curl(&lab, edge, "x.wild.localhost", &["--http2"])?;
    ensure!(
        v == "HTTP/1.1" && who == "gamma",
        "wildcard route to the plain pool: {v} {who}"
    );
    let out = s_client(edge, "localhost", &["-alpn", "foo"])?;
    ensure!(
        out.contains("no application protocol"),
        "the alert for -alpn foo:\n{out}"
    );

    // SNI: an unknown name takes the default pool on `edge`; `strict` has none and says so.
    let (_, who) = curl(&lab, edge, "other.localhost", &[])?;
    ensure!(["alpha", "beta", "gamma"].contains(&who.as_str()));
    curl(&lab, strict, "api.localhost", &[])?;
    let out = s_client(strict, "other.localhost", &[])?;
    ensure!(
        out.contains("unrecognized name"),
        "strict listener, unknown name:\n{out}"
    );

    // Round robin over three equal servers: 60 connections, 20 each (exact: nothing else uses
    // the pool; a tolerance of 3 for the requests above).
    let tls = client_config(&lab)?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..60 {
        let who = one_request(edge, &tls).map_err(anyhow::Error::msg)?;
        *counts.entry(who).or_default() += 1;
    }
    ensure!(
        counts.len() == 3 && counts.values().all(|&n| (17..=23).contains(&n)),
        "round robin spread: {counts:?}"
    );
    // Consistent hashing: this client stays on one server.
    let sticky: Vec<String> = (0..10)
        .map(|_| curl(&lab, edge, "sticky.localhost", &[]).map(|r| r.1))
        .collect::<Result<_>>()?;
    ensure!(sticky.iter().all(|s| *s == sticky[0]), "sticky: {sticky:?}");

    // Kill beta under steady load; after detection no client connection fails.
    let stop = Arc::new(AtomicBool::new(false));
    let load_started = Instant::now();
    let (log, threads) = load(edge, tls.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    let _ = guards[1].child.kill();
    let _ = guards[1].child.wait();
    let detected = wait_for("beta down", Duration::from_secs(10), || {
        Ok(server_state(&lab, "web", &b[1])?.1 != "up")
    })?;
    std::thread::sleep(Duration::from_millis(1500));
    // Start it again on the same address: back after `rise` checks.
    let (g, _) = backend(lab.dir.path(), "beta", &b[1])?;
    guards[1] = g;
    let back = wait_for("beta up", Duration::from_secs(10), || {
        Ok(server_state(&lab, "web", &b[1])?.1 == "up")
    })?;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, SeqCst);
    for t in threads {
        let _ = t.join();
    }
    let load_time = load_started.elapsed();
    let log = log.lock().expect("log");
    let failed: Vec<_> = log.iter().filter(|(_, r)| r.is_err()).collect();
    // Only a connection already on beta when it died may fail (its request was in flight):
    // every connection started after the kill is served, by retry before detection and by
    // routing around beta after it.
    let in_flight = |t: &Instant| *t <= killed_at;
    let unexpected: Vec<_> = failed.iter().filter(|(t, _)| !in_flight(t)).collect();
    let rate = log.len() as f64 / load_time.as_secs_f64();
    eprintln!(
        "io={io}: {} connections (~{rate:.0}/s), {} failed, detection after {:?}, back after {:?}, spread {counts:?}",
        log.len(),
        failed.len(),
        detected - killed_at,
        back - killed_at,
    );
    ensure!(unexpected.is_empty(), "failed: {unexpected:?}");

    ensure!(log.len() > 100, "the loop ran ({} connections)", log.len());
    let beta_after = log
        .iter()
        .filter(|(t, r)| *t > back && r.as_deref() == Ok("beta"))
        .count();
    let beta_down = log
        .iter()
        .filter(|(t, r)| {
            *t > detected && *t < back - Duration::from_millis(400) && r.as_deref() == Ok("beta")
        })
        .count();
    ensure!(
        beta_down == 0 && beta_after > 0,
        "beta while down {beta_down}, after rise {beta_after}"
    );
    drop(log);

    // Metrics per pool, server and route (published about once a second).
    let ready = std::fs::read_to_string(path.with_extension("ready"))?;
    let metrics_addr = ready
        .lines()
        .find_map(|l| l.strip_prefix("metrics "))
        .context("metrics address")?
        .trim()
        .to_owned();
    let beta = format!("server=\"{}\"", b[1]);
    wait_for("pool metrics", Duration::from_secs(10), || {
        let out = Command::new("curl")
            .args(["-sS", &format!("http://{metrics_addr}/metrics")])
            .output()?;
        let m = String::from_utf8_lossy(&out.stdout);
        let v = |name: &str, labels: &[&str]| common::metric(&m, name, labels);
        Ok(v(
            "tlsgate_backend_connect_errors_total",
            &["pool=\"web\"", &beta, "reason=\"refused\""],
        ) >= 1.0
            && v("tlsgate_pool_retries_total", &["pool=\"web\""]) >= 1.0
            && v("tlsgate_backend_up", &["pool=\"web\"", &beta]) == 1.0
            && v(
                "tlsgate_backend_connect_duration_seconds_count",
                &["pool=\"web\""],
            ) >= 60.0
            && v(
                "tlsgate_route_hits_total",
                &["listener=\"edge\"", "route=\"sticky.localhost|*\""],
            ) >= 10.0
            && v(
                "tlsgate_connections_closed_total",
                &["reason=\"no_application_protocol\""],
            ) >= 1.0)
    })?;

    // Drain via ctl: the open connection finishes on its server; new ones go elsewhere.
    let first = sticky[0].clone();
    let i = ["alpha", "beta", "gamma"]
        .iter()
        .position(|n| *n == first)
        .context("a known name")?;
    let first_addr = b[i].clone();
    let mut open = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{edge}"),
        ])
        .args(["-servername", "sticky.localhost"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut open_in = open.stdin.take().context("stdin")?;
    open_in.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")?;
    wait_for(
        "the open connection counted",
        Duration::from_secs(10),
        || Ok(server_state(&lab, "sticky", &first_addr)?.2 == 1),
    )?;
    let said = ctl(
        &lab,
        &["backends", "set-state", "sticky", &first_addr, "drain"],
    )?;
    ensure!(said.contains("drain"), "{said}");
    let (_, now) = curl(&lab, edge, "sticky.localhost", &[])?;
    ensure!(
        now != first,
        "a drained server gets no new connection ({now})"
    );

    // A valid reload keeps the drain; an invalid one changes nothing.
    let reloads = || -> Result<usize> {
        let audit = std::fs::read_to_string(lab.path("state/audit.log")).unwrap_or_default();
        Ok(audit.lines().filter(|l| l.contains("\"reload\"")).count())
    };
    let before = reloads()?;
    serve.signal("HUP")?;
    wait_for("the reload's audit line", Duration::from_secs(20), || {
        Ok(reloads()? > before)
    })?;
    ensure!(
        server_state(&lab, "sticky", &first_addr)?.0 == "drain",
        "drain kept across a reload"
    );
    let good = std::fs::read_to_string(&path)?;
    std::fs::write(
        &path,
        good.replace("backend = \"plain\"", "backend = \"nowhere\""),
    )?;
    let before = reloads()?;
    serve.signal("HUP")?;
    wait_for(
        "the bad reload's audit line",
        Duration::from_secs(20),
        || Ok(reloads()? > before),
    )?;
    let (_, who) = curl(&lab, edge, "x.wild.localhost", &[])?;
    ensure!(who == "gamma", "the running routes stay after a bad reload");
    ensure!(
        server_state(&lab, "sticky", &first_addr)?.0 == "drain",
        "the bad reload changed nothing"
    );
    std::fs::write(&path, good)?;

    open_in.write_all(b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    drop(open_in);
    let mut text = String::new();
    open.stdout
        .take()
        .context("stdout")?
        .read_to_string(&mut text)?;
    let _ = open.wait();
    ensure!(
        text.matches(&format!("x-backend: {first}")).count() == 2 && text.contains("GET /two"),
        "the open connection finished on its drained server:\n{text}"
    );
    ctl(
        &lab,
        &["backends", "set-state", "sticky", &first_addr, "maint"],
    )?;
    let listed = ctl(&lab, &["backends", "list"])?;
    ensure!(listed.contains("state=maint"), "{listed}");
    let audit = std::fs::read_to_string(lab.path("state/audit.log")).unwrap_or_default();
    ensure!(audit.contains("backend.set_state"), "set-state is audited");
    drop(serve);
    Ok(())
}

/// The access log (target `tlsgate_access`) names the route's pool, the server and the
/// negotiated protocol, and says `no_healthy_backend` when no server can take a connection.
#[test]
fn the_access_log_names_pool_server_and_protocol() -> Result<()> {
    if !common::require("curl", "curl") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let (key, chain) = lab.software_key_with_chain("EC", "edge")?;
    let (_g, addr) = backend(lab.dir.path(), "alpha", "127.0.0.1:0")?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let path = lab.path("access.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[dataplane]
cores = [0]

[[backend]]
name = "web"
servers = [{{ address = "{addr}" }}]
alpn = ["h2", "http/1.1"]

[[backend]]
name = "gone"
servers = [{{ address = "{dead}" }}]
eject_after = 1

[[listener]]
name = "edge"
bind = "127.0.0.1:0"
default_backend = "gone"
[[listener.route]]
sni = "localhost"
alpn = "h2"
backend = "web"
[[listener.certificate]]
chain = "{chain}"
key = "file:{key}"
"#,
            chain = chain.display(),
            key = key.display()
        ),
    )?;
    let mut serve = Serve::start_with_env(
        &lab,
        &path,
        &[("TLSGATE_LOG", "info,tlsgate_access=debug".to_string())],
    )?;
    let (v, who) = curl(&lab, serve.port, "localhost", &["--http2"])?;
    ensure!(v == "HTTP/2" && who == "alpha", "{v} {who}");
    // Without h2 the default pool `gone` takes it: one refused connect ejects its only server.
    for _ in 0..2 {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "--http1.1",
                "--cacert",
                &lab.p("ca/root.pem"),
            ])
            .arg(format!("https://localhost:{}/", serve.port))
            .output()?;
        ensure!(!out.status.success(), "no server: the request fails");
    }
    serve.signal("TERM")?;
    let _ = serve.guard.child.wait();
    let mut log = String::new();
    serve
        .guard
        .child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut log)?;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tlsgate_access"))
        .collect();
    ensure!(
        lines.iter().any(|l| l.contains("pool=\"web\"")
            && l.contains(&format!("server={addr}"))
            && l.contains("alpn=h2")
            && l.contains("reason=\"done\"")),
        "an h2 line for web:\n{}",
        lines.join("\n")
    );
    ensure!(
        lines.iter().any(|l| l.contains("pool=\"gone\"")
            && l.contains("alpn=-")
            && l.contains("reason=\"backend_connect_failed\"")),
        "the refused connect:\n{}",
        lines.join("\n")
    );
    ensure!(
        lines
            .iter()
            .any(|l| l.contains("pool=\"gone\"") && l.contains("reason=\"no_healthy_backend\"")),
        "no_healthy_backend once ejected:\n{}",
        lines.join("\n")
    );
    Ok(())
}
