//! A resumed session's client certificate is checked again against the listener's current
//! trust (`ClientCertCheck`): a certificate revoked after the session was made cannot come back
//! through resumption, and a session made without a certificate cannot resume once one is
//! required, on every io driver and both TLS versions.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, HandshakeKind, RootCertStore, ServerConfig};
use tlsgate_dataplane::testing::FixedCert;
use tlsgate_dataplane::{ClientCertCheck, CloseReason, DataplaneConfig};

/// A client CA and one client certificate (chain, key) from it.
fn client_pki() -> (
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::CertificateDer<'static>,
    Vec<u8>,
) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "client CA");
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut leaf = rcgen::CertificateParams::new(vec!["client.test".into()]).expect("params");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&key, &issuer).expect("leaf");
    (
        ca_cert.der().clone(),
        cert.der().clone(),
        key.serialize_der(),
    )
}

#[test]
fn a_resumed_session_is_refused_once_its_client_certificate_is_no_longer_trusted() {
    let backend = http_backend();
    let p = pki(KeyKind::Ecdsa);
    let (client_ca, client_cert, client_key) = client_pki();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            p.key_der.clone(),
        )))
        .expect("server key");
    let mut client_roots = RootCertStore::empty();
    client_roots.add(client_ca).expect("client CA");
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), provider.clone())
            .build()
            .expect("verifier");
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedCert(Arc::new(CertifiedKey::new(
            vec![p.leaf.clone()],
            signing,
        )))));
    server.session_storage = rustls::server::ServerSessionMemoryCache::new(64);
    let server = Arc::new(server);

    for io in drivers() {
        // Stands in for "a new CRL revokes this certificate".
        let revoked = Arc::new(AtomicBool::new(false));
        let flag = revoked.clone();
        let mut l = listener("mtls", server.clone(), backend);
        l.client_cert_check = Some(ClientCertCheck::new(move |chain| {
            !chain.is_empty() && !flag.load(Ordering::SeqCst)
        }));
        let Some(dp) = start_dp(DataplaneConfig::new(cores()), io, vec![l]) else {
            continue;
        };
        for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
            revoked.store(false, Ordering::SeqCst);
            let mut roots = RootCertStore::empty();
            roots.add(p.ca_der.clone()).expect("root");
            let cc = Arc::new(
                ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[v])
                    .expect("versions")
                    .with_root_certificates(roots)
                    .with_client_auth_cert(
                        vec![client_cert.clone()],
                        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key.clone())),
                    )
                    .expect("client cert"),
            );
            let mut t = connect(addr(&dp), &cc);
            let resp = http_get(&mut t).expect("full handshake");
            assert!(resp.ends_with(HTTP_BODY), "{io:?} {v:?}: {resp:?}");
            assert_eq!(t.conn.handshake_kind(), Some(HandshakeKind::Full));

            let rejected_before = dp.stats().closed(CloseReason::ClientCertRejected);
            revoked.store(true, Ordering::SeqCst);
            let mut t = connect(addr(&dp), &cc);
            let resp = http_get(&mut t);
            assert!(
                !matches!(&resp, Ok(r) if r.contains(HTTP_BODY)),
                "{io:?} {v:?}: a revoked client resumed: {resp:?}"
            );
            assert_eq!(
                t.conn.handshake_kind(),
                Some(HandshakeKind::Resumed),
                "{io:?} {v:?}"
            );
            eventually(
                "the resumed connection is counted as a rejected client",
                || dp.stats().closed(CloseReason::ClientCertRejected) == rejected_before + 1,
            );

            // Trusted again: resumption works (the check is what refused above).
            revoked.store(false, Ordering::SeqCst);
            let mut t = connect(addr(&dp), &cc);
            let resp = http_get(&mut t).expect("resumed");
            assert!(resp.ends_with(HTTP_BODY), "{io:?} {v:?}: {resp:?}");
            assert_eq!(
                t.conn.handshake_kind(),
                Some(HandshakeKind::Resumed),
                "{io:?} {v:?}"
            );
        }
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}

/// A session made without a client certificate (the listener did not ask, or asked optionally)
/// cannot resume once the listener's check requires one: the connection closes before the
/// backend sees a byte, and the refusal is counted as a rejected client.
#[test]
fn a_session_without_a_client_certificate_is_refused_once_one_is_required() {
    let backend = http_backend();
    let p = pki(KeyKind::Ecdsa);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            p.key_der.clone(),
        )))
        .expect("server key");
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedCert(Arc::new(CertifiedKey::new(
            vec![p.leaf.clone()],
            signing,
        )))));
    server.session_storage = rustls::server::ServerSessionMemoryCache::new(64);
    let server = Arc::new(server);

    for io in drivers() {
        // Stands in for "the operator set mode = required and reloaded".
        let required = Arc::new(AtomicBool::new(false));
        let flag = required.clone();
        let mut l = listener("was-open", server.clone(), backend);
        l.client_cert_check = Some(ClientCertCheck::of_sessions(move |chain| {
            chain.is_some() || !flag.load(Ordering::SeqCst)
        }));
        let Some(dp) = start_dp(DataplaneConfig::new(cores()), io, vec![l]) else {
            continue;
        };
        for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
            required.store(false, Ordering::SeqCst);
            let mut roots = RootCertStore::empty();
            roots.add(p.ca_der.clone()).expect("root");
            let cc = Arc::new(
                ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[v])
                    .expect("versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            );
            let mut t = connect(addr(&dp), &cc);
            let resp = http_get(&mut t).expect("full handshake");
            assert!(resp.ends_with(HTTP_BODY), "{io:?} {v:?}: {resp:?}");
            let mut t = connect(addr(&dp), &cc);
            http_get(&mut t).expect("resumes while no certificate is required");
            assert_eq!(t.conn.handshake_kind(), Some(HandshakeKind::Resumed));

            let rejected_before = dp.stats().closed(CloseReason::ClientCertRejected);
            required.store(true, Ordering::SeqCst);
            let mut t = connect(addr(&dp), &cc);
            let resp = http_get(&mut t);
            assert!(
                !matches!(&resp, Ok(r) if r.contains(HTTP_BODY)),
                "{io:?} {v:?}: a session without a certificate resumed under `required`: {resp:?}"
            );
            assert_eq!(
                t.conn.handshake_kind(),
                Some(HandshakeKind::Resumed),
                "{io:?} {v:?}: the refusal is the data plane's, after rustls resumed"
            );
            eventually(
                "the chain-less resumption is counted as a rejected client",
                || dp.stats().closed(CloseReason::ClientCertRejected) == rejected_before + 1,
            );
        }
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}
