//! Shared harness for the data-plane end-to-end tests: test PKI, backends, clients, start-up.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tlsgate_dataplane::testing::{FixedCert, SlowSigningKey};
use tlsgate_dataplane::{
    start, Dataplane, DataplaneConfig, Error, IoDriver, ListenerSnapshot, Snapshot,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Ecdsa,
    Rsa,
}

/// A CA and a `localhost` leaf signed by it.
pub struct Pki {
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
    pub leaf: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

pub fn pki(kind: KeyKind) -> Pki {
    pki_for(kind, &["localhost"])
}

/// Like [`pki`], with a leaf for these names.
pub fn pki_for(kind: KeyKind, names: &[&str]) -> Pki {
    let alg = match kind {
        KeyKind::Ecdsa => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyKind::Rsa => &rcgen::PKCS_RSA_SHA256,
    };
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tlsgate test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate_for(alg).expect("leaf key");
    let leaf_params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
    let leaf = leaf_params
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    Pki {
        ca_der: ca.der().clone(),
        ca_pem: ca.pem(),
        leaf: leaf.der().clone(),
        key_der: leaf_key.serialize_der(),
    }
}

/// Server config with the test key, optionally slowed down per signature.
/// A server configuration whose key sleeps for a delay that the returned control changes at any
/// time (starting at `delay`), with its signature counter.
pub fn server_config_with_delay(
    p: &Pki,
    delay: Duration,
) -> (
    Arc<ServerConfig>,
    Arc<std::sync::atomic::AtomicU64>,
    tlsgate_dataplane::testing::DelayControl,
) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.key_der.clone()));
    let signing = provider
        .key_provider
        .load_private_key(key)
        .expect("load key");
    let slow = SlowSigningKey::new(signing, delay);
    let (counter, control) = (slow.signature_counter(), slow.delay_control());
    let ck = Arc::new(CertifiedKey::new(vec![p.leaf.clone()], Arc::new(slow)));
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedCert(ck)));
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
    (Arc::new(cfg), counter, control)
}

pub fn server_config(
    p: &Pki,
    slow: Option<Duration>,
) -> (Arc<ServerConfig>, Option<Arc<std::sync::atomic::AtomicU64>>) {
    if let Some(delay) = slow {
        let (cfg, counter, _) = server_config_with_delay(p, delay);
        return (cfg, Some(counter));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.key_der.clone()));
    let signing = provider
        .key_provider
        .load_private_key(key)
        .expect("load key");
    let ck = Arc::new(CertifiedKey::new(vec![p.leaf.clone()], signing));
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedCert(ck)));
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
    (Arc::new(cfg), None)
}

pub fn client_config(
    p: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(p.ca_der.clone()).expect("root");
    let cfg = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(cfg)
}

pub fn all_versions() -> &'static [&'static rustls::SupportedProtocolVersion] {
    rustls::ALL_VERSIONS
}

/// The drivers every end-to-end test runs against. A driver this build or kernel cannot run is
/// skipped by `start_dp` with a printed reason.
pub fn drivers() -> Vec<IoDriver> {
    vec![IoDriver::Portable, IoDriver::Uring]
}

pub fn cores() -> Vec<usize> {
    let n = thread::available_parallelism().map_or(1, |n| n.get());
    (0..n.min(2)).collect()
}

/// Pins the calling (load) thread to the last CPU when there are several, at nice 10, so clients in timing tests
/// leave CPU 0 to the data-plane core under test (as a benchmark pins server and generator
/// apart). On one CPU it does nothing.
pub fn pin_client_thread() {
    let n = thread::available_parallelism().map_or(1, |n| n.get());
    if n > 1 {
        core_affinity::set_for_current(core_affinity::CoreId { id: n - 1 });
    }
    // The load is the generator, not what is measured: the probe thread (normal priority)
    // must not queue behind 64 load threads for its own CPU time.
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
}

pub fn listener(name: &str, tls: Arc<ServerConfig>, backend: SocketAddr) -> ListenerSnapshot {
    ListenerSnapshot {
        name: name.to_string(),
        bind: "127.0.0.1:0".parse().expect("literal"),
        tls,
        offload_key_ops: false,
        backend,
        proxy_protocol: false,
        sni_filter: None,
        client_cert_check: None,
        backend_tls: None,
        routes: None,
        acme_tls_alpn: None,
    }
}

/// Starts the data plane; `None` when the driver cannot run here (a skip outside CI, a failure
/// under `CI=true`: see `tlsgate_hw_tests::skip`).
pub fn start_dp(
    mut cfg: DataplaneConfig,
    io: IoDriver,
    listeners: Vec<ListenerSnapshot>,
) -> Option<Dataplane> {
    cfg.io = io;
    match start(cfg, Arc::new(Snapshot { listeners })) {
        Ok(dp) => Some(dp),
        Err(Error::UringUnavailable { why }) => {
            tlsgate_hw_tests::skip::missing(format!("driver {io:?}: io_uring unavailable: {why}"));
            None
        }
        Err(e) => panic!("start failed: {e}"),
    }
}

pub fn addr(dp: &Dataplane) -> SocketAddr {
    dp.local_addrs()[0].1
}

/// A backend on port 0: each connection is handed to `serve` on a thread of its own.
pub fn tcp_backend<F>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let serve = serve.clone();
            thread::spawn(move || serve(s));
        }
    });
    a
}

