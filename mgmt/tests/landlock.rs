//! Landlock in the real binary. A debug-build hook (`TLSGATE_TEST_LANDLOCK_PROBE=PORT:PATH`)
//! has each thread, right where it restricts itself, try to open a file outside the
//! configuration's paths and to bind a TCP port the configuration does not name, and log the
//! outcome. With `[process] landlock` on (the default) both are refused with `EACCES` on the
//! main thread, the cores, the key-op workers and the management runtime's blocking threads,
//! while the appliance serves handshakes signed by the SoftHSM2 token, reloads on SIGHUP and
//! takes a key, a CSR and a certificate upload through the API (the token's files, the
//! configuration and the state directory stay reachable). With `landlock = false` the same
//! probes succeed: the refusals come from Landlock.

mod api_support;
mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

use anyhow::{ensure, Result};
use api_support::{ctl_ok, file_fingerprint, key_csr_chain, served_fingerprint};
use common::policy_support::{log_lines, wait_log};
use common::{demo_backend, drivers, Lab, Serve};

fn write_config(lab: &Lab, io: &str, backend: &str, landlock: bool) -> Result<PathBuf> {
    // The configuration and the chain in directories of their own, apart from the file the
    // probe opens.
    let dir = lab.path(&format!("conf-{io}-{landlock}"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tlsgate.toml");
    std::fs::write(
        &path,
        format!(
            "[process]\nlandlock = {landlock}\n\n\
             [pkcs11]\ntoken = \"lab\"\npin = \"file:{pin}\"\n\n\
             [dataplane]\ncores = [0]\nio = \"{io}\"\n\n\
             [api]\nsocket = \"{socket}\"\n\n[state]\ndir = \"{state}\"\n\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n\
             [[listener.certificate]]\nchain = \"{chain}\"\nkey = \"{key}\"\n",
            pin = lab.p("token/user.pin"),
            socket = lab.p("api.sock"),
            state = lab.p(&format!("state-{io}-{landlock}")),
            chain = lab.p("certs/web.pem"),
            key = common::uri("web"),
        ),
    )?;
    Ok(path)
}

/// A TCP port free now, which no configuration here names.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The probe line of `thread`, which must say `want` for both the file and the bind.
fn probe(logs: &Receiver<String>, thread: &str, path: &Path, port: u16, want: &str) -> Result<()> {
    let line = wait_log(logs, &format!("landlock test probe: thread {thread}:"))?;
    let open = format!("open {}: {want}", path.display());
    let bind = format!("bind 127.0.0.1:{port}: {want}");
    ensure!(
        line.contains(&open) && line.contains(&bind),
        "{thread}: expected {open:?} and {bind:?} in: {line}"
    );
    Ok(())
}

fn serve_and_probe(lab: &Lab, io: &str, backend: &str, landlock: bool) -> Result<()> {
    let outside = tempfile::tempdir()?;
    let secret = outside.path().join("not-for-tlsgate");
    std::fs::write(&secret, "outside the configuration's paths\n")?;
    let port = free_port()?;
    let config = write_config(lab, io, backend, landlock)?;
    let want = if landlock {
        "denied (EACCES)"
    } else {
        "allowed"
    };
    let mut serve = Serve::start_with_env(
        lab,
        &config,
        &[(
            "TLSGATE_TEST_LANDLOCK_PROBE",
            format!("{port}:{}", secret.display()),
        )],
    )?;
    let logs = log_lines(&mut serve)?;
    // Threads log in the order they start; each wait reads on from the last line it matched.
    probe(&logs, "tlsgate-keyop-0", &secret, port, want)?;
    probe(&logs, "tlsgate-core-0", &secret, port, want)?;
    probe(&logs, "main", &secret, port, want)?;

    // It serves: a handshake signed on the token, and traffic through to the backend.
    let out = common::check(
        common::curl(lab, serve.port, "/hello", &[])?,
        "curl through the appliance",
    )?;
    ensure!(out.contains("hello from the tlsgate demo backend"), "{out}");

    // A reload reads the configuration and the chain again, on a blocking thread.
    serve.signal("HUP")?;
    probe(&logs, "tokio-blocking", &secret, port, want)?;
    let line = wait_log(&logs, "operation=\"reload\"")?;
    ensure!(!line.contains("refused"), "{io}: the reload failed: {line}");

    // A key generated on the token, its CSR, an upload and a binding through the API.
    let label = format!("up-{io}-{landlock}");
    let chain = key_csr_chain(lab, &label)?;
    ctl_ok(
        lab,
        &[
            "certs",
            "upload",
            "--id",
            &label,
            "--key",
            &label,
            "--chain",
            &chain.display().to_string(),
        ],
    )?;
    ctl_ok(
        lab,
        &[
            "listeners",
            "bind",
            "--listener",
            "web",
            "--cert",
            &label,
            "--default",
            &label,
        ],
    )?;
    ensure!(
        served_fingerprint(serve.port)? == file_fingerprint(&chain)?,
        "{io}: the uploaded certificate is not served"
    );
    serve.signal("TERM")?;
    let _ = serve.guard.child.wait();
    Ok(())
}

/// Whether this kernel enforces the whole ruleset (Landlock ABI 5: Linux 6.10); a skip (a
/// failure under `CI=true`) when not. Making a ruleset restricts nothing.
fn landlock_here() -> bool {
    use landlock::{
        Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, ABI,
    };
    let made = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(ABI::V5))
        .and_then(|r| r.handle_access(AccessNet::BindTcp))
        .and_then(|r| r.create());
    if let Err(e) = made {
        tlsgate_hw_tests::skip::missing(format!("the kernel has no Landlock ABI 5: {e}"));
        return false;
    }
    true
}

#[test]
fn landlock_refuses_other_files_and_ports_while_the_appliance_serves_reloads_and_takes_uploads(
) -> Result<()> {
    if !landlock_here() {
        return Ok(());
    }
    let lab = Lab::new()?;
    lab.token_key_with_chain("ec-p256", "web")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    for io in drivers() {
        serve_and_probe(&lab, io, &backend, true)?;
    }
    // The refusals above come from Landlock: without it the same probes succeed.
    serve_and_probe(&lab, "portable", &backend, false)
}
