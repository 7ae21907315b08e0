//! TLS to the backend and the client identity in the PROXY v2 header, on every io driver:
//! a real rustls backend on 127.0.0.1 reached through the data plane; certificate errors fail the
//! connection with a named cause; a backend that requires a client certificate gets ours; the
//! PROXY header goes in clear before the backend handshake and carries the client's CN, SANs and
//! fingerprint; a slow (token) client key signs on the key-op workers, so the core keeps serving
//! established connections meanwhile.

mod backend_tls_support;
mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tlsgate_dataplane::conn::{BackendTls, BackendTlsCause};
use tlsgate_dataplane::{CloseReason, DataplaneConfig, IoDriver};

use backend_tls_support::*;

#[test]
fn tls_backend_carries_bytes_both_ways_with_close_notify() {
    let zone = ca("backend zone CA");
    let leaf = zone.leaf("backend.internal", &["backend.internal"], false);
    let (backend, seen) = tls_echo_backend(backend_server_config(&leaf, None), false);
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    for io in drivers() {
        let Some(dp) = start_dp(
            DataplaneConfig::new(cores()),
            io,
            vec![tls_listener(
                tls.clone(),
                backend,
                false,
                Some(backend_tls(&zone, "backend.internal", None)),
            )],
        ) else {
            continue;
        };
        for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let mut t = connect(addr(&dp), &client_config(&p, &[v]));
            handshake(&mut t).expect("handshake");
            // Larger than every buffer on the way, so backpressure and the wire bound take part.
            let (sent, got, n) = duplex(t, 1 << 20, 7).expect("duplex through a TLS backend");
            assert_eq!(n, 1 << 20, "{io:?}: all bytes echoed");
            assert_eq!(sent, got, "{io:?}: same bytes back");
            let s = seen
                .recv_timeout(Duration::from_secs(20))
                .expect("backend report");
            assert!(
                s.clean_close,
                "{io:?} {v:?}: backend got close_notify: {s:?} {:?}",
                dp.stats()
            );
            assert!(s.error.is_none(), "{io:?}: {s:?}");
        }
        eventually("both connections done", || {
            dp.stats().closed(CloseReason::Done) == 2
        });
        let s = dp.stats();
        assert!(s.backend_tls_errors.is_empty(), "{s:?}");
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

#[test]
fn backend_certificate_errors_fail_the_connection_with_a_named_cause() {
    let zone = ca("backend zone CA");
    let other_zone = ca("another zone CA");
    let good = zone.leaf("backend.internal", &["backend.internal"], false);
    let foreign = other_zone.leaf("backend.internal", &["backend.internal"], false);
    let expired = zone.leaf("backend.internal", &["backend.internal"], true);
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let cases = [
        (&foreign, "backend.internal", BackendTlsCause::UnknownIssuer),
        (&good, "other.internal", BackendTlsCause::NameMismatch),
        (
            &expired,
            "backend.internal",
            BackendTlsCause::CertificateExpired,
        ),
    ];
    for io in drivers() {
        for (leaf, name, cause) in &cases {
            let (backend, _seen) = tls_echo_backend(backend_server_config(leaf, None), false);
            let Some(dp) = start_dp(
                DataplaneConfig::new(cores()),
                io,
                vec![tls_listener(
                    tls.clone(),
                    backend,
                    false,
                    Some(backend_tls(&zone, name, None)),
                )],
            ) else {
                break;
            };
            let mut t = connect(addr(&dp), &client_config(&p, all_versions()));
            handshake(&mut t).expect("the client handshake itself succeeds");
            let _ = t.write_all(b"hello?");
            let _ = t.flush();
            let mut got = Vec::new();
            let _ = t.read_to_end(&mut got);
            assert!(got.is_empty(), "{io:?} {cause:?}: nothing may come back");
            eventually("the failure counted", || {
                dp.stats().backend_tls_errors(*cause) == 1
            });
            let s = dp.stats();
            assert_eq!(
                s.closed(CloseReason::BackendTlsError(*cause)),
                1,
                "{io:?}: {s:?}"
            );
            assert_eq!(s.closed(CloseReason::Done), 0, "{io:?}: {s:?}");
            assert_eq!(s.backend_tls_errors.len(), 1, "only {cause:?}: {s:?}");
            dp.shutdown(Duration::from_secs(1)).expect("shutdown");
        }
    }
}

#[test]
fn backend_requiring_a_client_certificate_gets_ours_and_refuses_none() {
    let zone = ca("backend zone CA");
    let leaf = zone.leaf("backend.internal", &["backend.internal"], false);
    let client_zone = ca("tlsgate client CA");
    let ours = client_zone.leaf("tlsgate-appliance", &["tlsgate.internal"], false);
    let (backend, seen) = tls_echo_backend(backend_server_config(&leaf, Some(&client_zone)), false);
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    for io in drivers() {
        let Some(dp) = start_dp(
            DataplaneConfig::new(cores()),
            io,
            vec![tls_listener(
                tls.clone(),
                backend,
                false,
                Some(backend_tls(&zone, "backend.internal", Some(&ours))),
            )],
        ) else {
            continue;
        };
        let mut t = connect(addr(&dp), &client_config(&p, all_versions()));
        assert_eq!(echo_once(&mut t, b"ping").expect("echo"), b"ping");
        drop(t);
        let s = seen.recv_timeout(Duration::from_secs(20)).expect("report");
        assert_eq!(
            s.client_cert.as_ref(),
            Some(&ours.der),
            "{io:?}: the backend saw our client certificate"
        );
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");

        // Without a client certificate the backend refuses, and that is a backend TLS error.
        let Some(dp) = start_dp(
            DataplaneConfig::new(cores()),
            io,
            vec![tls_listener(
                tls.clone(),
                backend,
                false,
                Some(backend_tls(&zone, "backend.internal", None)),
            )],
        ) else {
            continue;
        };
        let mut t = connect(addr(&dp), &client_config(&p, all_versions()));
        let _ = t.write_all(b"ping");
        let _ = t.flush();
        let mut got = Vec::new();
        let _ = t.read_to_end(&mut got);
        assert!(got.is_empty(), "{io:?}: {got:?}");
        eventually("refusal counted", || {
            dp.stats()
                .backend_tls_errors(BackendTlsCause::AlertReceived)
                == 1
        });
        let _ = seen.recv_timeout(Duration::from_secs(20));
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

fn tlv(tlvs: &[(u8, Vec<u8>)], kind: u8) -> Vec<&[u8]> {
    tlvs.iter()
        .filter(|(k, _)| *k == kind)
        .map(|(_, v)| v.as_slice())
        .collect()
}

#[test]
fn client_identity_reaches_the_backend_in_proxy_v2_tlvs_before_backend_tls() {
    let client_ca = ca("client zone CA");
    let client = client_ca.leaf(
        "alice",
        &["alice.clients.example", "alice@example.com"],
        false,
    );
    let fingerprint = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, client.der.as_ref())
        .as_ref()
        .to_vec();
    // The listener verifies client certificates against its own CA (what the policy module
    // builds in production).
    let p = pki(KeyKind::Ecdsa);
    let verifier = WebPkiClientVerifier::builder_with_provider(client_ca.roots(), provider())
        .build()
        .expect("verifier");
    let (base, _) = server_config(&p, None);
    let mut mtls = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(base.cert_resolver.clone());
    mtls.session_storage = rustls::server::ServerSessionMemoryCache::new(64);
    let mtls = Arc::new(mtls);

    let mut roots = RootCertStore::empty();
    roots.add(p.ca_der.clone()).expect("root");
    let client_cfg = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![client.der.clone()], client.key())
            .expect("client cert"),
    );

    let zone = ca("backend zone CA");
    let leaf = zone.leaf("backend.internal", &["backend.internal"], false);
    let (tls_backend, tls_seen) = tls_echo_backend(backend_server_config(&leaf, None), true);
    let (plain_backend, plain_seen) = proxy_echo_backend();

    for io in drivers() {
        for backend_is_tls in [true, false] {
            let (backend, seen, bt) = if backend_is_tls {
                (
                    tls_backend,
                    &tls_seen,
                    Some(backend_tls(&zone, "backend.internal", None)),
                )
            } else {
                (plain_backend, &plain_seen, None)
            };
            let Some(dp) = start_dp(
                DataplaneConfig::new(cores()),
                io,
                vec![tls_listener(mtls.clone(), backend, true, bt)],
            ) else {
                break;
            };
            let mut t = connect(addr(&dp), &client_cfg);
            assert_eq!(echo_once(&mut t, b"who am i").expect("echo"), b"who am i");
            let resumed = t.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            t.conn.send_close_notify();
            let _ = t.flush();
            drop(t);
            let s = seen.recv_timeout(Duration::from_secs(20)).expect("report");
            assert!(s.error.is_none(), "{io:?} tls={backend_is_tls}: {s:?}");
            let tlvs = s.proxy_tlvs.expect("PROXY header with TLVs");
            let ctx = format!("{io:?} tls={backend_is_tls}: {tlvs:?}");

            assert_eq!(tlv(&tlvs, 0x02), vec![b"localhost".as_slice()], "{ctx}");
            let ssl = tlv(&tlvs, 0x20);
            assert_eq!(ssl.len(), 1, "{ctx}");
            let ssl = ssl[0];
            // A resumed session's certificate is flagged as such (HAProxy's CERT_SESS).
            let cert_flag = if resumed { 0x04 } else { 0x02 };
            assert_eq!(ssl[0], 0x01 | cert_flag, "SSL + client certificate: {ctx}");
            assert_eq!(&ssl[1..5], &[0, 0, 0, 0], "verified: {ctx}");
            let subs = parse_tlvs(&ssl[5..]).expect("sub-TLVs");
            let version = tlv(&subs, 0x21);
            assert!(
                version == vec![b"TLSv1.3".as_slice()] || version == vec![b"TLSv1.2".as_slice()],
                "{ctx}"
            );
            assert_eq!(tlv(&subs, 0x22), vec![b"alice".as_slice()], "{ctx}");
            assert_eq!(
                tlv(&subs, 0x24),
                vec![b"ecdsa-with-SHA256".as_slice()],
                "{ctx}"
            );
            assert_eq!(tlv(&subs, 0x25), vec![b"EC256".as_slice()], "{ctx}");
            assert_eq!(tlv(&subs, 0x23).len(), 1, "{ctx}");
            assert_eq!(
                tlv(&tlvs, 0xE0),
                vec![
                    b"DNS:alice.clients.example".as_slice(),
                    b"email:alice@example.com".as_slice()
                ],
                "{ctx}"
            );
            assert_eq!(tlv(&tlvs, 0xE1), vec![fingerprint.as_slice()], "{ctx}");
            assert_eq!(tlv(&tlvs, 0xE2), vec![b"CN=alice".as_slice()], "{ctx}");
            dp.shutdown(Duration::from_secs(1)).expect("shutdown");
        }
    }
}

