//! Backend pools through the real data plane on both io drivers, with rustls clients and real
//! TCP backends: routing by SNI and ALPN, the protocol the server answers with, balancing, a dead
//! server retried and ejected, every server gone.

mod common;

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tlsgate_dataplane::conn::CloseReason;
use tlsgate_dataplane::pool::{
    AdminState, Balance, Ejection, Pool, Route, RouteTable, Server, ServerState, SniMatch,
};
use tlsgate_dataplane::DataplaneConfig;

const NAMES: &[&str] = &[
    "localhost",
    "api.example.com",
    "www.example.com",
    "a.wild.test",
    "other.test",
];

/// A backend that says its name on each connection, then echoes.
fn named_backend(name: &'static str) -> SocketAddr {
    tcp_backend(move |mut s| {
        let _ = writeln!(s, "{name}");
        echo(s);
    })
}

/// An address nothing listens on (bound, then closed).
fn dead_address() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn server(addr: SocketAddr, weight: u32) -> Server {
    Server {
        addr,
        weight,
        max_connections: 0,
        state: Arc::new(ServerState::default()),
    }
}

fn pool(name: &str, servers: Vec<Server>, alpn: &[&str], balance: Balance) -> Arc<Pool> {
    let mut p = Pool::new(
        name,
        servers,
        alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
    );
    p.balance = balance;
    p.connect_timeout = Duration::from_secs(2);
    p.retries = 2;
    p.ejection = Ejection {
        after: 2,
        backoff: Duration::from_secs(60),
    };
    Arc::new(p)
}

fn client(p: &Pki, alpn: &[&str]) -> Arc<ClientConfig> {
    let mut cfg = (*client_config(p, all_versions())).clone();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// Connects with `sni`, completes the handshake and reads the backend's name line. Errors are
/// the handshake's (an alert) or the connection's.
fn visit(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    sni: &str,
) -> io::Result<(String, Option<Vec<u8>>)> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ClientConnection::new(
        cfg.clone(),
        ServerName::try_from(sni.to_string()).map_err(io::Error::other)?,
    )
    .map_err(io::Error::other)?;
    let mut t = rustls::StreamOwned::new(conn, sock);
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock)?;
    }
    let alpn = t.conn.alpn_protocol().map(<[u8]>::to_vec);
    let mut line = String::new();
    BufReader::new(&mut t).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before the backend spoke",
        ));
    }
    Ok((line.trim().to_string(), alpn))
}

