//! `[[backend]]` pools and `[[listener.route]]`s: plain data and their load-time checks. The
//! data plane's pools are built from them by `crate::pools`.
//!
//! ```toml
//! [[backend]]
//! name = "web"
//! servers = [
//!   { address = "10.0.0.1:8080", weight = 2 },
//!   { address = "10.0.0.2:8080", max_connections = 1000 },
//! ]
//! alpn = ["h2", "http/1.1"]        # protocols the servers speak; [] (default): no ALPN
//! alpn_required = true             # false: a client offering only others gets no ALPN, not an alert
//! balance = "round_robin"          # round_robin | least_connections | consistent_hash
//! connect_timeout_ms = 2000        # reaching a server, retries included
//! retries = 2                      # other servers tried after a failed connect
//! eject_after = 3                  # connect failures in a row that leave a server out; 0: never
//! eject_backoff_ms = 10000         # how long it stays out
//! proxy_protocol = false
//! # [backend.backend_tls] as [listener.backend_tls]
//!
//! [backend.health_check]           # optional active checks
//! kind = "http"                    # tcp | tls (a handshake; needs backend_tls) | http
//! path = "/health"                 # http: GET this, expect `expect_status`
//! expect_status = 200
//! interval_ms = 2000
//! timeout_ms = 1000
//! rise = 2                         # passes in a row that bring a server back
//! fall = 3                         # failures in a row that take it out
//!
//! [[listener]]
//! name = "edge"
//! default_backend = "web"          # a ClientHello no route takes; absent: unrecognized_name
//! [[listener.route]]
//! sni = "api.example.com"          # or "*.example.com"; absent: any name
//! alpn = "h2"                      # optional: only when the client offers it
//! backend = "api"
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::Deserialize;

use super::BackendTlsConfig;

/// Default deadline for reaching a pool's server, retries included.
pub const DEFAULT_POOL_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Default number of other servers tried after a failed connect.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default connect failures in a row that eject a server.
pub const DEFAULT_EJECT_AFTER: u32 = 3;
/// Default time an ejected server stays out, in milliseconds.
pub const DEFAULT_EJECT_BACKOFF_MS: u64 = 10_000;
/// Default active check interval, in milliseconds.
pub const DEFAULT_CHECK_INTERVAL_MS: u64 = 2_000;
/// Default active check timeout, in milliseconds.
pub const DEFAULT_CHECK_TIMEOUT_MS: u64 = 1_000;
/// Default passes in a row that bring a server back.
pub const DEFAULT_RISE: u32 = 2;
/// Default failures in a row that take a server out.
pub const DEFAULT_FALL: u32 = 3;

/// `[[backend]]`: a named pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Unique name; routes name it.
    pub name: String,
    /// The servers.
    #[serde(default)]
    pub servers: Vec<PoolServerConfig>,
    /// ALPN protocols the servers speak, preferred first.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// A client that offers only other protocols gets `no_application_protocol` (true, the
    /// default) or is served without ALPN (false).
    #[serde(default = "default_alpn_required")]
    pub alpn_required: bool,
    /// How a server is chosen.
    #[serde(default)]
    pub balance: BalanceConfig,
    /// Deadline for reaching a server, retries included, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Other servers tried after a failed connect.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Connect failures in a row that eject a server (0: never).
    #[serde(default = "default_eject_after")]
    pub eject_after: u32,
    /// How long an ejected server stays out, in milliseconds.
    #[serde(default = "default_eject_backoff_ms")]
    pub eject_backoff_ms: u64,
    /// Send a PROXY protocol v2 header first.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// TLS to the servers.
    pub backend_tls: Option<BackendTlsConfig>,
    /// Active health checks; none when absent.
    pub health_check: Option<HealthCheckConfig>,
}

fn default_connect_timeout_ms() -> u64 {
    DEFAULT_POOL_CONNECT_TIMEOUT_MS
}
fn default_retries() -> u32 {
    DEFAULT_RETRIES
}
fn default_eject_after() -> u32 {
    DEFAULT_EJECT_AFTER
}
fn default_eject_backoff_ms() -> u64 {
    DEFAULT_EJECT_BACKOFF_MS
}
fn default_alpn_required() -> bool {
    true
}
fn default_weight() -> u32 {
    1
}