#[test]
fn no_client_certificate_means_the_plain_proxy_header() {
    let (backend, seen) = proxy_echo_backend();
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    for io in drivers() {
        let Some(dp) = start_dp(
            DataplaneConfig::new(cores()),
            io,
            vec![tls_listener(tls.clone(), backend, true, None)],
        ) else {
            continue;
        };
        let mut t = connect(addr(&dp), &client_config(&p, all_versions()));
        assert_eq!(echo_once(&mut t, b"x").expect("echo"), b"x");
        drop(t);
        let s = seen.recv_timeout(Duration::from_secs(20)).expect("report");
        assert_eq!(s.proxy_tlvs, Some(Vec::new()), "{io:?}: {s:?}");
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

#[test]
fn a_backend_that_never_answers_the_tls_handshake_times_out() {
    // Accepts TCP and holds the connection without a word.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend = l.local_addr().expect("addr");
    thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    let zone = ca("backend zone CA");
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    for io in drivers() {
        let mut cfg = DataplaneConfig::new(cores());
        cfg.limits.backend_connect_timeout_ms = 300;
        cfg.limits.handshake_timeout_ms = 1000;
        let Some(dp) = start_dp(
            cfg,
            io,
            vec![tls_listener(
                tls.clone(),
                backend,
                false,
                Some(backend_tls(&zone, "backend.internal", None)),
            )],
        ) else {
            continue;
        };
        let started = std::time::Instant::now();
        let mut t = connect(addr(&dp), &client_config(&p, all_versions()));
        handshake(&mut t).expect("client handshake");
        let mut got = Vec::new();
        let _ = t.read_to_end(&mut got);
        assert!(got.is_empty(), "{io:?}");
        eventually("timeout counted", || {
            dp.stats()
                .backend_tls_errors(BackendTlsCause::HandshakeTimeout)
                == 1
        });
        // The connect timeout bounds it (the io_uring driver's timer may first wake at the
        // client handshake deadline, 1 s): well before the 20 s a backend that never answers
        // would leave it open otherwise; a wide multiple for a loaded machine.
        assert!(
            started.elapsed() < 5 * Duration::from_millis(1000),
            "{io:?}: {:?}",
            started.elapsed()
        );
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

/// A client key that sleeps like a slow HSM and records on which thread it was asked to sign.
#[derive(Debug)]
struct WatchedKey {
    inner: Arc<dyn rustls::sign::SigningKey>,
    off_worker: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
}

#[derive(Debug)]
struct WatchedSigner {
    inner: Box<dyn rustls::sign::Signer>,
    off_worker: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
}

impl rustls::sign::SigningKey for WatchedKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        Some(Box::new(WatchedSigner {
            inner: self.inner.choose_scheme(offered)?,
            off_worker: self.off_worker.clone(),
            total: self.total.clone(),
        }))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        self.inner.algorithm()
    }
}

impl rustls::sign::Signer for WatchedSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let on_worker = thread::current()
            .name()
            .is_some_and(|n| n.starts_with("tlsgate-keyop-"));
        if !on_worker {
            self.off_worker.fetch_add(1, Ordering::Relaxed);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        self.inner.sign(message)
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        self.inner.scheme()
    }
}

/// What one run of the backend-signature load measured.
struct SigningRun {
    p99: Duration,
    echoes: usize,
    off_worker: u64,
    total: u64,
}

/// One core; a probe connection echoes through a TLS backend that requires our client
/// certificate while `LOAD` clients keep opening connections whose backend handshakes each need a
/// 20 ms client signature (backend resumption off). `inline` forces the io thread to sign.
fn backend_signing_run(io: IoDriver, inline: bool) -> Option<SigningRun> {
    const LOAD: usize = 8;
    let zone = ca("backend zone CA");
    let leaf = zone.leaf("backend.internal", &["backend.internal"], false);
    let client_zone = ca("tlsgate client CA");
    let ours = client_zone.leaf("tlsgate-appliance", &["tlsgate.internal"], false);
    let (backend, _seen) =
        tls_echo_backend(backend_server_config(&leaf, Some(&client_zone)), false);
    let key = tlsgate_dataplane::testing::SlowSigningKey::new(
        provider()
            .key_provider
            .load_private_key(ours.key())
            .expect("client key"),
        Duration::from_millis(20),
    );
    let (off_worker, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let watched = WatchedKey {
        inner: Arc::new(key),
        off_worker: off_worker.clone(),
        total: total.clone(),
    };
    let ck = rustls::sign::CertifiedKey::new(vec![ours.der.clone()], Arc::new(watched));
    let mut cc = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(zone.roots())
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)));
    cc.resumption = rustls::client::Resumption::disabled();
    let bt = BackendTls {
        config: Arc::new(cc),
        server_name: ServerName::try_from("backend.internal").expect("name"),
        offload_key_ops: true,
    };
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let mut cfg = DataplaneConfig::new(vec![0]);
    cfg.key_ops.workers = 2 * LOAD;
    cfg.key_ops.deadline_ms = 10_000;
    cfg.danger_inline_key_ops = inline;
    let dp = start_dp(cfg, io, vec![tls_listener(tls, backend, false, Some(bt))])?;
    let a = addr(&dp);
    let cc = client_config(&p, all_versions());
    let mut probe = connect(a, &cc);
    assert_eq!(
        echo_once(&mut probe, b"warm-up").expect("probe"),
        b"warm-up"
    );

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..LOAD)
        .map(|_| {
            let (stop, cc) = (stop.clone(), cc.clone());
            thread::spawn(move || {
                pin_client_thread();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut t) = try_connect(a, &cc) {
                        let _ = echo_once(&mut t, b"load");
                    }
                }
            })
        })
        .collect();
    let settle = std::time::Instant::now() + Duration::from_millis(300);
    let end = settle + Duration::from_millis(1500);
    let mut rtts = Vec::new();
    while std::time::Instant::now() < end {
        let t0 = std::time::Instant::now();
        assert_eq!(
            echo_once(&mut probe, b"probe").expect("probe echo"),
            b"probe"
        );
        let now = std::time::Instant::now();
        if now >= settle {
            rtts.push(now - t0);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().expect("load thread");
    }
    dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    assert!(!rtts.is_empty(), "{io:?}: no probe echo after settling");
    rtts.sort();
    Some(SigningRun {
        p99: rtts[(rtts.len() * 99 / 100).min(rtts.len() - 1)],
        echoes: rtts.len(),
        off_worker: off_worker.load(Ordering::Relaxed),
        total: total.load(Ordering::Relaxed),
    })
}

