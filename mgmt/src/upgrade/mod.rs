//! Zero-downtime binary upgrade: the running `tlsgate serve` hands its listening sockets, the
//! state-directory lock, the management sockets and its ticket keys to a new process over a unix
//! socket in the state directory (`handover.sock`), and leaves once the new one serves.
//!
//! ```text
//!  tlsgate upgrade ── spawns ──► NEW: tlsgate serve --takeover
//!                                  connect <state dir>/handover.sock (peer: root or our uid)
//!  OLD (serving)  ◄── HELLO ──────
//!                 ─── MANIFEST ──► listeners and their socket counts, which sockets follow
//!                 ─── FDS ───────► SCM_RIGHTS: lock, handover, per-core listener sockets,
//!                                  metrics, API socket, API HTTPS, ACME http-01
//!                 ─── TICKETS ───► local ticket keys + rotation schedule (wiped buffers)
//!                                  NEW: logs in to the HSM, builds its snapshot, starts its
//!                                  data plane on the inherited sockets (both accept now)
//!                                  NEW tells systemd MAINPID= READY=1 (before the old can exit)
//!                 ◄── READY ─────
//!  stops accepting ── ACK ───────► NEW writes its pid into the lock file, then its ready file
//!  drains up to drain_timeout, exits (the API socket path stays: it is the new one's now)
//! ```
//!
//! A new process that fails before READY (bad configuration, HSM login refused) exits with its
//! error; the old one reads the end of the stream and keeps serving. The old process never
//! executes or binds anything here (it only accepts on a socket it made at start), so it works
//! under a Landlock ruleset.

pub mod cli;
mod give;
mod take;
pub mod wire;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use give::{give, Kit};
pub use take::{take, tcp_on, unix_on, Inherited};

/// The handover socket's name in the state directory.
pub const SOCKET: &str = "handover.sock";

/// Where the handover socket of the appliance with this configuration is.
pub fn socket_path(config: &crate::config::Config) -> Result<PathBuf> {
    match crate::api::state_dir(config) {
        Some(dir) => Ok(dir.join(SOCKET)),
        None => bail!(
            "a binary upgrade needs a state directory ([state] dir or [api]): the handover \
             socket and the lock live there"
        ),
    }
}

/// What the old process sends before the descriptors; they follow in this order: the state
/// lock, the handover listener, each listener's sockets (in `listeners` order), then the
/// metrics, API unix socket, API HTTPS and ACME http-01 listeners that are `true`/`Some`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub pid: u32,
    pub listeners: Vec<(String, usize)>,
    pub metrics: bool,
    pub api_socket: Option<PathBuf>,
    pub api_https: bool,
    /// The ACME http-01 listener (absent from a manifest of a build without it).
    #[serde(default)]
    pub acme_http01: bool,
}

/// Protocol version; a new binary speaking another one is refused with a message.
pub const VERSION: u32 = 1;

impl Manifest {
    fn fd_count(&self) -> usize {
        2 + self.listeners.iter().map(|(_, n)| n).sum::<usize>()
            + usize::from(self.metrics)
            + usize::from(self.api_socket.is_some())
            + usize::from(self.api_https)
            + usize::from(self.acme_http01)
    }
}

/// Only root, our own user or `also` (the `[process] user` a root-started server switched to)
/// may be the other end: take our sockets, lock and ticket keys, or hand us theirs.
pub fn peer_allowed(stream: &UnixStream, also: Option<u32>) -> Result<u32> {
    let cred = rustix::net::sockopt::socket_peercred(stream).context("SO_PEERCRED")?;
    let uid = cred.uid.as_raw();
    let own = rustix::process::geteuid().as_raw();
    if uid != 0 && uid != own && Some(uid) != also {
        bail!("handover refused to uid {uid}: only root or uid {own} may take part");
    }
    Ok(cred.pid.as_raw_nonzero().get() as u32)
}

/// Binds the handover socket at start (a fresh start, not a takeover): mode 0600, a live one
/// (another process answers) refused like the API socket.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    crate::api::bind_unix(path, 0o600).context("[state] handover socket")
}
