//! Bad peers and bad backends: each gets its expected outcome and the appliance keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use tlsgate_dataplane::{CloseReason, DataplaneConfig, Limits};

fn short_limits() -> DataplaneConfig {
    let mut cfg = DataplaneConfig::new(cores());
    cfg.limits = Limits {
        handshake_timeout_ms: 300,
        idle_timeout_ms: 2_000,
        backend_connect_timeout_ms: 300,
        ..Limits::default()
    };
    cfg
}

/// A healthy request on another listener must still work.
fn still_serves(dp: &tlsgate_dataplane::Dataplane, p: &Pki) {
    let cc = client_config(p, all_versions());
    let a = dp.local_addrs()[1].1;
    let mut t = connect(a, &cc);
    let resp = http_get(&mut t).expect("healthy GET");
    assert!(resp.ends_with(HTTP_BODY), "{resp:?}");
}

#[test]
fn bad_clients_and_backends_fail_alone() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let good = http_backend();
    // A port with nothing listening: take one, then close it.
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    // Listens but never accepts (backlog 1): connect succeeds in the kernel, nobody reads.
    let slow = TcpListener::bind("127.0.0.1:0").expect("bind");
    let slow_addr = slow.local_addr().expect("addr");
    for io in drivers() {
        let Some(dp) = start_dp(
            short_limits(),
            io,
            vec![
                listener("main", tls.clone(), good),
                listener("healthy", tls.clone(), good),
                listener("refused", tls.clone(), refused),
                listener("slow", tls.clone(), slow_addr),
            ],
        ) else {
            continue;
        };
        let a = addr(&dp);
        let cc = client_config(&p, all_versions());

        // Garbage instead of a ClientHello: an alert or a close, never a hang.
        let mut s = TcpStream::connect(a).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(buf.len() <= 7, "only an alert may come back: {buf:?}");
        eventually("garbage counted", || {
            dp.stats().closed(CloseReason::BadClientHello) == 1
        });
        still_serves(&dp, &p);

        // Stalls mid-handshake: half a ClientHello, then silence → handshake timeout.
        let mut hello = Vec::new();
        rustls::ClientConnection::new(cc.clone(), "localhost".try_into().expect("name"))
            .expect("client")
            .write_tls(&mut hello)
            .expect("hello bytes");
        let mut s = TcpStream::connect(a).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(&hello[..hello.len() / 2]).expect("half hello");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        eventually("stalled handshake timed out", || {
            dp.stats().closed(CloseReason::HandshakeTimeout) == 1
        });

        // Opens and never speaks → handshake timeout too.
        let mut s = TcpStream::connect(a).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = Vec::new();
        let n = s.read_to_end(&mut buf).expect("closed by the appliance");
        assert_eq!(n, 0);
        eventually("silent client timed out", || {
            dp.stats().closed(CloseReason::HandshakeTimeout) == 2
        });
        still_serves(&dp, &p);

        // Backend refusing: the handshake completes, then the connection closes.
        let mut t = connect(dp.local_addrs()[2].1, &cc);
        let r = http_get(&mut t);
        assert!(r.as_ref().map_or(true, |s| s.is_empty()), "{r:?}");
        eventually("backend refused counted", || {
            dp.stats().closed(CloseReason::BackendConnectFailed) == 1
        });

        // Backend slow to accept: bytes sit in its backlog; once it accepts, they arrive.
        let mut t = connect(dp.local_addrs()[3].1, &cc);
        handshake(&mut t).expect("handshake");
        t.write_all(b"ping through a slow backend").expect("write");
        t.flush().expect("flush");
        let (mut b, _) = slow.accept().expect("late accept");
        let mut got = [0u8; 27];
        b.read_exact(&mut got)
            .expect("bytes arrive after the late accept");
        assert_eq!(&got, b"ping through a slow backend");
        b.write_all(b"pong").expect("reply");
        let mut pong = [0u8; 4];
        t.read_exact(&mut pong).expect("reply reaches the client");
        assert_eq!(&pong, b"pong");
        still_serves(&dp, &p);

        let s = dp.stats();
        assert_eq!(s.handshakes_failed, 3, "{s:?}");
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

#[test]
fn oversized_client_hello_is_refused() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let backend = http_backend();
    for io in drivers() {
        let mut cfg = DataplaneConfig::new(cores());
        cfg.limits.max_client_hello_bytes = 1024;
        let Some(dp) = start_dp(cfg, io, vec![listener("web", tls.clone(), backend)]) else {
            continue;
        };
        // A long ALPN list makes the hello larger than the 1 KiB limit.
        let mut cc = (*client_config(&p, all_versions())).clone();
        cc.alpn_protocols = (0..10).map(|i| vec![b'a' + i; 200]).collect();
        let cc = std::sync::Arc::new(cc);
        let mut t = connect(addr(&dp), &cc);
        assert!(handshake(&mut t).is_err());
        eventually("oversized hello counted", || {
            dp.stats().closed(CloseReason::ClientHelloTooLarge) == 1
        });
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

#[test]
fn idle_timeout_closes_established_connections() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let backend = echo_backend();
    for io in drivers() {
        let mut cfg = DataplaneConfig::new(cores());
        cfg.limits.idle_timeout_ms = 200;
        let Some(dp) = start_dp(cfg, io, vec![listener("echo", tls.clone(), backend)]) else {
            continue;
        };
        let cc = client_config(&p, all_versions());
        let mut t = connect(addr(&dp), &cc);
        assert_eq!(echo_once(&mut t, b"hi").expect("echo"), b"hi");
        let mut rest = Vec::new();
        let _ = t.read_to_end(&mut rest);
        eventually("idle timeout counted", || {
            dp.stats().closed(CloseReason::IdleTimeout) == 1
        });
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}
