//! One owner per state directory, port and management socket, tried from outside with the real
//! binary: a second `tlsgate serve` on the same state directory exits naming the owner's pid and
//! changes nothing; the lock goes with its process, however it ends; a stale socket file is
//! replaced, a live socket or a file that is not a socket is left alone and stops the start.

mod api_support;
mod common;

use std::path::Path;

use anyhow::{ensure, Result};
use api_support::*;
use common::{demo_backend, fail, tlsgate, Lab, Serve};

/// `tlsgate serve --config CONFIG`, expected to fail; its stderr.
fn serve_fails(lab: &Lab, config: &Path) -> Result<String> {
    let mut cmd = tlsgate();
    lab.env(&mut cmd);
    fail(
        cmd.args(["serve", "--config"])
            .arg(config)
            .arg("--ready-file")
            .arg(config.with_extension("ready"))
            .output()?,
        "a second serve",
    )
}

fn answers(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

#[test]
fn a_second_process_on_the_same_state_directory_is_refused() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "one")?;
    let first = Serve::start(&lab, &config)?;
    let socket = lab.path("api.sock");
    ensure!(answers(&socket), "the first process serves its socket");

    // The same configuration again: refused at once, naming the owner, and nothing taken over.
    let second = lab.path("second.toml");
    std::fs::copy(&config, &second)?;
    let err = serve_fails(&lab, &second)?;
    ensure!(
        err.contains("in use by another tlsgate process")
            && err.contains(&format!("pid {}", first.pid())),
        "{err}"
    );
    ensure!(
        !second.with_extension("ready").exists(),
        "ready file written"
    );
    ensure!(answers(&socket), "the first process lost its socket");
    ensure!(
        served_fingerprint(first.port)? == file_fingerprint(&boot)?,
        "the first process still serves"
    );

    // The lock lives with its process: after a SIGKILL (no clean-up at all) the socket file is
    // stale, and a new process takes the directory and the socket.
    let pid = first.pid();
    drop(first); // SIGKILL
    ensure!(
        std::fs::symlink_metadata(&socket).is_ok(),
        "a killed process leaves its socket file"
    );
    let third = Serve::start(&lab, &second)?;
    ensure!(answers(&socket), "the new process serves the socket");
    let lock = std::fs::read_to_string(lab.path("state/lock"))?;
    ensure!(
        lock.trim() == third.pid().to_string() && lock.trim() != pid.to_string(),
        "lock names {lock:?}"
    );
    Ok(())
}

#[test]
fn the_socket_path_is_replaced_only_when_it_is_a_stale_socket() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "sock")?;
    let socket = lab.path("api.sock");

    // A regular file where the socket goes: refused, and the file is untouched.
    std::fs::write(&socket, "precious")?;
    let err = serve_fails(&lab, &config)?;
    ensure!(err.contains("is not a socket"), "{err}");
    ensure!(std::fs::read_to_string(&socket)? == "precious");
    std::fs::remove_file(&socket)?;

    // A socket somebody answers on (another process's): refused, and it keeps answering.
    let other = std::os::unix::net::UnixListener::bind(&socket)?;
    let err = serve_fails(&lab, &config)?;
    ensure!(err.contains("another process answers"), "{err}");
    ensure!(answers(&socket), "the other process's socket was replaced");
    drop(other); // closes the socket; the file stays, stale

    // A stale socket: replaced. A process another test in this binary forks at that instant
    // holds a copy of the listener until it execs (close-on-exec), so the socket may answer a
    // moment longer.
    common::acme_support::wait_for(
        std::time::Duration::from_secs(10),
        "the closed socket to stop answering",
        || Ok((!answers(&socket)).then_some(())),
    )?;
    let serve = Serve::start(&lab, &config)?;
    ensure!(answers(&socket), "the stale socket was not replaced");
    drop(serve);
    Ok(())
}
