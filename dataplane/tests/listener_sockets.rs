//! What the data plane reads from an accepted connection and gives its listening sockets, on
//! both io drivers: the addresses a PROXY v2 header announces (the client's, and the one it
//! connected to — the listener's own for a listener bound to one address, the kernel's answer
//! for a wildcard one), and `TCP_NODELAY` on sockets handed over by another process.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tlsgate_dataplane::{start_inherited, DataplaneConfig, Error, Snapshot};

/// A backend behind PROXY v2 (IPv4): answers `src=<addr> dst=<addr>` from the header.
fn proxy_address_backend() -> SocketAddr {
    tcp_backend(|mut s| {
        let mut head = [0u8; 28];
        if s.read_exact(&mut head).is_err() || head[13] != 0x11 {
            let _ = writeln!(s, "not a PROXY v2 TCP/IPv4 header");
            return;
        }
        let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
        let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        let src = SocketAddr::new(ip(&head[16..20]), port(&head[24..26]));
        let dst = SocketAddr::new(ip(&head[20..24]), port(&head[26..28]));
        let _ = writeln!(s, "src={src} dst={dst}");
    })
}

/// Connects to `to`, completes the handshake and reads the backend's line; also returns the
/// client's own address.
fn visit(to: SocketAddr, p: &Pki) -> io::Result<(String, SocketAddr)> {
    let mut t = try_connect(to, &client_config(p, all_versions()))?;
    handshake(&mut t)?;
    let me = t.sock.local_addr()?;
    let mut line = String::new();
    BufReader::new(&mut t).read_line(&mut line)?;
    Ok((line.trim().to_string(), me))
}

#[test]
fn the_proxy_header_names_the_client_and_the_address_it_connected_to() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let backend = proxy_address_backend();
    for io in drivers() {
        // One address (port 0 in the configuration: the header must carry the real port) and
        // the wildcard (the header must carry 127.0.0.1, not 0.0.0.0).
        for bind in ["127.0.0.1:0", "0.0.0.0:0"] {
            let mut l = listener("proxied", tls.clone(), backend);
            l.bind = bind.parse().expect("literal");
            l.proxy_protocol = true;
            let Some(dp) = start_dp(DataplaneConfig::new(cores()), io, vec![l]) else {
                continue;
            };
            let to = SocketAddr::from((Ipv4Addr::LOCALHOST, addr(&dp).port()));
            for _ in 0..3 {
                let (line, me) = visit(to, &p).expect("served");
                assert_eq!(
                    line,
                    format!("src={me} dst={to}"),
                    "{io:?}, bound to {bind}"
                );
            }
            dp.shutdown(Duration::from_secs(1)).expect("shutdown");
        }
    }
}

#[test]
fn a_handed_over_listening_socket_gets_tcp_nodelay_for_its_connections() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    for io in drivers() {
        // As an older process may hand it over: bound and listening, without TCP_NODELAY.
        let handed = TcpListener::bind("127.0.0.1:0").expect("bind");
        let ours = handed.try_clone().expect("dup");
        let sock = socket2::SockRef::from(&ours);
        assert!(
            !sock.tcp_nodelay().expect("getsockopt"),
            "fresh sockets have Nagle on"
        );
        let mut l = listener("handed", tls.clone(), echo_backend());
        l.bind = handed.local_addr().expect("addr");
        let mut cfg = DataplaneConfig::new(cores());
        cfg.io = io;
        let snapshot = Arc::new(Snapshot { listeners: vec![l] });
        let dp = match start_inherited(cfg, snapshot, vec![vec![handed]]) {
            Ok(dp) => dp,
            Err(Error::UringUnavailable { why }) => {
                tlsgate_hw_tests::skip::missing(format!("driver {io:?}: {why}"));
                continue;
            }
            Err(e) => panic!("start failed: {e}"),
        };
        // The same socket, seen through our duplicate: accepted connections copy the option.
        assert!(sock.tcp_nodelay().expect("getsockopt"), "{io:?}");
        let mut t = connect(addr(&dp), &client_config(&p, all_versions()));
        assert_eq!(echo_once(&mut t, b"ping").expect("echo"), b"ping", "{io:?}");
        drop(t);
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}
