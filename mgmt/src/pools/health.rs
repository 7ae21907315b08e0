//! Active health checks of backend servers, on threads of their own (never a data-plane core):
//! one scheduler thread (`tlsgate-health`) that starts each due check on a short-lived thread
//! (`tlsgate-health-check`), so a server that hangs holds only its own check, and applies rise
//! and fall to the verdicts. The verdict reaches the cores through [`ServerState::set_up`].

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tlsgate_dataplane::pool::{Pool, Probe};

/// How often the scheduler looks for due checks.
const TICK: Duration = Duration::from_millis(50);
/// Bytes of an answer read at most to find its status line.
const MAX_STATUS_LINE: usize = 1024;
/// The PROXY v2 header of a connection made by the proxy itself (`LOCAL`, no addresses).
const PROXY_V2_LOCAL: [u8; 16] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0x00, 0x00,
];

/// Starts the scheduler of one appliance's pools; it ends when the appliance is gone.
pub(super) fn start(pools: std::sync::Weak<super::Pools>) {
    let spawned = std::thread::Builder::new()
        .name("tlsgate-health".into())
        .spawn(move || run(&pools));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the backend health checker");
    }
}

#[derive(Default)]
struct Track {
    next_due: Option<Instant>,
    in_flight: bool,
    passes: u32,
    fails: u32,
}

type Key = (String, SocketAddr);

fn run(owner: &std::sync::Weak<super::Pools>) {
    crate::sandbox::enter_thread("tlsgate-health");
    let mut tracks: HashMap<Key, Track> = HashMap::new();
    let (tx, rx) = mpsc::channel::<(Key, Result<(), String>)>();
    loop {
        std::thread::sleep(TICK);
        let Some(pools) = owner.upgrade().map(|p| p.view()) else {
            return;
        };
        let now = Instant::now();
        let mut live = std::collections::HashSet::new();
        for pool in pools.iter().filter(|p| p.health_check.is_some()) {
            let Some(check) = &pool.health_check else {
                continue;
            };
            for (i, s) in pool.servers.iter().enumerate() {
                let key = (pool.name.clone(), s.addr);
                live.insert(key.clone());
                let t = tracks.entry(key.clone()).or_default();
                if t.in_flight || t.next_due.is_some_and(|d| now < d) {
                    continue;
                }
                t.next_due = Some(now + check.interval);
                t.in_flight = true;
                let (pool, tx, k) = (pool.clone(), tx.clone(), key.clone());
                let spawned = std::thread::Builder::new()
                    .name("tlsgate-health-check".into())
                    .spawn(move || {
                        let r = probe(&pool, i);
                        let _ = tx.send((k, r));
                    });
                if spawned.is_err() {
                    if let Some(t) = tracks.get_mut(&key) {
                        t.in_flight = false;
                    }
                }
            }
        }
        while let Ok((key, verdict)) = rx.try_recv() {
            let Some(t) = tracks.get_mut(&key) else {
                continue;
            };
            t.in_flight = false;
            let Some(pool) = pools.iter().find(|p| p.name == key.0) else {
                continue;
            };
            let (Some(check), Some(server)) = (
                &pool.health_check,
                pool.servers.iter().find(|s| s.addr == key.1),
            ) else {
                continue;
            };
            let up = server.state.is_up();
            match verdict {
                Ok(()) => {
                    t.fails = 0;
                    t.passes = t.passes.saturating_add(1);
                    if !up && t.passes >= check.rise {
                        server.state.set_up(true);
                        tracing::warn!(pool = %key.0, server = %key.1, passes = t.passes, "backend server UP: health checks pass");
                    }
                }
                Err(why) => {
                    t.passes = 0;
                    t.fails = t.fails.saturating_add(1);
                    if up && t.fails >= check.fall {
                        server.state.set_up(false);
                        tracing::warn!(pool = %key.0, server = %key.1, failures = t.fails, reason = %why, "backend server DOWN: health checks fail");
                    }
                }
            }
        }
        // A server that left the published pools is forgotten (in-flight checks report to
        // nothing). One that comes back starts counting afresh.
        tracks.retain(|k, _| live.contains(k));
    }
}

/// One check of server `i` of `pool`, bounded by the check's timeout.
pub fn probe(pool: &Pool, i: usize) -> Result<(), String> {
    let (Some(check), Some(server)) = (&pool.health_check, pool.servers.get(i)) else {
        return Ok(());
    };
    let deadline = Instant::now() + check.timeout;
    let mut sock = TcpStream::connect_timeout(&server.addr, check.timeout)
        .map_err(|e| format!("connect: {e}"))?;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| "timed out".to_string())
    };
    sock.set_read_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    if matches!(check.probe, Probe::Tcp) {
        return Ok(());
    }
    if pool.proxy_protocol {
        sock.write_all(&PROXY_V2_LOCAL)
            .map_err(|e| format!("PROXY header: {e}"))?;
    }
    let request = match &check.probe {
        Probe::Http { path, .. } => Some(format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: tlsgate-health-check\r\nConnection: close\r\n\r\n",
            server.addr
        )),
        _ => None,
    };
    let answer = match &pool.backend_tls {
        Some(bt) => {
            let conn = rustls::ClientConnection::new(bt.config.clone(), bt.server_name.clone())
                .map_err(|e| format!("TLS: {e}"))?;
            let mut tls = rustls::StreamOwned::new(conn, sock);
            while tls.conn.is_handshaking() {
                tls.conn
                    .complete_io(&mut tls.sock)
                    .map_err(|e| format!("TLS handshake: {e}"))?;
            }
            match &request {
                Some(req) => exchange(&mut tls, req)?,
                None => {
                    tls.conn.send_close_notify();
                    let _ = tls.conn.complete_io(&mut tls.sock);
                    return Ok(());
                }
            }
        }
        None => match &request {
            Some(req) => exchange(&mut sock, req)?,
            None => return Ok(()),
        },
    };
    if let Probe::Http { expect_status, .. } = &check.probe {
        let status = parse_status(&answer).ok_or("no HTTP status line in the answer")?;
        if status != *expect_status {
            return Err(format!("status {status}, expected {expect_status}"));
        }
    }
    Ok(())
}

/// Writes `req`, reads until the status line is complete (or the bound).
fn exchange(s: &mut impl ReadWrite, req: &str) -> Result<Vec<u8>, String> {
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let _ = s.flush();
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while buf.len() < MAX_STATUS_LINE && !buf.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(buf)
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The status of `HTTP/1.x NNN ...`.
fn parse_status(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Busy\r\nx"), Some(503));
        assert_eq!(parse_status(b"SSH-2.0-x\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }
}
