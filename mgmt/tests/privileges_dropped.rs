//! Least privilege, seen from outside: started as root with `[process] user = "nobody"`, the
//! appliance binds, opens its state directory and logs in to the token, then every thread runs
//! as nobody with no capability (bounding set included) and `NoNewPrivs: 1`, and it still
//! serves handshakes signed by the token and reloads on SIGHUP. A start as root without a user
//! is refused unless `allow_root`; a state directory of another owner is refused.
//!
//! These tests need root (CI runs as root); elsewhere they print `SKIPPED: ... needs root`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{
    check, curl, demo_backend, drivers, tlsgate, uri, wait_ready, ChildGuard, Lab, ALLOW_ROOT_ENV,
};

/// Whether this test runs as root; a skip (a failure under `CI=true`) when not.
fn root() -> bool {
    if rustix_uid() == 0 {
        return true;
    }
    tlsgate_hw_tests::skip::missing("needs root (starts as root and drops to nobody)");
    false
}

fn rustix_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// A token key with its chain, the lab given to nobody:nogroup (the token's files, the PIN
/// file, the configuration and the ready file are read or written after the switch).
fn nobody_lab() -> Result<(Lab, PathBuf)> {
    let lab = Lab::new()?;
    let chain = lab.token_key_with_chain("ec-p256", "web")?;
    check(
        std::process::Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(lab.dir.path())
            .output()?,
        "chown",
    )?;
    Ok((lab, chain))
}

fn write_config(lab: &Lab, name: &str, io: &str, backend: &str, process: &str) -> Result<PathBuf> {
    let toml = format!(
        "[pkcs11]\ntoken = \"lab\"\npin = \"file:{pin}\"\n\n[process]\n{process}\n\n[state]\ndir = \"{state}\"\n\n\
         [dataplane]\ncores = [0]\nio = \"{io}\"\n\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\
         backend = \"{backend}\"\n[[listener.certificate]]\nchain = \"{chain}\"\nkey = \"{key}\"\n",
        pin = lab.p("token/user.pin"),
        state = lab.p("state"),
        chain = lab.p("certs/web.pem"),
        key = uri("web"),
    );
    let path = lab.path(name);
    std::fs::write(&path, toml)?;
    Ok(path)
}

/// `tlsgate serve` without `TLSGATE_ALLOW_ROOT` in its environment.
fn serve_cmd(lab: &Lab, config: &Path) -> std::process::Command {
    let mut cmd = tlsgate();
    lab.env(&mut cmd);
    cmd.env_remove(ALLOW_ROOT_ENV)
        .args(["serve", "--config"])
        .arg(config);
    cmd
}

fn start(lab: &Lab, config: &Path) -> Result<(ChildGuard, u16)> {
    let ready = config.with_extension("ready");
    let child = serve_cmd(lab, config)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut guard = ChildGuard {
        child,
        name: "tlsgate serve",
    };
    let lines = wait_ready(&ready, &mut guard, Duration::from_secs(30))?;
    let port = lines
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .context("ready file names a listener")?
        .parse()?;
    Ok((guard, port))
}

/// `key:` of a `/proc/.../status` text, its fields.
fn field<'a>(status: &'a str, key: &str) -> Vec<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default()
}

/// Every thread of `pid`: (thread name, status text).
fn tasks(pid: u32) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = t?.path();
        let status = std::fs::read_to_string(dir.join("status"))?;
        let name = field(&status, "Name:").join(" ");
        out.push((name, status));
    }
    Ok(out)
}

