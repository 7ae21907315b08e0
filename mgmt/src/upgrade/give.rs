//! The running process's side of a handover.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::wire::{self, ACK, HELLO, MANIFEST, READY, REFUSED, TICKETS};
use super::{Manifest, VERSION};

/// How long the new process may take from its hello to READY (it logs in to the HSM and builds
/// every listener meanwhile; the old one serves all along).
const READY_WITHIN: Duration = Duration::from_secs(300);
/// How long a peer may take to say hello.
const HELLO_WITHIN: Duration = Duration::from_secs(10);

/// Descriptors made at start that a new process takes over, besides the data plane's sockets.
#[derive(Debug)]
pub struct Kit {
    /// The state directory's lock (`flock` belongs to the open file, so it travels with it).
    pub lock: OwnedFd,
    /// The handover listener itself, so the next upgrade finds the new process at the same path.
    pub handover: OwnedFd,
    pub metrics: Option<OwnedFd>,
    pub api_socket: Option<(PathBuf, OwnedFd)>,
    pub api_https: Option<OwnedFd>,
    pub acme_http01: Option<OwnedFd>,
}

/// Hands everything to the process on `stream` and waits for it to serve. `Ok(pid)` means the
/// new process is ready and this one must stop accepting and drain; an error means it failed
/// (or went away) before that, and this one keeps serving.
pub fn give(
    mut stream: UnixStream,
    kit: &Kit,
    listeners: Vec<(String, Vec<OwnedFd>)>,
    sessions: &crate::tls::session::Registry,
) -> Result<u32> {
    let pid = super::peer_allowed(&stream, None).inspect_err(|e| {
        let _ = wire::send_frame(&mut stream, REFUSED, format!("{e:#}").as_bytes());
    })?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(HELLO_WITHIN))?;
    let hello = wire::expect_frame(&mut stream, HELLO)?;
    let version: u32 = serde_json::from_slice(&hello).context("handover: a bad hello")?;
    if version != VERSION {
        let why = format!(
            "handover protocol {version} is not this process's {VERSION}: stop and start instead"
        );
        let _ = wire::send_frame(&mut stream, REFUSED, why.as_bytes());
        bail!("{why}");
    }
    let manifest = Manifest {
        version: VERSION,
        pid: std::process::id(),
        listeners: listeners
            .iter()
            .map(|(n, fds)| (n.clone(), fds.len()))
            .collect(),
        metrics: kit.metrics.is_some(),
        api_socket: kit.api_socket.as_ref().map(|(p, _)| p.clone()),
        api_https: kit.api_https.is_some(),
        acme_http01: kit.acme_http01.is_some(),
    };
    let mut fds = vec![kit.lock.as_fd(), kit.handover.as_fd()];
    for (_, sockets) in &listeners {
        fds.extend(sockets.iter().map(|s| s.as_fd()));
    }
    fds.extend(kit.metrics.iter().map(|f| f.as_fd()));
    fds.extend(kit.api_socket.iter().map(|(_, f)| f.as_fd()));
    fds.extend(kit.api_https.iter().map(|f| f.as_fd()));
    fds.extend(kit.acme_http01.iter().map(|f| f.as_fd()));
    wire::send_frame(&mut stream, MANIFEST, &serde_json::to_vec(&manifest)?)?;
    wire::send_fds(&stream, &fds)?;
    drop(fds);
    drop(listeners);
    let tickets = sessions.export();
    wire::send_frame(&mut stream, TICKETS, &tickets)?;
    drop(tickets);
    tracing::info!(
        new_pid = pid,
        "upgrade: sockets, lock and ticket keys handed to the new process; serving until it is ready"
    );
    stream.set_read_timeout(Some(READY_WITHIN))?;
    wire::expect_frame(&mut stream, READY).context("the new process did not become ready")?;
    wire::send_frame(&mut stream, ACK, b"")?;
    Ok(pid)
}
