//! The PROXY protocol v2 header as a real backend reads it, certificate reload with a live
//! connection, and shutdown with drain, on every io driver.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tlsgate_dataplane::{DataplaneConfig, Snapshot};

const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// What a PROXY v2 backend saw on one connection.
#[derive(Debug)]
struct ProxySeen {
    source: SocketAddr,
    destination: SocketAddr,
    payload: Vec<u8>,
}

/// Reads and checks one PROXY v2 PROXY/TCP4 header; `Err` names what was wrong.
fn read_proxy_header(s: &mut TcpStream) -> Result<(SocketAddr, SocketAddr), String> {
    let mut fixed = [0u8; 16];
    s.read_exact(&mut fixed)
        .map_err(|e| format!("header: {e}"))?;
    if fixed[..12] != SIGNATURE {
        return Err(format!("signature {:02x?}", &fixed[..12]));
    }
    if fixed[12] != 0x21 {
        return Err(format!("version/command {:#04x}, want v2 PROXY", fixed[12]));
    }
    if fixed[13] != 0x11 {
        return Err(format!("family {:#04x}, want AF_INET/STREAM", fixed[13]));
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len < 12 {
        return Err(format!("address block of {len} bytes"));
    }
    let mut block = vec![0u8; len];
    s.read_exact(&mut block)
        .map_err(|e| format!("address block: {e}"))?;
    let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    Ok((
        SocketAddr::new(ip(&block[0..4]), port(&block[8..10])),
        SocketAddr::new(ip(&block[4..8]), port(&block[10..12])),
    ))
}

/// A backend that parses the header, then reads `payload_len` bytes, reports both and echoes the
/// payload back.
fn proxy_backend(payload_len: usize) -> (SocketAddr, mpsc::Receiver<Result<ProxySeen, String>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let seen = read_proxy_header(&mut s).and_then(|(source, destination)| {
                    let mut payload = vec![0u8; payload_len];
                    s.read_exact(&mut payload)
                        .map_err(|e| format!("payload: {e}"))?;
                    Ok(ProxySeen {
                        source,
                        destination,
                        payload,
                    })
                });
                if let Ok(seen) = &seen {
                    let _ = s.write_all(&seen.payload);
                }
                let _ = tx.send(seen);
            });
        }
    });
    (a, rx)
}