/// One server of a pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolServerConfig {
    /// Where to connect.
    pub address: SocketAddr,
    /// Share of connections (default 1; 0: none, e.g. a standby kept configured).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Connections at once at most (default 0: no bound).
    #[serde(default)]
    pub max_connections: u64,
}

/// `balance`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceConfig {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest open connections per weight.
    LeastConnections,
    /// Rendezvous hashing of the client's IP address.
    ConsistentHash,
}

/// `[backend.health_check]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// What a check does.
    pub kind: CheckKind,
    /// `http`: the path requested.
    pub path: Option<String>,
    /// `http`: the status expected.
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    /// Time between checks of a server, in milliseconds.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// A check that takes longer fails, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Passes in a row that bring a server back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures in a row that take it out.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_expect_status() -> u16 {
    200
}
fn default_interval_ms() -> u64 {
    DEFAULT_CHECK_INTERVAL_MS
}
fn default_timeout_ms() -> u64 {
    DEFAULT_CHECK_TIMEOUT_MS
}
fn default_rise() -> u32 {
    DEFAULT_RISE
}
fn default_fall() -> u32 {
    DEFAULT_FALL
}

/// `kind` of a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// A TLS handshake with the pool's `backend_tls`.
    Tls,
    /// An HTTP/1.1 `GET path` (over TLS when the pool speaks TLS) answered with `expect_status`.
    Http,
}

/// `[[listener.route]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A server name or `*.suffix`; absent: any.
    pub sni: Option<String>,
    /// Taken only when the client offers this protocol (which is then negotiated).
    pub alpn: Option<String>,
    /// The pool.
    pub backend: String,
}

/// A key that is wrong and why.
pub type Bad = (String, String);

fn bad(key: impl Into<String>, why: impl Into<String>) -> Bad {
    (key.into(), why.into())
}

fn check_alpn(key: &str, id: &str) -> Result<(), Bad> {
    if id.is_empty() || id.len() > 255 {
        return Err(bad(
            key,
            format!(
                "ALPN protocol ids are 1 to 255 bytes; this one has {}",
                id.len()
            ),
        ));
    }
    Ok(())
}