fn alert_of(e: &io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

fn dp_config() -> DataplaneConfig {
    DataplaneConfig::new(cores())
}

#[test]
fn sni_and_alpn_routes_choose_the_pool_and_the_protocol() {
    let p = pki_for(KeyKind::Ecdsa, NAMES);
    let (tls, _) = server_config(&p, None);
    for io in drivers() {
        let web = pool(
            "web",
            vec![server(named_backend("web"), 1)],
            &["h2", "http/1.1"],
            Balance::RoundRobin,
        );
        let api = pool(
            "api",
            vec![server(named_backend("api"), 1)],
            &["http/1.1"],
            Balance::RoundRobin,
        );
        let wild = pool(
            "wild",
            vec![server(named_backend("wild"), 1)],
            &[],
            Balance::RoundRobin,
        );
        let acme = pool(
            "acme",
            vec![server(named_backend("acme"), 1)],
            &[],
            Balance::RoundRobin,
        );
        let with_default = RouteTable::new(
            vec![
                Route::new(SniMatch::parse(Some("api.example.com")), None, api.clone()),
                Route::new(SniMatch::parse(Some("*.wild.test")), None, wild.clone()),
                Route::new(SniMatch::Any, Some(b"acme-tls/1".to_vec()), acme),
            ],
            Some(web.clone()),
        );
        let without_default = RouteTable::new(
            vec![Route::new(
                SniMatch::parse(Some("api.example.com")),
                None,
                api,
            )],
            None,
        );
        let mut a = listener("a", tls.clone(), dead_address());
        a.routes = Some(Arc::new(with_default));
        let mut b = listener("b", tls.clone(), dead_address());
        b.routes = Some(Arc::new(without_default));
        let Some(dp) = start_dp(dp_config(), io, vec![a, b]) else {
            continue;
        };
        let addrs = dp.local_addrs();
        let (a, b) = (addrs[0].1, addrs[1].1);

        let h2 = client(&p, &["h2", "http/1.1"]);
        let none = client(&p, &[]);
        assert_eq!(
            visit(a, &h2, "www.example.com").expect("served"),
            ("web".into(), Some(b"h2".to_vec())),
            "{io:?}"
        );
        assert_eq!(
            visit(a, &client(&p, &["http/1.1", "h2"]), "www.example.com")
                .expect("served")
                .1,
            Some(b"http/1.1".to_vec()),
            "the client's order"
        );
        assert_eq!(
            visit(a, &h2, "api.example.com").expect("served"),
            ("api".into(), Some(b"http/1.1".to_vec()))
        );
        assert_eq!(
            visit(a, &h2, "a.wild.test").expect("served"),
            ("wild".into(), None),
            "a pool without ALPN answers none"
        );
        assert_eq!(
            visit(a, &none, "other.test").expect("served"),
            ("web".into(), None),
            "unknown name: the default"
        );
        assert_eq!(
            visit(a, &client(&p, &["acme-tls/1"]), "www.example.com").expect("served"),
            ("acme".into(), Some(b"acme-tls/1".to_vec()))
        );
        let e = visit(a, &client(&p, &["foo"]), "api.example.com").expect_err("refused");
        assert_eq!(
            alert_of(&e),
            Some(rustls::AlertDescription::NoApplicationProtocol),
            "{e}"
        );
        assert_eq!(visit(b, &none, "api.example.com").expect("served").0, "api");
        let e = visit(b, &none, "other.test").expect_err("refused");
        assert_eq!(
            alert_of(&e),
            Some(rustls::AlertDescription::UnrecognisedName),
            "{e}"
        );
        // Counted when the core finishes the connection, just after the alert went out.
        eventually("both alerts counted", || {
            let s = dp.stats();
            s.closed(CloseReason::NoApplicationProtocol) == 1
                && s.closed(CloseReason::UnknownSni) == 1
        });
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

/// Names of the backends that answered `n` connections from this client.
fn spread(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let (name, _) = visit(addr, cfg, "localhost").expect("every connection is served");
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

#[test]
fn balancing_spreads_and_a_dead_server_is_retried_then_ejected() {
    let p = pki_for(KeyKind::Ecdsa, NAMES);
    let (tls, _) = server_config(&p, None);
    let cfg = client(&p, &[]);
    for io in drivers() {
        let (b1, b2, b3) = (
            named_backend("one"),
            named_backend("two"),
            named_backend("three"),
        );
        let dead = server(dead_address(), 1);
        let dead_state = dead.state.clone();
        let rr = pool(
            "rr",
            vec![server(b1, 1), server(b2, 2), dead, server(b3, 1)],
            &[],
            Balance::RoundRobin,
        );
        let hash = pool(
            "hash",
            vec![server(b1, 1), server(b2, 1), server(b3, 1)],
            &[],
            Balance::ConsistentHash,
        );
        let mut a = listener("rr", tls.clone(), dead_address());
        a.routes = Some(Arc::new(RouteTable::new(Vec::new(), Some(rr.clone()))));
        let mut h = listener("hash", tls.clone(), dead_address());
        h.routes = Some(Arc::new(RouteTable::new(Vec::new(), Some(hash.clone()))));
        let Some(dp) = start_dp(dp_config(), io, vec![a, h]) else {
            continue;
        };
        let addrs = dp.local_addrs();

        // Weighted round robin over 1:2:1 (the dead server's share goes to the others once it
        // is out). Every connection is served: a refused connect is retried on another server.
        let counts = spread(addrs[0].1, &cfg, 200);
        assert_eq!(counts.values().sum::<usize>(), 200);
        let (one, two, three) = (counts["one"], counts["two"], counts["three"]);
        assert!(
            two > one + one / 2 && two > three + three / 2,
            "weight 2 gets about twice: {counts:?}"
        );
        assert!(
            one.abs_diff(three) <= 20,
            "equal weights, equal shares: {counts:?}"
        );
        // Two failures in a row ejected it; it was not tried again during the back-off.
        assert_eq!(dead_state.connect_refused.load(Relaxed), 2, "{io:?}");
        assert_eq!(dead_state.ejections.load(Relaxed), 1);
        assert!(rr.retries_total.load(Relaxed) >= 2);

        // Consistent hashing: one client address, one backend.
        let counts = spread(addrs[1].1, &cfg, 30);
        assert_eq!(
            counts.len(),
            1,
            "one client stays on one server: {counts:?}"
        );

        // Drain every server: a clean close, counted as no_healthy_backend.
        for s in &hash.servers {
            s.state.set_admin(AdminState::Drain);
        }
        let e = visit(addrs[1].1, &cfg, "localhost").expect_err("refused");
        // Clean: close_notify after the handshake (rustls reads a clean end of stream, not
        // "peer closed connection without sending TLS close_notify").
        assert!(
            e.to_string().contains("closed before the backend spoke"),
            "{e}"
        );
        eventually("no_healthy_backend counted", || {
            dp.stats().closed(CloseReason::NoHealthyBackend) == 1
        });
        assert_eq!(hash.no_healthy_total.load(Relaxed), 1);
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

/// A backend behind PROXY v2: reads the header and answers with the ALPN TLV's value.
fn proxy_alpn_backend() -> SocketAddr {
    tcp_backend(|mut s| {
        let mut head = [0u8; 16];
        if io::Read::read_exact(&mut s, &mut head).is_err() {
            return;
        }
        let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        let mut rest = vec![0u8; len];
        if io::Read::read_exact(&mut s, &mut rest).is_err() {
            return;
        }
        let skip = match head[13] {
            0x11 => 12,
            0x21 => 36,
            _ => 0,
        };
        let mut tlvs = rest.get(skip..).unwrap_or_default();
        let mut alpn = "-".to_string();
        while let [t, hi, lo, tail @ ..] = tlvs {
            let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
            if *t == 0x01 {
                alpn = String::from_utf8_lossy(&tail[..n]).into_owned();
            }
            tlvs = &tail[n..];
        }
        let _ = writeln!(s, "alpn={alpn}");
    })
}

#[test]
fn the_negotiated_protocol_reaches_the_backend_in_the_proxy_header() {
    let p = pki_for(KeyKind::Ecdsa, NAMES);
    let (tls, _) = server_config(&p, None);
    for io in drivers() {
        let mut pool = Pool::new(
            "proxied",
            vec![server(proxy_alpn_backend(), 1)],
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        );
        pool.proxy_protocol = true;
        let mut l = listener("proxied", tls.clone(), dead_address());
        l.routes = Some(Arc::new(RouteTable::new(Vec::new(), Some(Arc::new(pool)))));
        let Some(dp) = start_dp(dp_config(), io, vec![l]) else {
            continue;
        };
        let a = addr(&dp);
        let (line, alpn) = visit(a, &client(&p, &["h2", "http/1.1"]), "localhost").expect("served");
        assert_eq!(
            (line.as_str(), alpn.as_deref()),
            ("alpn=h2", Some(&b"h2"[..])),
            "{io:?}"
        );
        let (line, _) = visit(a, &client(&p, &["http/1.1"]), "localhost").expect("served");
        assert_eq!(line, "alpn=http/1.1");
        let (line, _) = visit(a, &client(&p, &[]), "localhost").expect("served");
        assert_eq!(line, "alpn=-");
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

#[test]
fn a_server_that_never_answers_is_given_up_at_its_connect_timeout_and_the_next_serves() {
    let p = pki_for(KeyKind::Ecdsa, NAMES);
    let (tls, _) = server_config(&p, None);
    let hole = blackhole();
    let connect_timeout = Duration::from_millis(300);
    for io in drivers() {
        let mut pool = Pool::new(
            "half-dead",
            vec![server(hole.addr, 1), server(named_backend("alive"), 1)],
            Vec::new(),
        );
        pool.balance = Balance::RoundRobin;
        pool.connect_timeout = connect_timeout;
        pool.retries = 2;
        // Not ejected within this test: every visit that starts at the hole must time out.
        pool.ejection = Ejection {
            after: 100,
            backoff: Duration::from_secs(60),
        };
        let pool = Arc::new(pool);
        let mut l = listener("l", tls.clone(), dead_address());
        l.routes = Some(Arc::new(RouteTable::new(Vec::new(), Some(pool.clone()))));
        let Some(dp) = start_dp(dp_config(), io, vec![l]) else {
            continue;
        };
        let cfg = client(&p, &[]);
        let start = Instant::now();
        // Round robin: one of the two visits starts at the hole and is retried on the other.
        for _ in 0..2 {
            let (line, _) = visit(addr(&dp), &cfg, "localhost").expect("served");
            assert_eq!(line, "alive", "{io:?}");
        }
        let timeouts = pool.servers[0].state.connect_timeouts.load(Relaxed);
        assert!(
            timeouts >= 1,
            "{io:?}: {timeouts} connect timeouts at the hole"
        );
        // Given up at the connect timeout, not after the kernel's SYN retries (seconds); a
        // wide multiple of it for a loaded machine.
        assert!(
            start.elapsed() < 10 * connect_timeout,
            "{io:?}: two visits took {:?} (connect timeout {connect_timeout:?})",
            start.elapsed()
        );
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}
