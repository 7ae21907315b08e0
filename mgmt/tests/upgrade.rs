//! Zero-downtime binary upgrade through the real binary, under load: `tlsgate upgrade` five times
//! in a row, alternating two copies of the binary (told apart by `/proc/PID/exe`) and the two io
//! drivers, while clients open new TLS connections (about 100 a second: two busy cores here) and
//! 50 long-lived streaming connections echo through a TCP backend across every upgrade. Proves:
//! no new connection refused, reset or failed; every stream completes; tickets issued by the
//! old process resume on the new one as well as they did on the old one; the old processes
//! exit once drained and leave the management socket to the new one; each new process tells the service manager (a fake `NOTIFY_SOCKET`)
//! `MAINPID=` and `READY=1`, and no process that handed over says `STOPPING=1`; a failed upgrade (wrong PIN: the HSM login fails; a broken file) leaves
//! the old process serving and the command exits non-zero with the new process's error.

mod common;
mod resumption_support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{check, fail, uri, ChildGuard, Lab};
use resumption_support::{client, Client};
use rustls::pki_types::ServerName;
use rustls::HandshakeKind;

const STREAMS: usize = 50;
const NEW_CONN_THREADS: usize = 2;
/// Per thread; two threads make about 100 new connections a second.
const NEW_CONN_PAUSE: Duration = Duration::from_millis(20);
const UPGRADES: usize = 5;
/// Sessions whose resumption is counted before and after each upgrade.
const SESSIONS: usize = 10;

/// A TCP backend that echoes every byte back (one thread per connection).
fn echo_backend() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// `cores` is `[0, 1]` or `[0]`: the first process makes two sockets, and the upgrades go from
/// two cores to one (which accepts on both sockets) and back (one socket each).
fn write_config(
    lab: &Lab,
    file: &str,
    io: &str,
    cores: &str,
    backend: &str,
    pin: &Path,
) -> Result<PathBuf> {
    write_config_at(lab, file, io, cores, backend, pin, "127.0.0.1:0", true)
}

#[allow(clippy::too_many_arguments)]
fn write_config_at(
    lab: &Lab,
    file: &str,
    io: &str,
    cores: &str,
    backend: &str,
    pin: &Path,
    bind: &str,
    state: bool,
) -> Result<PathBuf> {
    let state = if state {
        format!(
            "[state]\ndir = \"{}\"\n\n[api]\nsocket = \"{}\"\n",
            lab.p("state"),
            lab.p("api.sock")
        )
    } else {
        String::new()
    };
    let toml = format!(
        "[pkcs11]\ntoken = \"lab\"\npin = \"file:{}\"\n\n{state}\n\
         [dataplane]\ncores = {cores}\nio = \"{io}\"\n\n[dataplane.limits]\ndrain_timeout_ms = 60000\n\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"web\"\nbind = \"{bind}\"\nbackend = \"{backend}\"\n\
         [[listener.certificate]]\nchain = \"{}\"\nkey = \"{}\"\n",
        pin.display(),
        lab.p("certs/web.pem"),
        uri("web"),
    );
    let path = lab.path(file);
    std::fs::write(&path, toml)?;
    Ok(path)
}

/// The pid that holds the state directory (the lock file names it).
fn owner(lab: &Lab) -> Result<i32> {
    Ok(std::fs::read_to_string(lab.path("state/lock"))?
        .trim()
        .parse()?)
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

/// `tlsgate ctl certs list` over the management socket.
fn ctl_answers(lab: &Lab) -> Result<()> {
    check(
        lab.cmd(&["ctl", "--socket", &lab.p("api.sock"), "certs", "list"])
            .output()?,
        "ctl certs list",
    )?;
    Ok(())
}

/// The datagrams the fake service manager has received so far.
fn notifications(sock: &std::os::unix::net::UnixDatagram) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

/// Kills every process the test started outside a `ChildGuard` (the upgraded servers are
/// detached from the command that started them).
struct Reaper(Mutex<Vec<i32>>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.0.lock().clone() {
            if alive(pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

fn tls(c: &Client, port: u16) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).context("connect")?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let conn = rustls::ClientConnection::new(c.config.clone(), ServerName::try_from("localhost")?)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).context("handshake")?;
    }
    Ok(s)
}

