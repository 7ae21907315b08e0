//! `tlsgate serve` under a service manager's readiness protocol, read from a fake
//! `NOTIFY_SOCKET` (a unix datagram socket this test owns): `READY=1` arrives only once the data
//! plane listens (a client is served the moment it arrives), `WATCHDOG=1` keeps coming while the
//! cores make progress, SIGHUP is framed by `RELOADING=1` and `READY=1`, SIGTERM sends
//! `STOPPING=1`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{check, curl, demo_backend, ChildGuard, Lab};

/// Datagrams until one contains `want` (returned with what came before), or `timeout`.
fn until(sock: &UnixDatagram, want: &str, timeout: Duration) -> Result<Vec<String>> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while start.elapsed() < timeout {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == want);
                seen.push(msg);
                if done {
                    return Ok(seen);
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("no {want} within {timeout:?}; got {seen:?}")
}

#[test]
fn ready_after_listening_watchdog_reload_and_stop_are_notified() -> Result<()> {
    let lab = Lab::new()?;
    let (key, chain) = lab.software_key_with_chain("EC", "sw")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = lab.path("notify.toml");
    std::fs::write(
        &config,
        format!(
            "[dataplane]\ncores = [0]\n\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n[[listener.certificate]]\nchain = \"{}\"\nkey = \"file:{}\"\n",
            chain.display(),
            key.display()
        ),
    )?;
    let notify = lab.path("notify.sock");
    let sock = UnixDatagram::bind(&notify)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let ready_file = config.with_extension("ready");

    // WATCHDOG_PID must name the service's main pid: the shell exports its own and execs.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tlsgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready_file)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "2000000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    lab.env(&mut cmd);
    let mut guard = ChildGuard {
        child: cmd.spawn()?,
        name: "tlsgate serve",
    };

    // READY=1, and at that moment the listener serves a client.
    let before = until(&sock, "READY=1", Duration::from_secs(30))?;
    ensure!(
        before.len() == 1,
        "something came before READY=1: {before:?}"
    );
    let port: u16 = std::fs::read_to_string(&ready_file)
        .context("the ready file exists when READY=1 arrives")?
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .context("listener address")?
        .parse()?;
    let body = check(curl(&lab, port, "/ready", &[])?, "curl right after READY=1")?;
    ensure!(!body.is_empty());

    // The watchdog: systemd's 2 s interval means a WATCHDOG=1 about every second.
    let start = Instant::now();
    for _ in 0..3 {
        until(&sock, "WATCHDOG=1", Duration::from_secs(5))?;
    }
    ensure!(
        start.elapsed() >= Duration::from_millis(1500),
        "three watchdog pets came too fast to be paced at half the interval: {:?}",
        start.elapsed()
    );

    // SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
    let pid = guard.child.id().to_string();
    check(
        Command::new("kill").args(["-HUP", &pid]).output()?,
        "kill -HUP",
    )?;
    let reload = until(&sock, "RELOADING=1", Duration::from_secs(10))?;
    ensure!(
        reload
            .last()
            .is_some_and(|m| m.lines().any(|l| l.starts_with("MONOTONIC_USEC="))),
        "{reload:?}"
    );
    until(&sock, "READY=1", Duration::from_secs(10))?;
    check(curl(&lab, port, "/after-reload", &[])?, "curl after reload")?;

    // SIGTERM: STOPPING=1, then a clean exit.
    check(
        Command::new("kill").args(["-TERM", &pid]).output()?,
        "kill -TERM",
    )?;
    until(&sock, "STOPPING=1", Duration::from_secs(10))?;
    let status = guard.child.wait()?;
    ensure!(status.success(), "exit status {status}");
    Ok(())
}