/// Checks the pools. Returns whether a backend client key is on the token.
pub fn check_pools(pools: &[PoolConfig]) -> Result<bool, Bad> {
    let mut names = HashSet::new();
    let mut needs_token = false;
    for (k, p) in pools.iter().enumerate() {
        let at = format!("backend[{k}]");
        if p.name.is_empty()
            || !p
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(
                format!("{at}.name"),
                format!("{:?}: use letters, digits, '-' and '_' only", p.name),
            ));
        }
        if !names.insert(p.name.as_str()) {
            return Err(bad(
                format!("{at}.name"),
                format!("{:?} is used twice", p.name),
            ));
        }
        if p.servers.is_empty() {
            return Err(bad(
                format!("{at}.servers"),
                "a pool needs at least one server: servers = [{ address = \"host:port\" }]",
            ));
        }
        if p.servers.len() > 64 {
            return Err(bad(format!("{at}.servers"), "at most 64 servers per pool"));
        }
        if p.servers.iter().all(|s| s.weight == 0) {
            return Err(bad(
                format!("{at}.servers"),
                "every weight is 0, so no server would ever get a connection: give one a weight of 1 or more",
            ));
        }
        let mut addrs = HashSet::new();
        for (j, s) in p.servers.iter().enumerate() {
            if !addrs.insert(s.address) {
                return Err(bad(
                    format!("{at}.servers[{j}].address"),
                    format!("{} is listed twice", s.address),
                ));
            }
        }
        for (j, a) in p.alpn.iter().enumerate() {
            check_alpn(&format!("{at}.alpn[{j}]"), a)?;
        }
        if p.connect_timeout_ms == 0 {
            return Err(bad(
                format!("{at}.connect_timeout_ms"),
                "0 would fail every connect; use 1 or more",
            ));
        }
        if let Some(bt) = &p.backend_tls {
            needs_token |= bt
                .check()
                .map_err(|(field, why)| bad(format!("{at}.backend_tls.{field}"), why))?;
        }
        if let Some(h) = &p.health_check {
            let at = format!("{at}.health_check");
            match (h.kind, &h.path) {
                (CheckKind::Http, None) => {
                    return Err(bad(
                        format!("{at}.path"),
                        "kind = \"http\" needs a path such as \"/health\"",
                    ))
                }
                (CheckKind::Http, Some(path)) if !path.starts_with('/') => {
                    return Err(bad(
                        format!("{at}.path"),
                        format!("{path:?} must start with '/'"),
                    ))
                }
                (CheckKind::Http, Some(path)) if path.bytes().any(|b| b <= b' ' || b == 0x7f) => {
                    return Err(bad(
                        format!("{at}.path"),
                        "spaces and control characters are not allowed in a path",
                    ))
                }
                (CheckKind::Tcp | CheckKind::Tls, Some(_)) => {
                    return Err(bad(
                        format!("{at}.path"),
                        "only kind = \"http\" takes a path",
                    ))
                }
                _ => {}
            }
            if h.kind == CheckKind::Tls && p.backend_tls.is_none() {
                return Err(bad(
                    format!("{at}.kind"),
                    "\"tls\" checks a TLS handshake, and this pool has no [backend.backend_tls]",
                ));
            }
            if !(100..=599).contains(&h.expect_status) {
                return Err(bad(
                    format!("{at}.expect_status"),
                    "an HTTP status is 100 to 599",
                ));
            }
            for (key, v) in [("interval_ms", h.interval_ms), ("timeout_ms", h.timeout_ms)] {
                if v == 0 {
                    return Err(bad(format!("{at}.{key}"), "use 1 or more"));
                }
            }
            for (key, v) in [("rise", h.rise), ("fall", h.fall)] {
                if v == 0 {
                    return Err(bad(format!("{at}.{key}"), "use 1 or more"));
                }
            }
        }
    }
    Ok(needs_token)
}

/// Checks a listener's routes against the pools (`at`: `listener[i]`).
pub fn check_routes(
    at: &str,
    routes: &[RouteConfig],
    default: Option<&str>,
    pools: &[PoolConfig],
) -> Result<(), Bad> {
    let known = |name: &str| pools.iter().any(|p| p.name == name);
    if let Some(d) = default {
        if !known(d) {
            return Err(bad(
                format!("{at}.default_backend"),
                format!("no [[backend]] is named {d:?}"),
            ));
        }
    }
    let mut seen = HashSet::new();
    for (j, r) in routes.iter().enumerate() {
        let rat = format!("{at}.route[{j}]");
        if !known(&r.backend) {
            return Err(bad(
                format!("{rat}.backend"),
                format!("no [[backend]] is named {:?}", r.backend),
            ));
        }
        if let Some(a) = &r.alpn {
            check_alpn(&format!("{rat}.alpn"), a)?;
        }
        let sni = match &r.sni {
            Some(s) => {
                let name = s.strip_prefix("*.").unwrap_or(s);
                crate::tls::normalize_name(name)
                    .map_err(|e| bad(format!("{rat}.sni"), e.to_string()))?;
                if name.contains('*') {
                    return Err(bad(
                        format!("{rat}.sni"),
                        format!("{s:?}: a wildcard is only `*.` in front of a name"),
                    ));
                }
                Some(s.trim_end_matches('.').to_ascii_lowercase())
            }
            None => None,
        };
        if r.sni.is_none() && r.alpn.is_none() {
            return Err(bad(
                format!("{rat}.sni"),
                "a route without sni and alpn takes everything: use default_backend instead",
            ));
        }
        if !seen.insert((sni.clone(), r.alpn.clone())) {
            return Err(bad(
                format!("{rat}.sni"),
                format!(
                    "{} is routed twice{}",
                    sni.as_deref().unwrap_or("any name"),
                    r.alpn
                        .as_ref()
                        .map(|a| format!(" for alpn {a:?}"))
                        .unwrap_or_default()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
