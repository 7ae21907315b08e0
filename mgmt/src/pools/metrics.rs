//! Pool, server and route metrics, read from the published pools' atomics once a second by
//! `tlsgate serve` (the cores count; nothing here is on a connection's path).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use parking_lot::Mutex;
use tlsgate_dataplane::pool::RouteTable;

/// 1 when the server may take new connections (ready, healthy, not ejected), else 0.
pub const BACKEND_UP: &str = "tlsgate_backend_up";
/// Connections open through the server now.
pub const BACKEND_ACTIVE: &str = "tlsgate_backend_active_connections";
/// Connections made to the server (attempts included).
pub const BACKEND_CONNECTIONS_TOTAL: &str = "tlsgate_backend_connections_total";
/// Failed connects by reason (`refused`, `timeout`).
pub const BACKEND_CONNECT_ERRORS_TOTAL: &str = "tlsgate_backend_connect_errors_total";
/// Passive ejections of the server.
pub const BACKEND_EJECTIONS_TOTAL: &str = "tlsgate_backend_ejections_total";
/// Connect latency of successful connects.
pub const BACKEND_CONNECT_SECONDS: &str = "tlsgate_backend_connect_duration_seconds";
/// Connects retried on another server, per pool.
pub const POOL_RETRIES_TOTAL: &str = "tlsgate_pool_retries_total";
/// Connections closed because no server of the pool could take them.
pub const POOL_NO_HEALTHY_TOTAL: &str = "tlsgate_pool_no_healthy_backend_total";
/// ClientHellos routed, by listener and route (`sni|alpn`, `default`).
pub const ROUTE_HITS_TOTAL: &str = "tlsgate_route_hits_total";

/// Registers descriptions (once, beside the others).
pub fn describe() {
    metrics::describe_gauge!(
        BACKEND_UP,
        "1 when the backend server takes new connections (ready, healthy, not ejected)."
    );
    metrics::describe_gauge!(
        BACKEND_ACTIVE,
        "Connections open through the backend server."
    );
    metrics::describe_counter!(
        BACKEND_CONNECTIONS_TOTAL,
        "Connections made to the backend server."
    );
    metrics::describe_counter!(
        BACKEND_CONNECT_ERRORS_TOTAL,
        "Failed connects to the backend server by reason."
    );
    metrics::describe_counter!(
        BACKEND_EJECTIONS_TOTAL,
        "Passive ejections after connect failures."
    );
    metrics::describe_histogram!(
        BACKEND_CONNECT_SECONDS,
        metrics::Unit::Seconds,
        "Connect latency to the backend server."
    );
    metrics::describe_counter!(
        POOL_RETRIES_TOTAL,
        "Connects retried on another server of the pool."
    );
    metrics::describe_counter!(
        POOL_NO_HEALTHY_TOTAL,
        "Connections closed because no server of the pool could take them."
    );
    metrics::describe_counter!(
        ROUTE_HITS_TOTAL,
        "ClientHellos routed, by listener and route."
    );
}

/// What was published last: per-copy counter values (pools and route tables are rebuilt on
/// reload, so their own counters start again; the exporter's counters must not), and each
/// server's position in its latency ring.
#[derive(Default)]
struct Seen {
    last: HashMap<(usize, String), u64>,
    latency_read: HashMap<(String, std::net::SocketAddr), u64>,
}

// Process-wide by nature: what was added to the process-wide metrics recorder's counters.
static SEEN: Mutex<Option<Seen>> = Mutex::new(None);

/// The increase of the counter `key` of the object at `ptr` since the last call.
fn delta(
    seen: &mut Seen,
    live: &mut HashSet<(usize, String)>,
    ptr: usize,
    key: String,
    v: u64,
) -> u64 {
    let k = (ptr, key);
    live.insert(k.clone());
    let before = seen.last.insert(k, v).unwrap_or(0);
    v.saturating_sub(before)
}

/// Publishes everything for the published route tables (by listener).
pub fn publish(routes: &[(String, Arc<RouteTable>)]) {
    let mut guard = SEEN.lock();
    let seen = guard.get_or_insert_with(Seen::default);
    let mut live = HashSet::new();
    let mut pools_done = HashSet::new();
    let mut servers_done = HashSet::new();
    let now = tlsgate_dataplane::pool::health::now_ms();
    for (listener, table) in routes {
        let tptr = Arc::as_ptr(table) as usize;
        for r in &table.routes {
            let label = r.label();
            let d = delta(seen, &mut live, tptr, label.clone(), r.hits.load(Relaxed));
            metrics::counter!(ROUTE_HITS_TOTAL, "listener" => listener.clone(), "route" => label)
                .increment(d);
        }
        let d = delta(
            seen,
            &mut live,
            tptr,
            "default".into(),
            table.default_hits.load(Relaxed),
        );
        metrics::counter!(ROUTE_HITS_TOTAL, "listener" => listener.clone(), "route" => "default")
            .increment(d);
        for pool in table.pools() {
            let pptr = Arc::as_ptr(&pool) as usize;
            if !pools_done.insert(pptr) {
                continue;
            }
            let name = pool.name.clone();
            let d = delta(
                seen,
                &mut live,
                pptr,
                "retries".into(),
                pool.retries_total.load(Relaxed),
            );
            metrics::counter!(POOL_RETRIES_TOTAL, "pool" => name.clone()).increment(d);
            let d = delta(
                seen,
                &mut live,
                pptr,
                "no_healthy".into(),
                pool.no_healthy_total.load(Relaxed),
            );
            metrics::counter!(POOL_NO_HEALTHY_TOTAL, "pool" => name.clone()).increment(d);
            for s in &pool.servers {
                let key = (name.clone(), s.addr);
                if !servers_done.insert(key.clone()) {
                    continue;
                }
                let server = s.addr.to_string();
                let labels = [("pool", name.clone()), ("server", server)];
                let st = &s.state;
                metrics::gauge!(BACKEND_UP, &labels).set(if st.accepts_new(now) {
                    1.0
                } else {
                    0.0
                });
                metrics::gauge!(BACKEND_ACTIVE, &labels).set(st.active.load(Relaxed) as f64);
                metrics::counter!(BACKEND_CONNECTIONS_TOTAL, &labels)
                    .absolute(st.total.load(Relaxed));
                metrics::counter!(BACKEND_EJECTIONS_TOTAL, &labels)
                    .absolute(st.ejections.load(Relaxed));
                for (reason, v) in [
                    ("refused", &st.connect_refused),
                    ("timeout", &st.connect_timeouts),
                ] {
                    let mut l = labels.to_vec();
                    l.push(("reason", reason.to_string()));
                    metrics::counter!(BACKEND_CONNECT_ERRORS_TOTAL, &l).absolute(v.load(Relaxed));
                }
                let read = seen.latency_read.entry(key).or_insert(0);
                let h = metrics::histogram!(BACKEND_CONNECT_SECONDS, &labels);
                for secs in st.latencies_since(read) {
                    h.record(secs);
                }
            }
        }
    }
    seen.last.retain(|k, _| live.contains(k));
    seen.latency_read.retain(|k, _| servers_done.contains(k));
}
