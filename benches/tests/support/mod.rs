//! Test harness: a small rustls HTTPS server on 127.0.0.1 (port 0), a test CA, and a runner for
//! the real `tlsgate-load` binary.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{HandshakeKind, ServerConfig, ServerConnection, SignatureAlgorithm, SignatureScheme};
use tempfile::TempDir;

/// A test CA and a leaf for `localhost` signed by it, written as PEM into a temp dir.
pub struct Pki {
    pub dir: TempDir,
    pub ca_pem: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

pub fn pki() -> Pki {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &issuer)
        .expect("sign leaf");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem()).expect("write CA");
    std::fs::write(dir.path().join("leaf.pem"), leaf.pem()).expect("write leaf");
    std::fs::write(dir.path().join("leaf.key"), leaf_key.serialize_pem()).expect("write key");
    Pki {
        dir,
        ca_pem,
        chain: vec![leaf.der().clone()],
        key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
    }
}

/// How the test server resumes sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumption {
    /// Server-side session cache: TLS 1.2 session ids, TLS 1.3 stateful tickets.
    Stateful,
    /// Stateless tickets for both versions.
    Tickets,
    /// None at all.
    Off,
}

/// Handshakes the server itself saw, by kind.
#[derive(Debug, Default)]
pub struct Counters {
    pub full: AtomicU64,
    pub resumed: AtomicU64,
    pub failed: AtomicU64,
}

impl Counters {
    pub fn full(&self) -> u64 {
        self.full.load(Ordering::SeqCst)
    }
    pub fn resumed(&self) -> u64 {
        self.resumed.load(Ordering::SeqCst)
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    pub pki: Pki,
}

/// Starts an HTTPS server on 127.0.0.1:0 with one thread per connection. `GET /bytes/N`
/// answers N bytes; anything else a short body. It honours `Connection: close`.
pub fn server(resumption: Resumption) -> TestServer {
    server_with(resumption, false)
}

/// Like [`server`]; with `garbage_signatures` every handshake signature has one bit flipped
/// (a broken signer, e.g. a faulty HSM path).
pub fn server_with(resumption: Resumption, garbage_signatures: bool) -> TestServer {
    let pki = pki();
    let provider = Arc::new(aws_lc_rs::default_provider());
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(pki.key.clone_key()))
        .expect("load key");
    let key: Arc<dyn SigningKey> = if garbage_signatures {
        Arc::new(FlippingKey(key))
    } else {
        key
    };
    let certified = Arc::new(CertifiedKey::new(pki.chain.clone(), key));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .expect("versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCert(certified)));
    match resumption {
        Resumption::Stateful => {}
        Resumption::Tickets => {
            config.ticketer = aws_lc_rs::Ticketer::new().expect("ticketer");
        }
        Resumption::Off => {
            config.session_storage = Arc::new(NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
    }
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            let (config, c) = (config.clone(), c.clone());
            thread::spawn(move || serve(config, sock, &c));
        }
    });
    TestServer {
        addr,
        counters,
        pki,
    }
}

#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A signing key whose signatures have their last bit flipped.
#[derive(Debug)]
struct FlippingKey(Arc<dyn SigningKey>);

impl SigningKey for FlippingKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        self.0
            .choose_scheme(offered)
            .map(|inner| Box::new(FlippingSigner(inner)) as Box<dyn Signer>)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.0.algorithm()
    }
}

#[derive(Debug)]
struct FlippingSigner(Box<dyn Signer>);

impl Signer for FlippingSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let mut sig = self.0.sign(message)?;
        if let Some(last) = sig.last_mut() {
            *last ^= 1;
        }
        Ok(sig)
    }

    fn scheme(&self) -> SignatureScheme {
        self.0.scheme()
    }
}

fn serve(config: Arc<ServerConfig>, mut sock: TcpStream, counters: &Counters) {
    let Ok(mut conn) = ServerConnection::new(config) else {
        return;
    };
    while conn.is_handshaking() {
        if conn.complete_io(&mut sock).is_err() {
            counters.failed.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
    match conn.handshake_kind() {
        Some(HandshakeKind::Resumed) => counters.resumed.fetch_add(1, Ordering::SeqCst),
        _ => counters.full.fetch_add(1, Ordering::SeqCst),
    };
    let mut stream = rustls::Stream::new(&mut conn, &mut sock);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let size = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(6);
        let close = head.to_ascii_lowercase().contains("connection: close");
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: {}\r\n\r\n",
            if close { "close" } else { "keep-alive" }
        )
        .into_bytes();
        response.resize(response.len() + size, b'x');
        if stream
            .write_all(&response)
            .and_then(|()| stream.flush())
            .is_err()
        {
            return;
        }
        if close {
            stream.conn.send_close_notify();
            let _ = stream.conn.complete_io(stream.sock);
            return;
        }
    }
}

/// Runs `tlsgate-load` with `args` plus `--json FILE`, returns the process output and the
/// parsed report (None when no report was written).
pub fn load(args: &[&str]) -> (Output, Option<serde_json::Value>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tlsgate-load"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run tlsgate-load");
    let report = std::fs::read_to_string(&json)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("report is JSON"));
    (out, report)
}

/// Like [`load`] but requires success and a report.
pub fn load_ok(args: &[&str]) -> serde_json::Value {
    let (out, report) = load(args);
    assert!(
        out.status.success(),
        "tlsgate-load failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    report.expect("report written")
}

pub fn u(report: &serde_json::Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a count in {report:#}"))
}

pub fn error_count(report: &serde_json::Value, kind: &str) -> u64 {
    report["errors"][kind].as_u64().unwrap_or(0)
}
