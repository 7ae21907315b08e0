//! Limits an attacker could push: open connections per core and handshakes in flight pause
//! accept (counted) instead of growing, and resume when room is made; a backend that never
//! answers a SYN fails that connection at the backend connect timeout.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use tlsgate_dataplane::{CloseReason, DataplaneConfig, Limits};

fn one_core(limits: Limits) -> DataplaneConfig {
    let mut cfg = DataplaneConfig::new(vec![0]);
    cfg.limits = limits;
    cfg
}

/// Whether a new client completes its handshake within `wait`.
fn handshake_within(
    a: SocketAddr,
    cc: &std::sync::Arc<rustls::ClientConfig>,
    wait: Duration,
) -> bool {
    let Ok(mut t) = try_connect(a, cc) else {
        return false;
    };
    if t.sock.set_read_timeout(Some(wait)).is_err() {
        return false;
    }
    handshake(&mut t).is_ok()
}

#[test]
fn connections_per_core_pause_accept_until_one_closes() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let backend = echo_backend();
    for io in drivers() {
        let limits = Limits {
            max_connections_per_core: 3,
            ..Limits::default()
        };
        let Some(dp) = start_dp(
            one_core(limits),
            io,
            vec![listener("l", tls.clone(), backend)],
        ) else {
            continue;
        };
        let a = addr(&dp);
        let cc = client_config(&p, all_versions());
        let mut open: Vec<Tls> = (0..3)
            .map(|i| {
                let mut t = connect(a, &cc);
                assert_eq!(
                    echo_once(&mut t, format!("c{i}").as_bytes()).expect("echo"),
                    format!("c{i}").as_bytes()
                );
                t
            })
            .collect();
        // The fourth waits in the kernel's backlog: no handshake while three are open.
        assert!(
            !handshake_within(a, &cc, Duration::from_millis(500)),
            "{io:?}: a 4th connection was served"
        );
        eventually("accept pause counted", || dp.stats().accept_paused > 0);
        drop(open.pop());
        assert!(
            handshake_within(a, &cc, Duration::from_secs(5)),
            "{io:?}: accept did not resume"
        );
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

#[test]
fn handshakes_in_flight_pause_accept_until_one_ends() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let backend = echo_backend();
    for io in drivers() {
        let limits = Limits {
            max_handshakes_in_flight: 2,
            handshake_timeout_ms: 10_000,
            ..Limits::default()
        };
        let Some(dp) = start_dp(
            one_core(limits),
            io,
            vec![listener("l", tls.clone(), backend)],
        ) else {
            continue;
        };
        let a = addr(&dp);
        let cc = client_config(&p, all_versions());
        // Two clients that connect and never speak hold both handshake slots.
        let mut silent: Vec<TcpStream> = (0..2)
            .map(|_| TcpStream::connect(a).expect("connect"))
            .collect();
        eventually("two handshakes in flight", || {
            dp.stats().handshakes_in_flight == 2
        });
        assert!(
            !handshake_within(a, &cc, Duration::from_millis(500)),
            "{io:?}: a 3rd handshake was served"
        );
        eventually("accept pause counted", || dp.stats().accept_paused > 0);
        drop(silent.pop());
        assert!(
            handshake_within(a, &cc, Duration::from_secs(5)),
            "{io:?}: accept did not resume"
        );
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

#[test]
fn a_backend_that_never_answers_times_out() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let hole = blackhole();
    for io in drivers() {
        let connect_timeout = Duration::from_millis(300);
        let limits = Limits {
            backend_connect_timeout_ms: connect_timeout.as_millis() as u64,
            ..Limits::default()
        };
        let Some(dp) = start_dp(
            one_core(limits),
            io,
            vec![listener("l", tls.clone(), hole.addr)],
        ) else {
            continue;
        };
        let cc = client_config(&p, all_versions());
        let mut t = connect(addr(&dp), &cc);
        let start = Instant::now();
        let r = echo_once(&mut t, b"anyone there?");
        assert!(
            r.map_or(true, |b| b.is_empty()),
            "{io:?}: nothing can answer"
        );
        eventually("backend connect timeout counted", || {
            dp.stats().closed(CloseReason::BackendConnectTimeout) >= 1
        });
        // Closed by the connect timeout, not by the default idle or handshake timeouts (tens of
        // seconds); a wide multiple of it for a loaded machine.
        assert!(
            start.elapsed() < 15 * connect_timeout,
            "{io:?}: closed after {:?} (connect timeout {connect_timeout:?})",
            start.elapsed()
        );
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}
