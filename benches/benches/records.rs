//! TLS record protection through rustls (aws-lc-rs), the per-byte cost of the data plane:
//! `seal` = plaintext written to a connection and its TLS records taken out; `seal_open` = the
//! same records also fed to the peer, decrypted and read back. Open alone is the difference.
//! TLS 1.3 with each suite tlsgate offers, 1 KiB and 16 KiB writes (one full record).
//!
//!     cargo bench -p tlsgate-benches --bench records

use std::io::{Read, Write};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

fn pair(suite: rustls::SupportedCipherSuite) -> (ClientConnection, ServerConnection) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let provider = Arc::new(CryptoProvider {
        cipher_suites: vec![suite],
        ..aws_lc_rs::default_provider()
    });
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config");
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.der().to_vec()))
        .expect("root");
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c = ClientConnection::new(
        Arc::new(client),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client");
    let mut s = ServerConnection::new(Arc::new(server)).expect("server");
    let mut buf = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("client write");
        }
        feed(&mut s, &buf);
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("server write");
        }
        feed(&mut c, &buf);
    }
    (c, s)
}

fn feed<D>(conn: &mut rustls::ConnectionCommon<D>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes).expect("read_tls");
        conn.process_new_packets().expect("process");
    }
}

fn records(c: &mut Criterion) {
    let suites = [
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    let mut group = c.benchmark_group("tls13_records");
    for suite in suites {
        let name = format!("{:?}", suite.suite());
        for size in [1024usize, 16 * 1024] {
            let plain = vec![0x61u8; size];
            let mut wire = Vec::with_capacity(size + 1024);
            let mut back = vec![0u8; size];
            group.throughput(Throughput::Bytes(size as u64));
            // Each bench has its own pair: records sealed and dropped advance the client's
            // sequence number, which the server would then refuse.
            let (mut client, _server) = pair(suite);
            group.bench_with_input(
                BenchmarkId::new(format!("seal/{name}"), size),
                &size,
                |b, _| {
                    b.iter(|| {
                        client.writer().write_all(&plain).expect("write");
                        wire.clear();
                        while client.wants_write() {
                            client.write_tls(&mut wire).expect("write_tls");
                        }
                    })
                },
            );
            let (mut client, mut server) = pair(suite);
            group.bench_with_input(
                BenchmarkId::new(format!("seal_open/{name}"), size),
                &size,
                |b, _| {
                    b.iter(|| {
                        client.writer().write_all(&plain).expect("write");
                        wire.clear();
                        while client.wants_write() {
                            client.write_tls(&mut wire).expect("write_tls");
                        }
                        feed(&mut server, &wire);
                        server.reader().read_exact(&mut back).expect("read back");
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, records);
criterion_main!(benches);
