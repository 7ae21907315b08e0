//! A backend that asks for our client certificate, whose key is on the token: the core never
//! signs for it itself. The backend's handshake records go to a key-op worker with the
//! `ClientConnection`, the connection waits (no backend reads, timers still run), and pumping
//! resumes with the worker's answer; a failed or late answer ends the connection with the
//! key-op reasons, the client getting close_notify.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::server::{ServerConnection, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SigningKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};

use super::harness::{pki, prepare, provider, snapshot, Ending, Link, Pki, TLS12, TLS13};
use crate::config::Limits;
use crate::conn::{run_key_op, BackendTls, BackendTlsCause, CloseReason, KeyOpFailure};
use crate::testing::SlowSigningKey;

const BACKEND_NAME: &str = "backend.test";

/// A backend (rustls) that requires a client certificate from `client_ca`.
fn backend_requiring_client_cert(backend: &Pki, client_ca: &Pki) -> ServerConnection {
    let mut roots = RootCertStore::empty();
    roots.add(client_ca.ca.clone()).expect("client CA");
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .expect("verifier");
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![backend.leaf.clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
                backend.key_der(),
            )),
        )
        .expect("backend cert");
    ServerConnection::new(Arc::new(cfg)).expect("backend server")
}

/// A listener whose backend speaks TLS with a client certificate signed by `key`;
/// `offload_key_ops` says the key is on the token.
fn link_with_client_key(
    backend: &Pki,
    client: &Pki,
    key: Arc<dyn SigningKey>,
    versions: &[&'static SupportedProtocolVersion],
    offload_key_ops: bool,
) -> Link {
    let mut roots = RootCertStore::empty();
    roots.add(backend.ca.clone()).expect("backend CA");
    let ck = CertifiedKey::new(vec![client.leaf.clone()], key);
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(ck)));
    let mut snap = snapshot(pki().server_config());
    snap.backend_tls = Some(BackendTls {
        config: Arc::new(cfg),
        server_name: ServerName::try_from(BACKEND_NAME).expect("literal"),
        offload_key_ops,
    });
    Link::established_with(prepare(snap), &Limits::default(), TLS13)
}

/// One round: what the core has for the backend goes in, what the backend answers comes back.
/// Returns whether anything moved.
fn exchange(l: &mut Link, backend: &mut ServerConnection) -> bool {
    let mut moved = false;
    let to_backend = l.backend_take();
    if !to_backend.is_empty() {
        let mut rd = &to_backend[..];
        while !rd.is_empty() {
            backend.read_tls(&mut rd).expect("backend reads records");
        }
        backend
            .process_new_packets()
            .expect("backend accepts the core's records");
        moved = true;
    }
    let mut from_backend = Vec::new();
    while backend.wants_write() {
        backend.write_tls(&mut from_backend).expect("Vec write");
    }
    if !from_backend.is_empty() {
        l.backend_send(&from_backend);
        moved = true;
    }
    moved
}

/// Shuttles records, running each key operation the core hands out as a worker would (and
/// counting them), until nothing moves.
fn shuttle_with_worker(l: &mut Link, backend: &mut ServerConnection) -> usize {
    let mut jobs = 0;
    loop {
        let mut moved = exchange(l, backend);
        while let Some(job) = l.jobs.pop_front() {
            assert!(job.backend.is_some(), "a backend job");
            assert!(l.conn.awaiting_key_op());
            assert!(
                !l.conn.wants_backend_read(),
                "the backend is not read while its session is on a worker"
            );
            let result = run_key_op(job);
            l.key_op_done(result);
            jobs += 1;
            moved = true;
        }
        if !moved {
            return jobs;
        }
    }
}

#[test]
fn backend_client_signature_with_a_token_key_runs_on_a_key_op_worker() {
    let backend_pki = Pki::new(BACKEND_NAME);
    let client_pki = Pki::new("tlsgate-client.test");
    for versions in [TLS13, TLS12] {
        let key = SlowSigningKey::new(client_pki.signing_key(), Duration::ZERO);
        let signatures = key.signature_counter();
        let mut l = link_with_client_key(&backend_pki, &client_pki, Arc::new(key), versions, true);
        let mut backend = backend_requiring_client_cert(&backend_pki, &client_pki);
        l.client_send(b"request");
        // The backend's whole flight (CertificateRequest included) reaches the core.
        exchange(&mut l, &mut backend);
        assert_eq!(l.jobs.len(), 1, "{versions:?}: the flight went to a worker");
        assert_eq!(
            signatures.load(Ordering::Relaxed),
            0,
            "{versions:?}: nothing signed on the io thread"
        );
        assert!(l.conn.awaiting_key_op());
        assert_eq!(l.conn.backend_out(), b"", "no answer before the worker's");
        assert_eq!(l.conn.closed(), None);

        let jobs = shuttle_with_worker(&mut l, &mut backend);
        assert_eq!(
            signatures.load(Ordering::Relaxed),
            1,
            "{versions:?}: one signature, made by the worker"
        );
        assert!(jobs >= 1, "{versions:?}");
        assert!(
            !backend.is_handshaking(),
            "{versions:?}: backend handshake done"
        );
        assert!(
            backend.peer_certificates().is_some(),
            "{versions:?}: the backend got our certificate"
        );
        let mut got = [0u8; 64];
        let n = backend
            .reader()
            .read(&mut got)
            .expect("plaintext at the backend");
        assert_eq!(&got[..n], b"request", "{versions:?}");
        backend
            .writer()
            .write_all(b"answer")
            .expect("backend plaintext");
        exchange(&mut l, &mut backend);
        assert!(
            l.jobs.is_empty(),
            "{versions:?}: established: no more key ops"
        );
        assert_eq!(l.client_recv(), (b"answer".to_vec(), Ending::Open));
        assert_eq!(l.conn.closed(), None);
    }
}

