//! The new process's side of a handover (`tlsgate serve --takeover`).

use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::wire::{self, ACK, HELLO, MANIFEST, READY, TICKETS};
use super::{Manifest, VERSION};

/// How long the old process may take to answer each step.
const STEP_WITHIN: Duration = Duration::from_secs(30);

/// What this process took over from the one it replaces. Each part is taken out as start-up
/// reaches it; [`Inherited::ready`] then tells the old process to stop accepting.
#[derive(Debug)]
pub struct Inherited {
    stream: UnixStream,
    /// The process being replaced.
    pub old_pid: u32,
    pub lock: Option<OwnedFd>,
    pub handover: Option<UnixListener>,
    pub listeners: Vec<(String, Vec<TcpListener>)>,
    pub metrics: Option<TcpListener>,
    pub api_socket: Option<(PathBuf, UnixListener)>,
    pub api_https: Option<TcpListener>,
    pub acme_http01: Option<TcpListener>,
    /// The old process's local ticket keys, for this appliance's session registry.
    pub tickets: Vec<crate::tls::session::handover::TicketKeys>,
}

/// Connects to the running process of this configuration and takes its sockets, lock and
/// ticket keys (which `tlsgate serve` gives its session registry before the listeners are built).
pub fn take(config: &crate::config::Config) -> Result<Inherited> {
    let path = super::socket_path(config)?;
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "upgrade: no running tlsgate answers on {}: start it with `tlsgate serve` instead",
            path.display()
        )
    })?;
    // Started as root, the running server is its `[process] user` by now.
    let switched = config
        .process
        .user
        .as_deref()
        .and_then(|u| crate::privileges::resolve(u, config.process.group.as_deref()).ok())
        .map(|t| t.uid);
    super::peer_allowed(&stream, switched)?;
    stream.set_read_timeout(Some(STEP_WITHIN))?;
    wire::send_frame(&mut stream, HELLO, &serde_json::to_vec(&VERSION)?)?;
    let manifest: Manifest = serde_json::from_slice(&wire::expect_frame(&mut stream, MANIFEST)?)
        .context("handover: a bad manifest")?;
    if manifest.version != VERSION {
        bail!(
            "handover: the running process speaks protocol {}, this one {VERSION}",
            manifest.version
        );
    }
    let mut fds = wire::recv_fds(&stream, manifest.fd_count())?.into_iter();
    let mut next = || fds.next().context("handover: a descriptor is missing");
    let lock = next()?;
    let handover = UnixListener::from(next()?);
    let mut listeners = Vec::new();
    for (name, count) in &manifest.listeners {
        let sockets = (0..*count)
            .map(|_| next().map(TcpListener::from))
            .collect::<Result<Vec<_>>>()?;
        listeners.push((name.clone(), sockets));
    }
    let metrics = if manifest.metrics {
        Some(TcpListener::from(next()?))
    } else {
        None
    };
    let api_socket = match &manifest.api_socket {
        Some(p) => Some((p.clone(), UnixListener::from(next()?))),
        None => None,
    };
    let api_https = if manifest.api_https {
        Some(TcpListener::from(next()?))
    } else {
        None
    };
    let acme_http01 = if manifest.acme_http01 {
        Some(TcpListener::from(next()?))
    } else {
        None
    };
    let tickets = wire::expect_frame(&mut stream, TICKETS)?;
    let keys = crate::tls::session::handover::decode(&tickets).map_err(anyhow::Error::msg)?;
    drop(tickets);
    tracing::info!(
        old_pid = manifest.pid,
        listeners = manifest.listeners.len(),
        "upgrade: took over the listening sockets, the state lock and the ticket keys"
    );
    Ok(Inherited {
        stream,
        old_pid: manifest.pid,
        lock: Some(lock),
        handover: Some(handover),
        listeners,
        metrics,
        api_socket,
        api_https,
        acme_http01,
        tickets: keys,
    })
}

impl Inherited {
    /// The inherited sockets of each of `names` (the new configuration's listeners, in its
    /// order). A listener the running process does not have cannot be added by an upgrade
    /// (its port was bound before privileges were dropped); one the new configuration dropped
    /// is closed here.
    pub fn listeners_for(&mut self, names: &[String]) -> Result<Vec<Vec<TcpListener>>> {
        let mut by_name: std::collections::HashMap<String, Vec<TcpListener>> =
            std::mem::take(&mut self.listeners).into_iter().collect();
        let mut out = Vec::new();
        for n in names {
            match by_name.remove(n) {
                Some(s) => out.push(s),
                None => bail!(
                    "listener {n:?} is not one the running process serves: an upgrade keeps \
                     the listeners; stop and start to add one"
                ),
            }
        }
        for n in by_name.keys() {
            tracing::warn!(listener = %n, "the new configuration drops this listener: its sockets close when the old process exits");
        }
        Ok(out)
    }

    /// Tells the old process that this one serves; it acknowledges and stops accepting.
    pub fn ready(mut self) -> Result<u32> {
        wire::send_frame(&mut self.stream, READY, b"")?;
        wire::expect_frame(&mut self.stream, ACK)
            .context("the old process did not acknowledge the takeover")?;
        Ok(self.old_pid)
    }
}

/// An inherited TCP listener on the management runtime: non-blocking and registered with
/// `rt`'s reactor, with its address.
pub fn tcp_on(
    rt: &tokio::runtime::Runtime,
    l: TcpListener,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    l.set_nonblocking(true)?;
    let _rt = rt.enter();
    let l = tokio::net::TcpListener::from_std(l)?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// An inherited unix listener on the management runtime (non-blocking, registered with `rt`).
pub fn unix_on(rt: &tokio::runtime::Runtime, l: UnixListener) -> Result<tokio::net::UnixListener> {
    l.set_nonblocking(true)?;
    let _rt = rt.enter();
    Ok(tokio::net::UnixListener::from_std(l)?)
}
