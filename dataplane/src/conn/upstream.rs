//! The connection's side of backend pools: the pool its ClientHello was routed to, the server
//! it holds, and the connect attempts (a failed one is retried on another server within the
//! pool's connect deadline).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CloseReason, Conn};
use crate::conn::BackendTls;
use crate::pool::{Lease, Pool};

/// What a connection knows of its backend pool.
#[derive(Debug, Default)]
pub(super) struct Upstream {
    /// The routed pool (set after the ClientHello).
    pub pool: Option<Arc<Pool>>,
    /// The server being connected to or connected, and the connection's hold on it.
    server: Option<(usize, Lease)>,
    /// Servers tried, a bit per index.
    tried: u64,
    /// The ALPN protocol the route chose (what the server answers with).
    pub alpn: Option<Vec<u8>>,
    /// The connection answers an ACME `tls-alpn-01` validation: closed after the handshake.
    pub acme_challenge: bool,
    attempts: u32,
    /// Every attempt ends by this.
    deadline: Option<Instant>,
    /// The current attempt started then.
    attempt_started: Option<Instant>,
}

/// A backend to connect to and how long the attempt may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The server's address.
    pub addr: SocketAddr,
    /// This attempt's share of the pool's connect deadline.
    pub timeout: Duration,
}

impl Conn {
    /// The routed pool's backend TLS, if it speaks TLS.
    pub(super) fn pool_backend_tls(&self) -> Option<BackendTls> {
        self.upstream.pool.as_ref()?.backend_tls.clone()
    }

    /// Whether the routed pool wants a PROXY v2 header.
    pub(super) fn pool_proxy_protocol(&self) -> bool {
        self.upstream
            .pool
            .as_ref()
            .is_some_and(|p| p.proxy_protocol)
    }

    /// The routed pool's name and the chosen server, for logs and the management API.
    pub fn backend(&self) -> Option<(&str, Option<SocketAddr>)> {
        let pool = self.upstream.pool.as_ref()?;
        let server = self
            .upstream
            .server
            .as_ref()
            .and_then(|(i, _)| pool.servers.get(*i))
            .map(|s| s.addr);
        Some((pool.name.as_str(), server))
    }

    /// The server to connect to once the handshake is done (the driver calls this on
    /// [`super::Event::HandshakeDone`]). `None`: no server can take the connection; the
    /// connection is closed as `no_healthy_backend`.
    pub fn pick_backend(&mut self, now: Instant) -> Option<Target> {
        let pool = self.upstream.pool.clone()?;
        let budget = if pool.connect_timeout.is_zero() {
            self.backend_connect_timeout
        } else {
            pool.connect_timeout
        };
        let deadline = *self.upstream.deadline.get_or_insert(now + budget);
        let Some(i) = pool.pick(self.peer, self.upstream.tried) else {
            self.close_without_backend(CloseReason::NoHealthyBackend);
            return None;
        };
        self.upstream.tried |= 1u64.checked_shl(i as u32).unwrap_or(0);
        self.upstream.attempts += 1;
        self.upstream.attempt_started = Some(now);
        let server = &pool.servers[i];
        self.upstream.server = Some((i, Lease::new(server.state.clone())));
        // What is left of the deadline, shared by the attempts still allowed, so one
        // black-holed server cannot use it all.
        let left_attempts = pool
            .retries
            .saturating_add(2)
            .saturating_sub(self.upstream.attempts);
        let remaining = deadline.saturating_duration_since(now);
        let timeout = remaining / left_attempts.max(1);
        Some(Target {
            addr: server.addr,
            timeout: timeout.max(Duration::from_millis(1)),
        })
    }

    /// The connect to the last [`Conn::pick_backend`] target failed (`timed_out`: it ran past
    /// its timeout). Counts it against the server and returns the next server to try, within
    /// the pool's retries and deadline; `None`: the connection is closed.
    pub fn on_backend_connect_failed(&mut self, timed_out: bool, now: Instant) -> Option<Target> {
        let pool = self.upstream.pool.clone()?;
        if let Some((i, lease)) = self.upstream.server.take() {
            pool.connect_failed(i, timed_out);
            drop(lease);
        }
        let reason = if timed_out {
            CloseReason::BackendConnectTimeout
        } else {
            CloseReason::BackendConnectFailed
        };
        let in_time = self.upstream.deadline.is_some_and(|d| now < d);
        if self.upstream.attempts > pool.retries || !in_time || self.closed().is_some() {
            self.close_without_backend(reason);
            return None;
        }
        let next = self.pick_backend(now);
        if next.is_none() {
            // Every other server is out or tried: the client sees what the last attempt met.
            self.phase = super::Phase::Closed(reason);
        } else {
            pool.retried();
        }
        next
    }

    /// Ends a connection whose handshake is done but that no backend will serve: the client
    /// gets close_notify (a clean TLS close, not a bare FIN) before the socket closes.
    pub(super) fn close_without_backend(&mut self, reason: CloseReason) {
        if self.closed().is_some() {
            return;
        }
        if let Some(tls) = self.phase.tls() {
            tls.send_close_notify();
            let mut bytes = Vec::new();
            while tls.wants_write() {
                match tls.write_tls(&mut bytes) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            self.to_client.push(&bytes);
        }
        self.abort(reason);
    }

    /// One access-log line for this connection (target `tlsgate_access`, debug level, so
    /// off unless asked for): listener, client, route, negotiated protocol, server, reason.
    pub(crate) fn log_access(&self, core: usize, reason: CloseReason) {
        if !tracing::enabled!(target: "tlsgate_access", tracing::Level::DEBUG) {
            return;
        }
        let (pool, server) = self.backend().unwrap_or(("-", None));
        let alpn = self
            .upstream
            .alpn
            .as_deref()
            .map_or_else(|| "-".into(), String::from_utf8_lossy);
        tracing::debug!(
            target: "tlsgate_access",
            core,
            listener = %self.listener.snap.name,
            client = %self.peer,
            pool,
            server = %server.map_or_else(|| "-".to_string(), |s| s.to_string()),
            alpn = %alpn,
            reason = reason.as_str(),
            "connection"
        );
    }

    /// The connect succeeded: the server's failure count is reset.
    pub(super) fn upstream_connected(&mut self, now: Instant) {
        if let (Some(pool), Some((i, _))) = (&self.upstream.pool, &self.upstream.server) {
            if let Some(s) = pool.servers.get(*i) {
                s.state.connect_ok();
                if let Some(t) = self.upstream.attempt_started {
                    s.state.connect_latency(now.saturating_duration_since(t));
                }
            }
        }
    }
}