#[test]
fn backend_client_signatures_with_a_token_key_never_stall_the_core() {
    for io in drivers() {
        let Some(off) = backend_signing_run(io, false) else {
            continue;
        };
        let Some(inl) = backend_signing_run(io, true) else {
            continue;
        };
        for (what, r) in [("offloaded", &off), ("danger_inline_key_ops", &inl)] {
            println!(
                "{io:?} {what}, 20 ms client signer: probe p99 {:?} over {} echoes, {} backend signatures ({} outside a key-op worker)",
                r.p99, r.echoes, r.total, r.off_worker
            );
        }
        // Offloaded, no client signature is made on the io thread, and there was load to make.
        assert!(off.total > 10, "{io:?}: {} signatures", off.total);
        assert_eq!(
            off.off_worker, 0,
            "{io:?}: signed outside the key-op workers"
        );
        // The forced-inline run proves the watch works: there, the io thread signs.
        assert!(inl.off_worker > 0, "{io:?}");
        // And it is what stalls the established connection: a wide relation measured here.
        assert!(
            inl.p99 >= 2 * off.p99,
            "{io:?}: inline probe p99 {:?} vs offloaded {:?}",
            inl.p99,
            off.p99
        );
    }
}

/// Measurement aid, not a check: `cargo test -p tlsgate-dataplane --test
/// backend_tls_end_to_end -- --ignored --nocapture` prints MiB/s of a full-duplex transfer
/// through a plain and a TLS backend (same echo, same sizes).
#[test]
#[ignore]
fn measure_plain_vs_tls_backend_throughput() {
    let zone = ca("backend zone CA");
    let leaf = zone.leaf("backend.internal", &["backend.internal"], false);
    let (tls_backend, _seen) = tls_echo_backend(backend_server_config(&leaf, None), false);
    let plain_backend = echo_backend();
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let n: u64 = 64 << 20;
    for io in drivers() {
        for (what, backend, bt) in [
            ("plain", plain_backend, None),
            (
                "tls",
                tls_backend,
                Some(backend_tls(&zone, "backend.internal", None)),
            ),
        ] {
            let Some(dp) = start_dp(
                DataplaneConfig::new(vec![0]),
                io,
                vec![tls_listener(tls.clone(), backend, false, bt)],
            ) else {
                break;
            };
            let mut t = connect(addr(&dp), &client_config(&p, all_versions()));
            handshake(&mut t).expect("handshake");
            let started = std::time::Instant::now();
            let (a, b, got) = duplex(t, n, 3).expect("duplex");
            let secs = started.elapsed().as_secs_f64();
            assert_eq!((a, got), (b, n));
            println!(
                "{io:?} {what} backend: {n} bytes each way in {secs:.2} s = {:.0} MiB/s",
                n as f64 / secs / (1 << 20) as f64
            );
            dp.shutdown(Duration::from_secs(1)).expect("shutdown");
        }
    }
}
