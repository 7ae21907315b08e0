//! Backend pools from the configuration to the data plane, and what `tlsgate serve` does with
//! them at run time: active health checks ([`health`]), metrics ([`metrics`]) and the view the
//! management API lists and changes.
//!
//! A server's state ([`ServerState`]: the operator's drain/maint, health, connections, counters)
//! is kept across reloads: a pool rebuilt with a server of the same pool name and address gets
//! the same `Arc`, so a reload changes nothing for it.

pub mod health;
pub mod metrics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Result;
use parking_lot::Mutex;
use tlsgate_dataplane::pool::{
    Balance, Ejection, HealthCheck, Pool, Probe, Route, RouteTable, Server, ServerState, SniMatch,
};
use tlsgate_keystore::token::Token;

use crate::config::backend::{BalanceConfig, CheckKind, PoolConfig};
use crate::config::Config;

type StateMap = HashMap<(String, SocketAddr), Weak<ServerState>>;

/// One appliance's backend servers at run time: their states, kept across every snapshot
/// build (file reload, API change, start) of that appliance, and the pools of its published
/// snapshot, which the management API lists and changes and the health checker probes.
#[derive(Debug, Default)]
pub struct Pools {
    /// Server states by (pool, address), weakly: a server gone from every published pool is
    /// forgotten.
    states: Mutex<StateMap>,
    /// The published snapshot's pools, refreshed by the signal loop of `tlsgate serve` (at
    /// start, then once a second).
    view: Mutex<Vec<Arc<Pool>>>,
    /// Set when this appliance's health checker is started.
    health: std::sync::OnceLock<()>,
}

impl Pools {
    pub fn new() -> Pools {
        Pools::default()
    }

    fn state_for(&self, pool: &str, addr: SocketAddr) -> Arc<ServerState> {
        let mut map = self.states.lock();
        map.retain(|_, w| w.strong_count() > 0);
        let key = (pool.to_string(), addr);
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(ServerState::default());
        map.insert(key, Arc::downgrade(&s));
        s
    }

    /// Replaces the view with the pools of the data plane's published snapshot, and starts
    /// this appliance's health checker the first time.
    pub fn refresh(self: &Arc<Self>, dp: &tlsgate_dataplane::Dataplane) {
        static DESCRIBED: std::sync::Once = std::sync::Once::new();
        // Descriptions go to the process-wide metrics recorder: once per process.
        DESCRIBED.call_once(metrics::describe);
        let routes = dp.routes();
        *self.view.lock() = published(&routes);
        self.health
            .get_or_init(|| health::start(Arc::downgrade(self)));
        metrics::publish(&routes);
    }

    /// The pools of the published snapshot.
    pub fn view(&self) -> Vec<Arc<Pool>> {
        self.view.lock().clone()
    }
}

/// Listener `i`'s route table: its `[[listener.route]]`s and `default_backend` over the
/// `[[backend]]` pools, or the one-server pool of a plain `backend` (named after the
/// listener, without retries or ejection, as before pools).
pub fn routes(
    config: &Config,
    i: usize,
    token: Option<&Arc<Token>>,
    pools: &Pools,
) -> Result<Option<Arc<RouteTable>>> {
    let Some(l) = config.listeners.get(i) else {
        return Ok(None);
    };
    if let Some(addr) = l.backend {
        let mut pool = Pool::single(&l.name, addr, Duration::ZERO);
        pool.servers[0].state = pools.state_for(&l.name, addr);
        pool.proxy_protocol = l.proxy_protocol;
        pool.backend_tls = crate::backend_tls::build(config, i, token)?;
        return Ok(Some(Arc::new(RouteTable::new(
            Vec::new(),
            Some(Arc::new(pool)),
        ))));
    }
    let mut built: HashMap<&str, Arc<Pool>> = HashMap::new();
    let mut pool = |name: &str| -> Result<Arc<Pool>> {
        if let Some(p) = built.get(name) {
            return Ok(p.clone());
        }
        let (k, cfg) = config
            .pools
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == name)
            .ok_or_else(|| anyhow::anyhow!("listener[{i}]: no [[backend]] named {name:?}"))?;
        let p = Arc::new(pool_from(config, k, cfg, token, pools)?);
        built.insert(cfg.name.as_str(), p.clone());
        Ok(p)
    };
    let mut routes = Vec::new();
    for r in &l.routes {
        routes.push(Route::new(
            SniMatch::parse(r.sni.as_deref()),
            r.alpn.as_ref().map(|a| a.as_bytes().to_vec()),
            pool(&r.backend)?,
        ));
    }
    let default = l.default_backend.as_deref().map(&mut pool).transpose()?;
    Ok(Some(Arc::new(RouteTable::new(routes, default))))
}

fn pool_from(
    config: &Config,
    k: usize,
    c: &PoolConfig,
    token: Option<&Arc<Token>>,
    pools: &Pools,
) -> Result<Pool> {
    let servers = c
        .servers
        .iter()
        .map(|s| Server {
            addr: s.address,
            weight: s.weight,
            max_connections: s.max_connections,
            state: pools.state_for(&c.name, s.address),
        })
        .collect();
    let mut p = Pool::new(
        &c.name,
        servers,
        c.alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
    );
    p.alpn_optional = !c.alpn_required;
    p.balance = match c.balance {
        BalanceConfig::RoundRobin => Balance::RoundRobin,
        BalanceConfig::LeastConnections => Balance::LeastConnections,
        BalanceConfig::ConsistentHash => Balance::ConsistentHash,
    };
    p.connect_timeout = Duration::from_millis(c.connect_timeout_ms);
    p.retries = c.retries;
    p.ejection = Ejection {
        after: c.eject_after,
        backoff: Duration::from_millis(c.eject_backoff_ms),
    };
    p.proxy_protocol = c.proxy_protocol;
    p.backend_tls = c
        .backend_tls
        .as_ref()
        .map(|bt| {
            crate::backend_tls::build_with(
                config,
                bt,
                &format!("backend[{k}].backend_tls ({})", c.name),
                token,
            )
        })
        .transpose()?;
    p.health_check = c.health_check.as_ref().map(|h| HealthCheck {
        probe: match h.kind {
            CheckKind::Tcp => Probe::Tcp,
            CheckKind::Tls => Probe::Tls,
            CheckKind::Http => Probe::Http {
                path: h.path.clone().unwrap_or_else(|| "/".into()),
                expect_status: h.expect_status,
            },
        },
        interval: Duration::from_millis(h.interval_ms),
        timeout: Duration::from_millis(h.timeout_ms),
        rise: h.rise,
        fall: h.fall,
    });
    Ok(p)
}

/// Every pool of the published snapshot, each once (by name; the first listener's copy).
pub fn published(dp_routes: &[(String, Arc<RouteTable>)]) -> Vec<Arc<Pool>> {
    let mut out: Vec<Arc<Pool>> = Vec::new();
    for (_, t) in dp_routes {
        for p in t.pools() {
            if !out.iter().any(|o| o.name == p.name) {
                out.push(p);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_state_is_kept_per_appliance() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let (one, two) = (Pools::new(), Pools::new());
        let s = one.state_for("app", addr);
        s.set_admin(tlsgate_dataplane::pool::AdminState::Drain);
        // A rebuild of the same appliance finds the server's state (drained) again ...
        assert!(Arc::ptr_eq(&s, &one.state_for("app", addr)));
        // ... another appliance in the same process does not see it.
        let other = two.state_for("app", addr);
        assert!(!Arc::ptr_eq(&s, &other));
        assert_ne!(other.admin(), s.admin());
    }
}
