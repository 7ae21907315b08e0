//! Backend pools: the servers a route forwards to, how one is chosen for each connection
//! ([`balance`]), what is known of each server's health ([`health`]), and which pool a
//! ClientHello goes to ([`route`]).
//!
//! Everything here is shared by every core: a server's state is a handful of atomics
//! ([`ServerState`]) that the cores read and bump once per connection and a health checker
//! (outside the data plane, in `tlsgate serve`) writes. Pools are immutable parts of a
//! snapshot; a reload that keeps a server hands the new pool the same `Arc<ServerState>`, so
//! health, counters and the connections in flight carry over.

pub mod balance;
pub mod health;
pub mod route;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

pub use balance::Balance;
pub use health::{AdminState, HealthCheck, Probe, ServerState};
pub use route::{Route, RouteTable, SniMatch};

use crate::backend_tls::BackendTls;

/// One backend server of a pool.
#[derive(Debug, Clone)]
pub struct Server {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Share of new connections relative to the pool's other servers (0: none).
    pub weight: u32,
    /// Connections at once through this pool at most (0: no bound).
    pub max_connections: u64,
    /// Health, administrative state and counters, shared across snapshots.
    pub state: Arc<ServerState>,
}

/// Passive ejection: after `after` connect failures in a row a server is left out for
/// `backoff`, then tried again (one more failure ejects it again at once).
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    /// Consecutive connect failures that eject a server; 0 never ejects.
    pub after: u32,
    /// How long an ejected server is left out.
    pub backoff: Duration,
}

/// A named set of servers that speak the same protocols.
#[derive(Debug)]
pub struct Pool {
    /// Unique name (labels metrics and logs, names the pool in the management API).
    pub name: String,
    /// The servers, in configuration order.
    pub servers: Vec<Server>,
    /// ALPN protocols the servers speak, in the pool's order; empty: no ALPN is negotiated.
    pub alpn: Vec<Vec<u8>>,
    /// A client that offers only other protocols is served without ALPN instead of getting a
    /// `no_application_protocol` alert.
    pub alpn_optional: bool,
    /// How a server is chosen.
    pub balance: Balance,
    /// The deadline for reaching a server, retries included.
    pub connect_timeout: Duration,
    /// Other servers tried after a failed connect, within `connect_timeout`.
    pub retries: u32,
    /// Passive ejection after connect failures.
    pub ejection: Ejection,
    /// Send a PROXY protocol v2 header first.
    pub proxy_protocol: bool,
    /// Speak TLS to the servers.
    pub backend_tls: Option<BackendTls>,
    /// Active health checks, run outside the data plane; `None`: none.
    pub health_check: Option<HealthCheck>,
    /// Connect attempts made on another server after a failure.
    pub retries_total: AtomicU64,
    /// Connections closed because no server could take them.
    pub no_healthy_total: AtomicU64,
    /// Rotates round robin and breaks ties, shared by the cores.
    cursor: AtomicU64,
}

impl Pool {
    /// A pool with its servers and settings.
    pub fn new(name: impl Into<String>, servers: Vec<Server>, alpn: Vec<Vec<u8>>) -> Self {
        Self {
            name: name.into(),
            servers,
            alpn,
            alpn_optional: false,
            balance: Balance::RoundRobin,
            connect_timeout: Duration::from_secs(5),
            retries: 0,
            ejection: Ejection {
                after: 0,
                backoff: Duration::from_secs(10),
            },
            proxy_protocol: false,
            backend_tls: None,
            health_check: None,
            retries_total: AtomicU64::new(0),
            no_healthy_total: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
        }
    }

    /// The one-server pool of a listener's plain `backend = "host:port"`: no ejection, no
    /// retries, as before pools existed.
    pub fn single(name: impl Into<String>, addr: SocketAddr, connect_timeout: Duration) -> Self {
        let mut p = Self::new(
            name,
            vec![Server {
                addr,
                weight: 1,
                max_connections: 0,
                state: Arc::new(ServerState::default()),
            }],
            Vec::new(),
        );
        p.connect_timeout = connect_timeout;
        p
    }

    /// Chooses a server for a client (`tried`: a bit per server index already tried by this
    /// connection). `None`: no server can take a connection now.
    pub fn pick(&self, client: SocketAddr, tried: u64) -> Option<usize> {
        let now = health::now_ms();
        let n = self.cursor.fetch_add(1, Relaxed);
        let pick = balance::pick(self, client, n, |i| {
            i < 64 && tried & (1 << i) == 0 && self.available(i, now)
        });
        if pick.is_none() && tried == 0 {
            self.no_healthy_total.fetch_add(1, Relaxed);
        }
        pick
    }

    /// Counts a retry on another server.
    pub fn retried(&self) {
        self.retries_total.fetch_add(1, Relaxed);
    }

    /// The index of the server at `addr`.
    pub fn server_index(&self, addr: SocketAddr) -> Option<usize> {
        self.servers.iter().position(|s| s.addr == addr)
    }

    /// Whether server `i` may take a new connection at `now_ms`.
    pub fn available(&self, i: usize, now_ms: u64) -> bool {
        let Some(s) = self.servers.get(i) else {
            return false;
        };
        s.weight > 0
            && s.state.accepts_new(now_ms)
            && (s.max_connections == 0 || s.state.active.load(Relaxed) < s.max_connections)
    }

    /// A connect to server `i` failed: counts it and ejects the server after enough in a row.
    pub fn connect_failed(&self, i: usize, timed_out: bool) {
        if let Some(s) = self.servers.get(i) {
            if let Some(failures) = s.state.connect_failed(timed_out, self.ejection) {
                tracing::warn!(
                    pool = %self.name,
                    server = %s.addr,
                    failures,
                    backoff_ms = u64::try_from(self.ejection.backoff.as_millis()).unwrap_or(u64::MAX),
                    "backend server ejected after connect failures in a row"
                );
            }
        }
    }
}

/// One connection's hold on a server: counts it active until dropped.
#[derive(Debug)]
pub struct Lease {
    state: Arc<ServerState>,
}

impl Lease {
    /// Counts a new connection on `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        state.active.fetch_add(1, Relaxed);
        state.total.fetch_add(1, Relaxed);
        Self { state }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Relaxed);
    }
}