#[test]
fn proxy_v2_header_names_client_and_listener() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let msg = b"payload after the header";
    let (backend, seen) = proxy_backend(msg.len());
    for io in drivers() {
        let mut l = listener("pp", tls.clone(), backend);
        l.proxy_protocol = true;
        let Some(dp) = start_dp(DataplaneConfig::new(cores()), io, vec![l]) else {
            continue;
        };
        let cc = client_config(&p, all_versions());
        let mut t = connect(addr(&dp), &cc);
        assert_eq!(echo_once(&mut t, msg).expect("echo"), msg, "{io:?}");
        let got = seen
            .recv_timeout(Duration::from_secs(10))
            .expect("backend report")
            .unwrap_or_else(|e| panic!("{io:?}: bad PROXY header: {e}"));
        assert_eq!(
            got.source,
            t.sock.local_addr().expect("client addr"),
            "{io:?}"
        );
        assert_eq!(got.destination, addr(&dp), "{io:?}");
        assert_eq!(got.payload, msg, "{io:?}");
        drop(t);
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

#[test]
fn update_serves_the_new_certificate_and_keeps_old_connections() {
    let old = pki(KeyKind::Ecdsa);
    let new = pki(KeyKind::Ecdsa);
    let (old_tls, _) = server_config(&old, None);
    let (new_tls, _) = server_config(&new, None);
    let backend = echo_backend();
    for io in drivers() {
        let Some(dp) = start_dp(
            DataplaneConfig::new(cores()),
            io,
            vec![listener("web", old_tls.clone(), backend)],
        ) else {
            continue;
        };
        let a = addr(&dp);
        let old_cc = client_config(&old, all_versions());
        let new_cc = client_config(&new, all_versions());
        let mut before = connect(a, &old_cc);
        assert_eq!(echo_once(&mut before, b"old").expect("echo"), b"old");

        dp.update(std::sync::Arc::new(Snapshot {
            listeners: vec![listener("web", new_tls.clone(), backend)],
        }));

        let mut after = connect(a, &new_cc);
        assert_eq!(echo_once(&mut after, b"new").expect("echo"), b"new");
        let leaf = after
            .conn
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .expect("peer certificate");
        assert_eq!(leaf, new.leaf, "{io:?}: new connections get the new cert");
        // A client trusting only the old CA is now refused.
        let mut stale = connect(a, &old_cc);
        assert!(handshake(&mut stale).is_err(), "{io:?}");
        // The connection opened before the update keeps its config and keeps working.
        assert_eq!(
            echo_once(&mut before, b"still here").expect("echo"),
            b"still here",
            "{io:?}"
        );
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

/// Whether a new client can still get through a handshake (bounded, so a connection parked in a
/// closed listener's backlog counts as refused).
fn accepts(a: SocketAddr, cc: &std::sync::Arc<rustls::ClientConfig>) -> bool {
    let Ok(mut t) = try_connect(a, cc) else {
        return false;
    };
    let _ = t.sock.set_read_timeout(Some(Duration::from_millis(500)));
    handshake(&mut t).is_ok()
}

#[test]
fn shutdown_stops_accepting_and_drains() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let backend = echo_backend();
    let cc = client_config(&p, all_versions());
    for io in drivers() {
        let Some(dp) = start_dp(
            DataplaneConfig::new(cores()),
            io,
            vec![listener("web", tls.clone(), backend)],
        ) else {
            continue;
        };
        let a = addr(&dp);
        let mut open = connect(a, &cc);
        assert_eq!(echo_once(&mut open, b"before").expect("echo"), b"before");
        assert!(accepts(a, &cc), "{io:?}: accepts before shutdown");

        let drain = Duration::from_secs(10);
        let (done_tx, done_rx) = mpsc::channel();
        let t0 = Instant::now();
        let stopper = thread::spawn(move || {
            let r = dp.shutdown(drain);
            let _ = done_tx.send(t0.elapsed());
            r
        });
        // Accepting stops at once: within a second, well inside the drain time.
        let refused_by = Instant::now() + Duration::from_secs(1);
        let mut refused = false;
        while Instant::now() < refused_by {
            if !accepts(a, &cc) {
                refused = true;
                break;
            }
        }
        assert!(refused, "{io:?}: still accepting after shutdown");
        assert!(
            done_rx.try_recv().is_err(),
            "{io:?}: returned with a live connection"
        );

        // The open connection still works and, once it closes, shutdown returns early.
        assert_eq!(
            echo_once(&mut open, b"during drain").expect("echo while draining"),
            b"during drain",
            "{io:?}"
        );
        open.conn.send_close_notify();
        let _ = open.flush();
        let mut rest = Vec::new();
        let _ = open.read_to_end(&mut rest);
        drop(open);
        let took = done_rx
            .recv_timeout(drain)
            .unwrap_or_else(|_| panic!("{io:?}: shutdown did not return after the drain"));
        stopper.join().expect("stopper").expect("shutdown");
        assert!(took < drain, "{io:?}: {took:?}");
    }
}

#[test]
fn shutdown_returns_at_the_drain_deadline() {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let backend = echo_backend();
    let cc = client_config(&p, all_versions());
    for io in drivers() {
        let Some(dp) = start_dp(
            DataplaneConfig::new(cores()),
            io,
            vec![listener("web", tls.clone(), backend)],
        ) else {
            continue;
        };
        let mut open = connect(addr(&dp), &cc);
        assert_eq!(echo_once(&mut open, b"stay").expect("echo"), b"stay");
        let drain = Duration::from_millis(300);
        let t0 = Instant::now();
        dp.shutdown(drain).expect("shutdown");
        let took = t0.elapsed();
        assert!(
            took >= drain - Duration::from_millis(50) && took < drain + Duration::from_secs(2),
            "{io:?}: shutdown took {took:?} for a {drain:?} drain"
        );
        // The connection that stayed open was closed, not left hanging.
        let mut buf = [0u8; 16];
        assert!(
            matches!(open.read(&mut buf), Ok(0) | Err(_)),
            "{io:?}: connection still open after shutdown"
        );
    }
}
