//! HelloRetryRequest on an offloaded listener: the first hello is answered without a signature,
//! the second is where a full handshake signs, so it must reach a worker too. Any client can ask
//! for a retry (a key share for a group we do not take), so an io thread that signed here would
//! let every client stall the core for one token signature.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::aws_lc_rs::kx_group;
use rustls::crypto::SupportedKxGroup;
use rustls::HandshakeKind;

use super::harness::{offload_listener, pki, provider, Link, TLS13};
use crate::config::Limits;
use crate::conn::run_key_op;
use crate::testing::SlowSigningKey;

fn server(
    groups: Vec<&'static dyn SupportedKxGroup>,
) -> (Arc<rustls::ServerConfig>, Arc<AtomicU64>) {
    let key = SlowSigningKey::new(pki().signing_key(), Duration::ZERO);
    let signatures = key.signature_counter();
    let mut p = (*provider()).clone();
    p.kx_groups = groups;
    (
        pki().server_config_with(Arc::new(p), Arc::new(key)),
        signatures,
    )
}

/// A client whose first key share is P-384: a server taking only X25519 asks it to retry.
fn p384_first_client() -> Arc<rustls::ClientConfig> {
    let mut p = (*provider()).clone();
    p.kx_groups = vec![kx_group::SECP384R1, kx_group::X25519];
    pki().client_config_with(Arc::new(p), TLS13)
}

/// Runs the handshake, running every key op as a worker would, and checks that signatures are
/// made inside `run_key_op` only, never inside a call the io thread makes.
fn handshake_signing_only_on_workers(l: &mut Link, signatures: &AtomicU64) -> usize {
    let mut key_ops = 0;
    loop {
        let before = signatures.load(Ordering::Relaxed);
        l.pump();
        assert_eq!(
            signatures.load(Ordering::Relaxed),
            before,
            "a signature was made on the io thread"
        );
        let Some(job) = l.jobs.pop_front() else {
            return key_ops;
        };
        key_ops += 1;
        let result = run_key_op(job);
        let before = signatures.load(Ordering::Relaxed);
        l.conn.on_key_op_done(result, l.now);
        assert_eq!(
            signatures.load(Ordering::Relaxed),
            before,
            "a signature was made on the io thread"
        );
    }
}

#[test]
fn hello_retry_on_an_offloaded_listener_signs_on_a_worker() {
    let (tls, signatures) = server(vec![kx_group::X25519]);
    let mut l = Link::new(
        offload_listener(tls),
        &Limits::default(),
        p384_first_client(),
    );
    let key_ops = handshake_signing_only_on_workers(&mut l, &signatures);
    l.assert_handshake_done();
    assert_eq!(
        l.client.handshake_kind(),
        Some(HandshakeKind::FullWithHelloRetryRequest)
    );
    assert_eq!(key_ops, 2, "one worker trip per ClientHello");
    assert_eq!(signatures.load(Ordering::Relaxed), 1);
    l.connect_backend();
    l.client_send(b"after a retry");
    assert_eq!(l.backend_take(), b"after a retry");
}

#[test]
fn hello_retry_with_a_stale_ticket_on_an_offloaded_listener_completes() {
    let client = p384_first_client();
    // A session from a server that took P-384: the client's next hello offers its ticket and a
    // P-384 share.
    let (elsewhere, _) = server(vec![kx_group::SECP384R1]);
    let mut first = Link::new(
        offload_listener(elsewhere),
        &Limits::default(),
        client.clone(),
    );
    first.pump();
    first.run_key_ops();
    first.assert_handshake_done();

    // Here: unknown ticket and a retry. The tripwire must not keep the connection.
    let (tls, signatures) = server(vec![kx_group::X25519]);
    let mut l = Link::new(offload_listener(tls), &Limits::default(), client);
    handshake_signing_only_on_workers(&mut l, &signatures);
    l.assert_handshake_done();
    assert!(!l.handshakes[0].resumed);
    assert_eq!(signatures.load(Ordering::Relaxed), 1);
}

#[test]
fn hello_retry_then_resumption_on_an_offloaded_listener_signs_nothing() {
    let client = p384_first_client();
    // Two listeners sharing one session store, taking different groups.
    let (p384, _) = server(vec![kx_group::SECP384R1]);
    let (x25519, signatures) = server(vec![kx_group::X25519]);
    let mut x25519 = (*x25519).clone();
    x25519.session_storage = p384.session_storage.clone();
    let mut first = Link::new(offload_listener(p384), &Limits::default(), client.clone());
    first.pump();
    first.run_key_ops();
    first.assert_handshake_done();

    let mut l = Link::new(
        offload_listener(Arc::new(x25519)),
        &Limits::default(),
        client,
    );
    handshake_signing_only_on_workers(&mut l, &signatures);
    l.assert_handshake_done();
    assert!(l.handshakes[0].resumed);
    assert_eq!(signatures.load(Ordering::Relaxed), 0);
}

#[test]
fn second_hello_sent_with_the_first_is_signed_on_the_worker_too() {
    let (tls, signatures) = server(vec![kx_group::X25519]);
    let mut l = Link::new(
        offload_listener(tls.clone()),
        &Limits::default(),
        p384_first_client(),
    );
    // The client learns the (deterministic) retry request from another server with the same
    // config and sends both hellos at once.
    let mut hello1 = Vec::new();
    while l.client.wants_write() {
        l.client.write_tls(&mut hello1).expect("Vec write");
    }
    let mut scout = rustls::ServerConnection::new(tls).expect("server");
    scout.read_tls(&mut &hello1[..]).expect("read hello");
    scout.process_new_packets().expect("retry request");
    let mut retry = Vec::new();
    while scout.wants_write() {
        scout.write_tls(&mut retry).expect("Vec write");
    }
    l.client
        .read_tls(&mut &retry[..])
        .expect("client reads the retry");
    l.client.process_new_packets().expect("client retries");
    let mut flight = hello1;
    while l.client.wants_write() {
        l.client.write_tls(&mut flight).expect("Vec write");
    }

    l.conn.on_client_data(&flight, l.now);
    let mut job = None;
    while let Some(ev) = l.conn.take_event() {
        if let crate::conn::Event::Offload(j) = ev {
            job = Some(j);
        }
    }
    let result = run_key_op(job.expect("a key op"));
    assert_eq!(
        signatures.load(Ordering::Relaxed),
        1,
        "signed on the worker"
    );
    l.conn.on_key_op_done(result, l.now);
    assert_eq!(signatures.load(Ordering::Relaxed), 1);
    // The retry request is sent again, byte for byte; the client has it already.
    assert!(l.conn.client_out().starts_with(&retry));
    l.conn.client_written(retry.len(), l.now);
    l.pump();
    l.assert_handshake_done();
}