fn assert_dropped(pid: u32, caps: &str) -> Result<()> {
    let nobody = "65534";
    let all = tasks(pid)?;
    ensure!(all.len() > 1, "the data plane runs threads: {}", all.len());
    let mut main_seen = false;
    for (name, status) in &all {
        assert_eq!(field(status, "Uid:"), [nobody; 4], "{name}: Uid");
        assert_eq!(field(status, "Gid:"), [nobody; 4], "{name}: Gid");
        assert_eq!(field(status, "Groups:"), [nobody], "{name}: Groups");
        assert_eq!(field(status, "NoNewPrivs:"), ["1"], "{name}: NoNewPrivs");
        assert_eq!(field(status, "CapInh:"), ["0000000000000000"], "{name}");
        assert_eq!(field(status, "CapAmb:"), ["0000000000000000"], "{name}");
        if name == "tlsgate" {
            main_seen = true;
            // The management thread: CAP_NET_BIND_SERVICE (bit 10) only when asked for.
            assert_eq!(field(status, "CapEff:"), [caps], "{name}: CapEff");
            assert_eq!(field(status, "CapPrm:"), [caps], "{name}: CapPrm");
        } else {
            assert_eq!(field(status, "CapEff:"), ["0000000000000000"], "{name}");
            assert_eq!(field(status, "CapPrm:"), ["0000000000000000"], "{name}");
        }
        assert_eq!(field(status, "CapBnd:"), [caps], "{name}: CapBnd");
    }
    ensure!(
        main_seen,
        "no main thread among {:?}",
        all.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn started_as_root_every_thread_runs_as_nobody_without_capabilities_and_still_serves() -> Result<()>
{
    if !root() {
        return Ok(());
    }
    let (lab, chain) = nobody_lab()?;
    let (_backend, backend_addr) = demo_backend(lab.dir.path())?;
    for io in drivers() {
        let config = write_config(
            &lab,
            &format!("{io}.toml"),
            io,
            &backend_addr,
            "user = \"nobody\"\ngroup = \"nogroup\"",
        )?;
        let (mut serve, port) = start(&lab, &config)?;
        let pid = serve.child.id();
        assert_dropped(pid, "0000000000000000")?;
        // The state directory it made as root is nobody's now, lock file included.
        use std::os::unix::fs::MetadataExt;
        for p in ["state", "state/lock"] {
            assert_eq!(std::fs::metadata(lab.path(p))?.uid(), 65534, "{p}");
        }
        // A full handshake signed by the token key, through to the backend.
        let body = check(curl(&lab, port, &format!("/{io}"), &[])?, "curl")?;
        assert!(
            body.contains(&format!("GET /{io} HTTP/1.1")),
            "{io}: {body}"
        );
        // SIGHUP re-reads the configuration and the chain as nobody: a new chain is served.
        let before = serial(&lab, port)?;
        lab.run(&[
            "token",
            "issue-cert",
            "--key",
            &uri("web"),
            "--ca-dir",
            &lab.p("ca"),
            "--cn",
            "localhost",
            "--san",
            "localhost",
            "--out",
            &chain.display().to_string(),
        ])?;
        check(
            std::process::Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .output()?,
            "kill -HUP",
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while serial(&lab, port)? == before {
            ensure!(
                std::time::Instant::now() < deadline,
                "{io}: SIGHUP served no new chain"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let body = check(curl(&lab, port, "/after", &[])?, "curl after reload")?;
        assert!(body.contains("GET /after HTTP/1.1"), "{io}: {body}");
        assert_dropped(pid, "0000000000000000")?;
        let _ = serve.child.kill();
        let _ = serve.child.wait();
    }
    Ok(())
}

fn serial(lab: &Lab, port: u16) -> Result<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername localhost -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
            lab.p("ca/root.pem")
        ))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The ready file may lie where only root can write: it is created before the switch and
/// filled after it, once the process serves as nobody.
#[test]
fn a_ready_file_where_only_root_may_write_is_filled_after_the_switch() -> Result<()> {
    if !root() {
        return Ok(());
    }
    let (lab, _) = nobody_lab()?;
    let (_backend, backend_addr) = demo_backend(lab.dir.path())?;
    let config = write_config(
        &lab,
        "ready.toml",
        "portable",
        &backend_addr,
        "user = \"nobody\"",
    )?;
    let root_only = tempfile::tempdir()?;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(root_only.path(), std::fs::Permissions::from_mode(0o700))?;
    ensure!(std::fs::metadata(root_only.path())?.uid() == 0);
    let ready = root_only.path().join("tlsgate.ready");
    let child = serve_cmd(&lab, &config)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut serve = ChildGuard {
        child,
        name: "tlsgate serve (ready file in a root-only directory)",
    };
    let lines = wait_ready(&ready, &mut serve, Duration::from_secs(30))?;
    let port: u16 = lines
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .context("ready file names a listener")?
        .parse()?;
    // By the time it has content, every thread runs as nobody.
    assert_dropped(serve.child.id(), "0000000000000000")?;
    check(curl(&lab, port, "/", &[])?, "curl")?;
    let _ = serve.child.kill();
    let _ = serve.child.wait();
    Ok(())
}

#[test]
fn keep_net_bind_service_keeps_that_capability_alone() -> Result<()> {
    if !root() {
        return Ok(());
    }
    let (lab, _) = nobody_lab()?;
    let (_backend, backend_addr) = demo_backend(lab.dir.path())?;
    let config = write_config(
        &lab,
        "bind.toml",
        "portable",
        &backend_addr,
        "user = \"nobody\"\nkeep_net_bind_service = true",
    )?;
    let (mut serve, port) = start(&lab, &config)?;
    assert_dropped(serve.child.id(), "0000000000000400")?;
    check(curl(&lab, port, "/", &[])?, "curl")?;
    let _ = serve.child.kill();
    let _ = serve.child.wait();
    Ok(())
}

#[test]
fn root_without_a_user_is_refused_unless_allowed() -> Result<()> {
    if !root() {
        return Ok(());
    }
    let (lab, _) = nobody_lab()?;
    let config = write_config(&lab, "root.toml", "portable", "127.0.0.1:9", "")?;
    let out = serve_cmd(&lab, &config).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started as root: {stderr}");
    assert!(
        stderr.contains("[process] user") && stderr.contains("allow_root = true"),
        "the error names the keys: {stderr}"
    );
    // With allow_root it starts (and stays root).
    let config = write_config(
        &lab,
        "root-ok.toml",
        "portable",
        "127.0.0.1:9",
        "allow_root = true",
    )?;
    let (mut serve, _) = start(&lab, &config)?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", serve.child.id()))?;
    assert_eq!(field(&status, "Uid:"), ["0"; 4]);
    assert_eq!(field(&status, "NoNewPrivs:"), ["1"]);
    let _ = serve.child.kill();
    let _ = serve.child.wait();
    Ok(())
}

#[test]
fn a_state_directory_of_another_owner_is_refused_with_the_fix() -> Result<()> {
    if !root() {
        return Ok(());
    }
    let (lab, _) = nobody_lab()?;
    std::fs::create_dir(lab.path("state"))?; // root's
    let config = write_config(
        &lab,
        "own.toml",
        "portable",
        "127.0.0.1:9",
        "user = \"nobody\"",
    )?;
    let out = serve_cmd(&lab, &config).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("must own the state directory") && stderr.contains("chown -R 65534:65534"),
        "{stderr}"
    );
    Ok(())
}
