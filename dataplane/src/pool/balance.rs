//! How a pool chooses a server for a new connection.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;

use super::Pool;

/// The balancing algorithm of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Weighted round robin: over every `sum of weights` connections each server gets its
    /// weight's share.
    RoundRobin,
    /// The server with the fewest open connections relative to its weight.
    LeastConnections,
    /// Weighted rendezvous hashing of the client's IP address: a client keeps its server while
    /// that server is available, and a server that leaves moves only its own clients.
    ConsistentHash,
}

/// Chooses among the servers `ok` lets through; `n` is the pool's rotating counter.
pub(super) fn pick(
    pool: &Pool,
    client: SocketAddr,
    n: u64,
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let servers = &pool.servers;
    match pool.balance {
        Balance::RoundRobin => {
            let total: u64 = (0..servers.len())
                .filter(|&i| ok(i))
                .map(|i| u64::from(servers[i].weight))
                .sum();
            if total == 0 {
                return None;
            }
            let mut r = n % total;
            for (i, s) in servers.iter().enumerate() {
                if !ok(i) {
                    continue;
                }
                let w = u64::from(s.weight);
                if r < w {
                    return Some(i);
                }
                r -= w;
            }
            None
        }
        Balance::LeastConnections => {
            let len = servers.len();
            if len == 0 {
                return None;
            }
            let start = usize::try_from(n % len as u64).unwrap_or(0);
            let mut best: Option<(usize, u64, u64)> = None;
            for k in 0..len {
                let i = (start + k) % len;
                if !ok(i) {
                    continue;
                }
                let active = servers[i].state.active.load(Relaxed);
                let w = u64::from(servers[i].weight.max(1));
                let better = match best {
                    None => true,
                    // active_i / w_i < active_b / w_b without division.
                    Some((_, a, bw)) => {
                        u128::from(active) * u128::from(bw) < u128::from(a) * u128::from(w)
                    }
                };
                if better {
                    best = Some((i, active, w));
                }
            }
            best.map(|(i, _, _)| i)
        }
        Balance::ConsistentHash => {
            let mut best: Option<(usize, f64)> = None;
            for (i, s) in servers.iter().enumerate() {
                if !ok(i) {
                    continue;
                }
                let score = rendezvous_score(client.ip(), s.addr, s.weight);
                if best.is_none_or(|(_, b)| score > b) {
                    best = Some((i, score));
                }
            }
            best.map(|(i, _)| i)
        }
    }
}

/// Weighted rendezvous score: `-weight / ln(u)` with `u` in (0, 1) from a hash of the pair.
fn rendezvous_score(client: IpAddr, server: SocketAddr, weight: u32) -> f64 {
    // Fixed keys: every core and every process (a fleet) maps a client the same way.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x746c_7367_6174_6521, 0x706f_6f6c_7321);
    client.hash(&mut h);
    server.hash(&mut h);
    let bits = h.finish() >> 11; // 53 bits: exact in an f64
    let u = (bits as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight) / u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{Pool, Server, ServerState};
    use std::sync::Arc;

    fn pool(weights: &[u32], balance: Balance) -> Pool {
        let servers = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Server {
                addr: SocketAddr::from(([10, 0, 0, 1 + i as u8], 80)),
                weight,
                max_connections: 0,
                state: Arc::new(ServerState::default()),
            })
            .collect();
        let mut p = Pool::new("p", servers, Vec::new());
        p.balance = balance;
        p
    }

    fn client(i: u32) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from(0xC0A8_0000 + i), 40000))
    }

    #[test]
    fn weighted_round_robin_gives_each_its_share_exactly() {
        let p = pool(&[1, 2, 0, 3], Balance::RoundRobin);
        let mut counts = [0; 4];
        for _ in 0..600 {
            counts[p.pick(client(1), 0).expect("a server")] += 1;
        }
        assert_eq!(counts, [100, 200, 0, 300]);
    }

    #[test]
    fn an_unavailable_or_tried_server_is_skipped() {
        let p = pool(&[1, 1, 1], Balance::RoundRobin);
        p.servers[1].state.set_up(false);
        for _ in 0..30 {
            let i = p.pick(client(1), 0b001).expect("a server");
            assert_eq!(i, 2);
        }
        assert_eq!(p.pick(client(1), 0b101), None);
    }

    #[test]
    fn least_connections_prefers_the_least_loaded_by_weight() {
        let p = pool(&[1, 1, 2], Balance::LeastConnections);
        p.servers[0].state.active.store(3, Relaxed);
        p.servers[1].state.active.store(1, Relaxed);
        p.servers[2].state.active.store(3, Relaxed); // 1.5 per weight
        assert_eq!(p.pick(client(1), 0), Some(1));
        p.servers[1].state.active.store(2, Relaxed);
        assert_eq!(p.pick(client(1), 0), Some(2));
    }

    #[test]
    fn consistent_hash_keeps_clients_and_moves_only_those_of_a_lost_server() {
        let p = pool(&[1, 1, 1], Balance::ConsistentHash);
        let before: Vec<usize> = (0..300)
            .map(|c| p.pick(client(c), 0).expect("a server"))
            .collect();
        for _ in 0..3 {
            let again: Vec<usize> = (0..300)
                .map(|c| p.pick(client(c), 0).expect("a server"))
                .collect();
            assert_eq!(before, again);
        }
        let mut counts = [0; 3];
        for &i in &before {
            counts[i] += 1;
        }
        assert!(counts.iter().all(|&c| c > 60), "spread: {counts:?}");
        p.servers[1].state.set_up(false);
        for (c, &was) in before.iter().enumerate() {
            let now = p.pick(client(c as u32), 0).expect("a server");
            if was != 1 {
                assert_eq!(now, was, "client {c} moved though its server stayed");
            } else {
                assert_ne!(now, 1);
            }
        }
    }
}