/// One echo round trip of `msg`.
fn echo(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    msg: &[u8],
) -> Result<()> {
    s.write_all(msg).context("write")?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).context("read")?;
    ensure!(got == msg, "echo mismatch");
    Ok(())
}

/// A new connection: handshake, one echo, close. Returns how the handshake went.
fn one_connection(c: &Client, port: u16) -> Result<HandshakeKind> {
    let mut s = tls(c, port)?;
    echo(&mut s, b"ping\n")?;
    let kind = s.conn.handshake_kind().context("handshake kind")?;
    s.conn.send_close_notify();
    let _ = s.flush();
    Ok(kind)
}

/// `SESSIONS` clients, each with a full handshake behind it (TLS 1.3: two tickets each).
fn fresh_sessions(lab: &Lab, port: u16) -> Result<Vec<Client>> {
    (0..SESSIONS)
        .map(|_| {
            let c = client(lab, &rustls::version::TLS13, false)?;
            ensure!(
                one_connection(&c, port)? == HandshakeKind::Full,
                "first is full"
            );
            Ok(c)
        })
        .collect()
}

fn resumed(clients: &[Client], port: u16) -> Result<usize> {
    let mut n = 0;
    for c in clients {
        if one_connection(c, port)? == HandshakeKind::Resumed {
            n += 1;
        }
    }
    Ok(n)
}

/// Steady load on `port`: new connections (full handshakes, one echo each) and `STREAMS`
/// long-lived streams echoing a message every 100 ms until [`Load::finish`]; every failure is
/// recorded with what failed.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    made: Arc<AtomicUsize>,
    streams_done: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(lab: &Lab, port: u16) -> Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let made = Arc::new(AtomicUsize::new(0));
        let streams_done = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for t in 0..NEW_CONN_THREADS {
            let (stop, failures, made) = (stop.clone(), failures.clone(), made.clone());
            // Nothing to resume with: every connection is a full handshake.
            let mut c = client(lab, &rustls::version::TLS13, false)?;
            let mut config = (*c.config).clone();
            config.resumption = rustls::client::Resumption::disabled();
            c.config = Arc::new(config);
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match one_connection(&c, port) {
                        Ok(_) => {
                            made.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures
                            .lock()
                            .push(format!("new connection (thread {t}): {e:#}")),
                    }
                    std::thread::sleep(NEW_CONN_PAUSE);
                }
            }));
        }
        for i in 0..STREAMS {
            let (stop, failures, done) = (stop.clone(), failures.clone(), streams_done.clone());
            let c = client(lab, &rustls::version::TLS13, false)?;
            threads.push(std::thread::spawn(move || {
                let run = || -> Result<usize> {
                    let mut s = tls(&c, port)?;
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        echo(&mut s, format!("stream {i} message {n}\n").as_bytes())?;
                        n += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    echo(&mut s, b"last\n")?;
                    s.conn.send_close_notify();
                    s.flush()?;
                    Ok(n)
                };
                match run() {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().push(format!("stream {i}: {e:#}")),
                }
            }));
        }
        Ok(Load {
            stop,
            failures,
            made,
            streams_done,
            threads,
        })
    }

    /// Stops the load; returns the failures and how many streams completed.
    fn finish(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let failures = self.failures.lock().clone();
        (failures, self.streams_done.load(Ordering::Relaxed))
    }
}

