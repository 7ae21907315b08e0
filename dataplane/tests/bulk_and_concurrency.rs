//! Volume: 100 MiB each way through one connection (SHA-256 checked on the far side), and 500
//! concurrent connections each echoing its own data.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tlsgate_dataplane::DataplaneConfig;

const MIB: u64 = 1024 * 1024;

/// Backend that hashes all it receives and sends its own 100 MiB stream, both at once.
fn hashing_backend(n: u64) -> (std::net::SocketAddr, thread::JoinHandle<(Vec<u8>, u64)>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut w = s.try_clone().expect("clone");
        let sender = thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = n;
            let mut x = 7u8;
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                for b in &mut buf[..k] {
                    x = x.wrapping_mul(31).wrapping_add(17);
                    *b = x;
                }
                w.write_all(&buf[..k]).expect("backend write");
                left -= k as u64;
            }
            w.shutdown(Shutdown::Write).expect("backend FIN");
        });
        let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        loop {
            let k = s.read(&mut buf).expect("backend read");
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            got += k as u64;
        }
        sender.join().expect("sender");
        (h.finish().as_ref().to_vec(), got)
    });
    (a, h)
}

fn backend_stream_hash(n: u64) -> Vec<u8> {
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    let mut x = 7u8;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        for b in &mut buf[..k] {
            x = x.wrapping_mul(31).wrapping_add(17);
            *b = x;
        }
        h.update(&buf[..k]);
        left -= k as u64;
    }
    h.finish().as_ref().to_vec()
}

#[test]
fn hundred_mib_each_way_through_one_connection() {
    let n = 100 * MIB;
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let expected_down = backend_stream_hash(n);
    for io in drivers() {
        let (backend, far) = hashing_backend(n);
        let Some(dp) = start_dp(
            DataplaneConfig::new(cores()),
            io,
            vec![listener("bulk", tls.clone(), backend)],
        ) else {
            continue;
        };
        let cc = client_config(&p, all_versions());
        let mut t = connect(addr(&dp), &cc);
        handshake(&mut t).expect("handshake");
        let started = Instant::now();
        let (sent_hash, down_hash, down_len) = duplex(t, n, 42).expect("duplex");
        let secs = started.elapsed().as_secs_f64();
        let (up_hash, up_len) = far.join().expect("backend");
        assert_eq!(up_len, n, "{io:?}: bytes reaching the backend");
        assert_eq!(up_hash, sent_hash, "{io:?}: client→backend SHA-256");
        assert_eq!(down_len, n, "{io:?}: bytes reaching the client");
        assert_eq!(down_hash, expected_down, "{io:?}: backend→client SHA-256");
        println!(
            "{io:?}: 2 x 100 MiB in {secs:.2} s ({:.0} MiB/s each way)",
            100.0 / secs
        );
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

#[test]
fn five_hundred_concurrent_connections_echo() {
    const CONNS: usize = 500;
    const THREADS: usize = 20;
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let backend = echo_backend();
    for io in drivers() {
        let Some(dp) = start_dp(
            DataplaneConfig::new(cores()),
            io,
            vec![listener("echo", tls.clone(), backend)],
        ) else {
            continue;
        };
        let a = addr(&dp);
        let cc = client_config(&p, all_versions());
        let all_open = Arc::new(std::sync::Barrier::new(THREADS + 1));
        let mut workers = Vec::new();
        for tid in 0..THREADS {
            let cc = cc.clone();
            let all_open = all_open.clone();
            workers.push(thread::spawn(move || {
                let mut conns: Vec<_> = (0..CONNS / THREADS)
                    .map(|_| {
                        let mut t = connect(a, &cc);
                        handshake(&mut t).expect("handshake");
                        t
                    })
                    .collect();
                all_open.wait();
                for (i, t) in conns.iter_mut().enumerate() {
                    let msg = format!("thread {tid} conn {i} says hello {}", "x".repeat(i * 37));
                    let back = echo_once(t, msg.as_bytes()).expect("echo");
                    assert_eq!(back, msg.as_bytes());
                }
                conns.len()
            }));
        }
        all_open.wait();
        eventually("500 connections open at once", || {
            dp.stats().connections_open == CONNS as u64
        });
        let total: usize = workers.into_iter().map(|w| w.join().expect("worker")).sum();
        assert_eq!(total, CONNS);
        let s = dp.stats();
        assert_eq!(
            s.handshakes_full + s.handshakes_resumed,
            CONNS as u64,
            "{s:?}"
        );
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}