#[test]
fn backend_records_that_arrive_while_the_worker_signs_wait_for_it() {
    let backend_pki = Pki::new(BACKEND_NAME);
    let client_pki = Pki::new("tlsgate-client.test");
    let mut l = link_with_client_key(
        &backend_pki,
        &client_pki,
        client_pki.signing_key(),
        TLS13,
        true,
    );
    let mut backend = backend_requiring_client_cert(&backend_pki, &client_pki);
    let hello = l.backend_take();
    backend.read_tls(&mut &hello[..]).expect("hello");
    backend.process_new_packets().expect("hello");
    let mut flight = Vec::new();
    while backend.wants_write() {
        backend.write_tls(&mut flight).expect("Vec write");
    }
    // The ServerHello record alone first, then the rest while the session is on the worker
    // (a driver's recv that was already under way when reads paused).
    let first = 5 + usize::from(u16::from_be_bytes([flight[3], flight[4]]));
    l.backend_send(&flight[..first]);
    assert_eq!(l.jobs.len(), 1);
    l.backend_send(&flight[first..]);
    assert_eq!(l.jobs.len(), 1, "one job at a time");
    let job = l.jobs.pop_front().expect("job");
    l.key_op_done(run_key_op(job));
    // The rest of the flight is processed now (on a worker again: still handshaking).
    shuttle_with_worker(&mut l, &mut backend);
    assert!(!backend.is_handshaking());
    assert!(backend.peer_certificates().is_some());
    assert_eq!(l.conn.closed(), None);
}

#[test]
fn a_software_client_key_signs_inline() {
    let backend_pki = Pki::new(BACKEND_NAME);
    let client_pki = Pki::new("tlsgate-client.test");
    let key = SlowSigningKey::new(client_pki.signing_key(), Duration::ZERO);
    let signatures = key.signature_counter();
    let mut l = link_with_client_key(&backend_pki, &client_pki, Arc::new(key), TLS13, false);
    let mut backend = backend_requiring_client_cert(&backend_pki, &client_pki);
    while exchange(&mut l, &mut backend) {}
    assert!(l.jobs.is_empty());
    assert_eq!(signatures.load(Ordering::Relaxed), 1);
    assert!(!backend.is_handshaking());
}

/// A token that fails every signature the way the keystore reports it.
#[derive(Debug)]
struct FailingKey(Arc<dyn SigningKey>);

#[derive(Debug)]
struct FailingSigner(rustls::SignatureScheme);

impl SigningKey for FailingKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        let scheme = self.0.choose_scheme(offered)?.scheme();
        Some(Box::new(FailingSigner(scheme)))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl rustls::sign::Signer for FailingSigner {
    fn sign(&self, _message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        Err(rustls::Error::Other(rustls::OtherError(Arc::new(
            std::io::Error::other("C_Sign: CKR_DEVICE_ERROR"),
        ))))
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        self.0
    }
}

#[test]
fn a_failed_late_or_refused_backend_key_op_closes_with_its_reason() {
    let backend_pki = Pki::new(BACKEND_NAME);
    let client_pki = Pki::new("tlsgate-client.test");
    let parked = |key: Arc<dyn SigningKey>| {
        let mut l = link_with_client_key(&backend_pki, &client_pki, key, TLS13, true);
        let mut backend = backend_requiring_client_cert(&backend_pki, &client_pki);
        exchange(&mut l, &mut backend);
        assert!(l.conn.awaiting_key_op());
        l
    };
    for (failure, reason) in [
        (KeyOpFailure::Deadline, CloseReason::KeyOpTimeout),
        (KeyOpFailure::Rejected, CloseReason::KeyOpRejected),
    ] {
        let mut l = parked(client_pki.signing_key());
        l.jobs.clear();
        l.key_op_done(Err(failure));
        assert_eq!(l.conn.closed(), Some(reason));
        assert_eq!(
            l.client_recv(),
            (Vec::new(), Ending::CloseNotify),
            "the client learns the backend is gone"
        );
    }

    let mut l = parked(Arc::new(FailingKey(client_pki.signing_key())));
    let job = l.jobs.pop_front().expect("job");
    let result = run_key_op(job);
    assert!(matches!(result, Err(KeyOpFailure::Tls { .. })));
    l.key_op_done(result);
    assert_eq!(l.conn.closed(), Some(CloseReason::KeyOpFailed));
    assert_eq!(l.client_recv(), (Vec::new(), Ending::CloseNotify));

    // A worker that never answers: the backend handshake's own deadline still ends it.
    let mut l = parked(client_pki.signing_key());
    let due = l.conn.deadline();
    assert_eq!(due, l.t0 + Limits::default().backend_connect_timeout());
    l.conn.on_timer(due);
    assert_eq!(
        l.conn.closed(),
        Some(CloseReason::BackendTlsError(
            BackendTlsCause::HandshakeTimeout
        ))
    );
    // Its answer, when it comes, changes nothing.
    let job = l.jobs.pop_front().expect("job");
    l.key_op_done(run_key_op(job));
    assert_eq!(
        l.conn.closed(),
        Some(CloseReason::BackendTlsError(
            BackendTlsCause::HandshakeTimeout
        ))
    );
}