fn upgrade(lab: &Lab, config: &Path, binary: &Path) -> Result<std::process::Output> {
    Ok(lab
        .cmd(&["upgrade", "--config"])
        .arg(config)
        .arg("--binary")
        .arg(binary)
        .arg("--ready-file")
        .arg(lab.path("upgraded.ready"))
        .arg("--log-file")
        .arg(lab.path("upgraded.log"))
        .env("NOTIFY_SOCKET", lab.path("notify.sock"))
        .stdin(Stdio::null())
        .output()?)
}

#[test]
fn five_upgrades_under_load_refuse_nothing_and_keep_streams_and_tickets() -> Result<()> {
    if !common::require("softhsm2-util", "softhsm2") {
        return Ok(());
    }
    let drivers = common::drivers();
    let lab = Lab::new()?;
    lab.token_key_with_chain("ec-p256", "web")?;
    let backend = echo_backend()?;
    let pin = lab.path("token/user.pin");
    let configs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let io = drivers[i % drivers.len()];
            let cores = ["[0, 1]", "[0]"][i];
            write_config(&lab, &format!("{io}-{i}.toml"), io, cores, &backend, &pin)
        })
        .collect::<Result<_>>()?;
    // Two binaries: copies of the same build, told apart by the path the process runs.
    let binaries: Vec<PathBuf> = ["tlsgate-a", "tlsgate-b"]
        .iter()
        .map(|n| {
            let p = lab.path(n);
            std::fs::copy(env!("CARGO_BIN_EXE_tlsgate"), &p)?;
            Ok(p)
        })
        .collect::<Result<_>>()?;

    // A fake service manager: the new process must say MAINPID= and READY=1; an old one that
    // handed over must never say STOPPING=1 (systemd would take the service as stopping).
    let notes = std::os::unix::net::UnixDatagram::bind(lab.path("notify.sock"))?;
    notes.set_nonblocking(true)?;
    let mut all_said = Vec::new();
    let ready = lab.path("first.ready");
    let log = std::fs::File::create(lab.path("first.log"))?;
    let mut cmd = Command::new(&binaries[0]);
    lab.env(&mut cmd);
    let first = cmd
        .env("NOTIFY_SOCKET", lab.path("notify.sock"))
        .args(["serve", "--config"])
        .arg(&configs[0])
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut first = ChildGuard {
        child: first,
        name: "tlsgate serve",
    };
    let text = common::wait_ready(&ready, &mut first, Duration::from_secs(30))?;
    let port: u16 = text
        .lines()
        .find(|l| l.starts_with("web "))
        .and_then(|l| l.rsplit(':').next())
        .context("web port")?
        .parse()?;
    let reaper = Reaper(Mutex::new(Vec::new()));

    let load = Load::start(&lab, port)?;
    let made = load.made.clone();
    std::thread::sleep(Duration::from_millis(1500));

    let mut old_pids = vec![first.child.id() as i32];
    let (mut before, mut after) = (0, 0);
    for round in 0..UPGRADES {
        let to = (round + 1) % 2;
        let sessions = fresh_sessions(&lab, port)?;
        before += resumed(&sessions, port)?;
        let made_before = made.load(Ordering::Relaxed);
        let out = upgrade(&lab, &configs[to], &binaries[to])?;
        let stdout = check(out, &format!("upgrade {}", round + 1)).with_context(|| {
            std::fs::read_to_string(lab.path("upgraded.log")).unwrap_or_default()
        })?;
        ensure!(
            stdout.contains("web 127.0.0.1:"),
            "ready file printed: {stdout}"
        );
        let new = owner(&lab)?;
        reaper.0.lock().push(new);
        ensure!(
            !old_pids.contains(&new),
            "upgrade {}: the lock still names an old process",
            round + 1
        );
        let said = notifications(&notes);
        all_said.extend(said.iter().cloned());
        ensure!(
            said.iter()
                .any(|m| m.contains(&format!("MAINPID={new}")) && m.contains("READY=1")),
            "upgrade {}: no MAINPID={new} with READY=1 in {said:?}",
            round + 1
        );
        ensure!(
            std::fs::read_link(format!("/proc/{new}/exe"))? == binaries[to],
            "upgrade {}: pid {new} does not run {}",
            round + 1,
            binaries[to].display()
        );
        ctl_answers(&lab).with_context(|| format!("upgrade {}: the API socket", round + 1))?;
        // The old process stops accepting once it acknowledged; tickets it issued must resume
        // on the new one.
        std::thread::sleep(Duration::from_millis(300));
        after += resumed(&sessions, port)?;
        std::thread::sleep(Duration::from_millis(700));
        ensure!(
            made.load(Ordering::Relaxed) > made_before,
            "upgrade {}: no new connection was made across it",
            round + 1
        );
        old_pids.push(new);
    }

    // A failed upgrade: the HSM login fails (a wrong PIN), then a file that does not parse.
    let wrong_pin = lab.path("wrong.pin");
    std::fs::write(&wrong_pin, "0000\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong_pin, std::fs::Permissions::from_mode(0o600))?;
    let bad_pin = write_config(
        &lab,
        "bad-pin.toml",
        drivers[0],
        "[0, 1]",
        &backend,
        &wrong_pin,
    )?;
    let broken = lab.path("broken.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&bad_pin)?.replace("[[listener]]", "[[listener"),
    )?;
    let serving = owner(&lab)?;
    for (config, want) in [(&bad_pin, "pin"), (&broken, "broken.toml")] {
        let made_before = made.load(Ordering::Relaxed);
        let out = upgrade(&lab, config, &binaries[0])?;
        let err = fail(out, "an upgrade to a broken configuration")?;
        ensure!(
            err.contains("before it was ready") && err.to_lowercase().contains(want),
            "the command names the new process's error ({want}): {err}"
        );
        ensure!(
            owner(&lab)? == serving && alive(serving),
            "the old process keeps the lock"
        );
        std::thread::sleep(Duration::from_millis(500));
        ensure!(made.load(Ordering::Relaxed) > made_before, "still serving");
    }

    let (failures, streams_done) = load.finish();
    ensure!(
        failures.is_empty(),
        "{} failures under load, first: {:?}",
        failures.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    ensure!(streams_done == STREAMS, "every stream completed");
    ensure!(
        before == UPGRADES * SESSIONS && after == before,
        "resumed before the upgrades {before}, after {after} (of {})",
        UPGRADES * SESSIONS
    );
    // Drained: every old process exits once its streams closed.
    let last = *old_pids.last().context("pids")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for &pid in &old_pids[..old_pids.len() - 1] {
        while alive(pid) && pid != first.child.id() as i32 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid == first.child.id() as i32 {
            let status = first.child.wait()?;
            ensure!(status.success(), "the first process exited {status}");
        }
        ensure!(
            !alive(pid),
            "old process {pid} still runs after its streams closed"
        );
    }
    ensure!(alive(last), "the last one serves");
    // The old processes are gone; the API socket path is the last one's (none unlinked it).
    ctl_answers(&lab).context("the API socket once the old processes exited")?;
    all_said.extend(notifications(&notes));
    let said = all_said;
    ensure!(
        !said.iter().any(|m| m.contains("STOPPING=1")),
        "a process that handed over said STOPPING=1: {said:?}"
    );
    eprintln!(
        "upgrades: {UPGRADES}, new connections: {}, streams: {STREAMS}, resumed before/after: {before}/{after}",
        made.load(Ordering::Relaxed)
    );
    Ok(())
}

/// The control experiment: the same load across a plain stop and start (SIGTERM, then a new
/// `tlsgate serve` on the same port) sees refused connections, so the zero above is the
/// handover's doing and not a load too light to notice a gap.
#[test]
fn a_stop_and_start_under_the_same_load_refuses_connections() -> Result<()> {
    if !common::require("softhsm2-util", "softhsm2") {
        return Ok(());
    }
    let lab = Lab::new()?;
    lab.token_key_with_chain("ec-p256", "web")?;
    let backend = echo_backend()?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let io = common::drivers()[0];
    let pin = lab.path("token/user.pin");
    let config = write_config_at(
        &lab,
        "plain.toml",
        io,
        "[0, 1]",
        &backend,
        &pin,
        &format!("127.0.0.1:{port}"),
        false,
    )?;
    let first = common::Serve::start(&lab, &config)?;
    let load = Load::start(&lab, port)?;
    std::thread::sleep(Duration::from_millis(1000));
    first.signal("TERM")?;
    // The old process drains its streams; a new one starts as soon as the port is free.
    let started = Instant::now();
    let second = loop {
        match common::Serve::start(&lab, &config) {
            Ok(s) => break s,
            Err(e) if started.elapsed() < Duration::from_secs(20) => {
                eprintln!("second start: {e:#}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    };
    std::thread::sleep(Duration::from_millis(1000));
    let (failures, streams_done) = load.finish();
    let refused = failures
        .iter()
        .filter(|f| f.starts_with("new connection"))
        .count();
    eprintln!("stop+start: {refused} new connections failed, {streams_done} of {STREAMS} streams completed");
    ensure!(
        refused > 0,
        "a stop and start refused nothing: the load cannot see a gap"
    );
    drop(second);
    Ok(())
}

/// A connection that outlives the drain: the old process keeps it working after the new one
/// took over, and closes it only at `drain_timeout`, then exits. Measured against the
/// configured timeout with wide margins on both sides: closed at the handover (no drain) fails
/// the lower bound, a drain that ignores its timeout the upper.
#[test]
fn a_stream_outliving_the_drain_is_closed_at_drain_timeout() -> Result<()> {
    if !common::require("softhsm2-util", "softhsm2") {
        return Ok(());
    }
    const DRAIN: Duration = Duration::from_millis(3000);
    let lab = Lab::new()?;
    lab.token_key_with_chain("ec-p256", "web")?;
    let backend = echo_backend()?;
    let pin = lab.path("token/user.pin");
    let io = common::drivers()[0];
    let config = write_config(&lab, "drain.toml", io, "[0, 1]", &backend, &pin)?;
    let text = std::fs::read_to_string(&config)?.replace(
        "drain_timeout_ms = 60000",
        &format!("drain_timeout_ms = {}", DRAIN.as_millis()),
    );
    std::fs::write(&config, text)?;
    let first = common::Serve::start(&lab, &config)?;
    let old = first.guard.child.id() as i32;
    let client = client(&lab, &rustls::version::TLS13, false)?;
    let mut stream = tls(&client, first.port)?;
    echo(&mut stream, b"before\n")?;

    let reaper = Reaper(Mutex::new(Vec::new()));
    let out = upgrade(&lab, &config, Path::new(env!("CARGO_BIN_EXE_tlsgate")))?;
    let handed_over = Instant::now();
    check(out, "upgrade")?;
    let new = owner(&lab)?;
    reaper.0.lock().push(new);
    ensure!(new != old, "the lock still names the old process");
    one_connection(&client, first.port).context("a new connection after the upgrade")?;

    // Echo every 100 ms until the old process closes the stream.
    let mut round_trips = 0;
    let closed_after = loop {
        match echo(&mut stream, b"still here\n") {
            Ok(()) => round_trips += 1,
            Err(_) => break handed_over.elapsed(),
        }
        ensure!(
            handed_over.elapsed() < DRAIN * 10,
            "the stream outlived the drain timeout tenfold"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("stream closed {closed_after:?} after the handover ({round_trips} round trips)");
    ensure!(
        closed_after >= DRAIN / 2 && round_trips > 0,
        "closed {closed_after:?} after the handover: before half the drain timeout {DRAIN:?}"
    );
    let exited = Instant::now();
    while alive(old) && exited.elapsed() < DRAIN * 3 {
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(!alive(old), "the old process did not exit after its drain");
    one_connection(&client, first.port).context("a new connection once the old one exited")?;
    drop(first);
    Ok(())
}