/// An address whose connects neither succeed nor fail: a listener with a backlog of 0 that
/// never accepts, its queue already full, so the kernel drops further SYNs. Keep it alive while
/// it is used.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<TcpStream>,
}

pub fn blackhole() -> Blackhole {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    sock.listen(0).expect("listen");
    let addr = sock.local_addr().expect("addr").as_socket().expect("inet");
    let queued = (0..2)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    Blackhole {
        addr,
        _listener: sock,
        _queued: queued,
    }
}

/// Sends a connection's bytes back; FIN answered with FIN.
pub fn echo(mut s: TcpStream) {
    let Ok(mut w) = s.try_clone() else { return };
    let _ = io::copy(&mut s, &mut w);
    let _ = w.shutdown(Shutdown::Write);
}

/// Echo backend: every connection gets its bytes back; FIN answered with FIN.
pub fn echo_backend() -> SocketAddr {
    tcp_backend(echo)
}

/// HTTP backend: answers every request with a fixed body and closes.
pub const HTTP_BODY: &str = "hello from the backend";
pub fn http_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            thread::spawn(move || {
                let Ok(mut w) = s.try_clone() else { return };
                let mut r = BufReader::new(s);
                let mut line = String::new();
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" || line == "\n" => break,
                        Ok(_) => {}
                    }
                }
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    HTTP_BODY.len(),
                    HTTP_BODY
                );
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    a
}

/// A blocking rustls client stream.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Like [`connect`], for load loops that must survive a refused or reset connection.
pub fn try_connect(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> io::Result<Tls> {
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let conn = rustls::ClientConnection::new(
        cfg.clone(),
        ServerName::try_from("localhost").map_err(io::Error::other)?,
    )
    .map_err(io::Error::other)?;
    Ok(rustls::StreamOwned::new(conn, sock))
}

pub fn connect(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> Tls {
    let sock = TcpStream::connect(addr).expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let conn = rustls::ClientConnection::new(
        cfg.clone(),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client conn");
    rustls::StreamOwned::new(conn, sock)
}

/// Completes the handshake.
pub fn handshake(t: &mut Tls) -> io::Result<()> {
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock)?;
    }
    Ok(())
}

/// Writes `msg`, reads exactly as many bytes back.
pub fn echo_once(t: &mut Tls, msg: &[u8]) -> io::Result<Vec<u8>> {
    t.write_all(msg)?;
    t.flush()?;
    let mut back = vec![0; msg.len()];
    t.read_exact(&mut back)?;
    Ok(back)
}

/// Sends an HTTP request, returns the whole response (to EOF).
pub fn http_get(t: &mut Tls) -> io::Result<String> {
    t.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut out = Vec::new();
    match t.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Runs a full-duplex transfer through one TLS connection: sends `n` pseudo-random bytes while
/// receiving whatever comes back until close_notify/EOF. Returns (sent sha256, received bytes
/// sha256, received length).
pub fn duplex(t: Tls, n: u64, seed: u64) -> io::Result<(Vec<u8>, Vec<u8>, u64)> {
    let Tls { conn, sock } = t;
    let conn = Arc::new(Mutex::new(conn));
    let wsock = sock.try_clone()?;
    let wconn = conn.clone();
    let writer = thread::spawn(move || -> io::Result<Vec<u8>> {
        let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut rng = Lcg(seed);
        let mut left = n;
        let mut buf = vec![0u8; 64 * 1024];
        let mut wsock = wsock;
        let mut out = Vec::new();
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..k]);
            h.update(&buf[..k]);
            {
                let mut c = wconn.lock().map_err(|_| io::Error::other("poisoned"))?;
                c.writer().write_all(&buf[..k])?;
                out.clear();
                while c.wants_write() {
                    c.write_tls(&mut out)?;
                }
            }
            wsock.write_all(&out)?;
            left -= k as u64;
        }
        {
            let mut c = wconn.lock().map_err(|_| io::Error::other("poisoned"))?;
            c.send_close_notify();
            out.clear();
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        wsock.write_all(&out)?;
        Ok(h.finish().as_ref().to_vec())
    });
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut got = 0u64;
    let mut rsock = sock;
    let mut buf = vec![0u8; 64 * 1024];
    let mut plain = vec![0u8; 64 * 1024];
    'outer: loop {
        let k = rsock.read(&mut buf)?;
        let mut c = conn.lock().map_err(|_| io::Error::other("poisoned"))?;
        if k == 0 {
            let _ = c.read_tls(&mut io::empty());
        } else {
            let mut rd = &buf[..k];
            while !rd.is_empty() {
                c.read_tls(&mut rd)?;
                c.process_new_packets().map_err(io::Error::other)?;
                loop {
                    match c.reader().read(&mut plain) {
                        Ok(0) => break 'outer,
                        Ok(m) => {
                            h.update(&plain[..m]);
                            got += m as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            // Anything the reader side wants to send (tickets acks: none in TLS) waits for the
            // writer thread, which alone writes to the socket so records never interleave.
            drop(c);
            continue;
        }
        break;
    }
    let sent = writer
        .join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    Ok((sent, h.finish().as_ref().to_vec(), got))
}

struct Lcg(u64);
impl Lcg {
    fn fill(&mut self, b: &mut [u8]) {
        for chunk in b.chunks_mut(8) {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = self.0.to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Waits (bounded) until `f` holds, polling the data plane's counters.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < end {
        if f() {
            return;
        }
        thread::yield_now();
        thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out waiting for: {what}");
}
