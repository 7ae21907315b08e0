//! The pretend driver: test PKI, listeners prepared the way cores get them, and a [`Link`] that
//! shuttles bytes between a rustls client and a [`Conn`] the way a driver does (it reads from the
//! client only while the core wants it, writes what the core queues, hands key operations to
//! the test instead of a pool).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::ClientConnection;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};

use crate::config::Limits;
use crate::conn::{run_key_op, Conn, Event, HandshakeInfo, KeyOpJob, KeyOpResult};
use crate::snapshot::{ListenerSnapshot, Prepared, PreparedListener, Snapshot};
use crate::testing::FixedCert;

pub(super) const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
pub(super) const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// The addresses the core is told about (they end up in the PROXY header).
pub(super) const PEER: &str = "192.0.2.7:40000";
pub(super) const LOCAL: &str = "198.51.100.1:443";

pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A CA and one leaf it signed, for one DNS name.
pub(super) struct Pki {
    pub ca: CertificateDer<'static>,
    pub leaf: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Pki {
    pub(super) fn new(name: &str) -> Self {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "conn tests CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let leaf = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("leaf params")
            .signed_by(&leaf_key, &issuer)
            .expect("leaf cert");
        Self {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
            key: leaf_key.serialize_der(),
        }
    }

    pub(super) fn signing_key(&self) -> Arc<dyn SigningKey> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        provider()
            .key_provider
            .load_private_key(der)
            .expect("rcgen's key loads")
    }

    /// A server config (both versions, its own session cache) that signs with `key`.
    pub(super) fn server_config_with(
        &self,
        provider: Arc<CryptoProvider>,
        key: Arc<dyn SigningKey>,
    ) -> Arc<ServerConfig> {
        let ck = Arc::new(CertifiedKey::new(vec![self.leaf.clone()], key));
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("default versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FixedCert(ck)));
        cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(64);
        Arc::new(cfg)
    }

    /// The leaf's PKCS#8 key.
    pub(super) fn key_der(&self) -> Vec<u8> {
        self.key.clone()
    }

    pub(super) fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config_with(provider(), self.signing_key())
    }

    pub(super) fn client_config_with(
        &self,
        provider: Arc<CryptoProvider>,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).expect("CA is a valid root");
        let cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }

    pub(super) fn client_config(
        &self,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        self.client_config_with(provider(), versions)
    }
}

/// One `localhost` PKI for the whole test binary: key generation is the slowest step here and
/// nothing mutates it.
pub(super) fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| Pki::new("localhost"))
}

pub(super) fn snapshot(tls: Arc<ServerConfig>) -> ListenerSnapshot {
    ListenerSnapshot {
        name: "conn-test".into(),
        bind: LOCAL.parse().expect("literal"),
        tls,
        offload_key_ops: false,
        backend: "127.0.0.1:8080".parse().expect("literal"),
        proxy_protocol: false,
        sni_filter: None,
        client_cert_check: None,
        backend_tls: None,
        routes: None,
        acme_tls_alpn: None,
    }
}

/// The listener as a core gets it: through [`Prepared`], tripwire twin included.
pub(super) fn prepare(snap: ListenerSnapshot) -> Arc<PreparedListener> {
    let names = vec![snap.name.clone()];
    let prepared = Prepared::new(
        &Snapshot {
            listeners: vec![snap],
        },
        &names,
    );
    prepared
        .listeners
        .into_iter()
        .next()
        .flatten()
        .expect("the snapshot holds the listener it was made from")
}

pub(super) fn inline_listener() -> Arc<PreparedListener> {
    prepare(snapshot(pki().server_config()))
}

pub(super) fn offload_listener(tls: Arc<ServerConfig>) -> Arc<PreparedListener> {
    let mut snap = snapshot(tls);
    snap.offload_key_ops = true;
    prepare(snap)
}

/// How the client's side of the connection ended, as its application would see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// Nothing more to read yet.
    Open,
    /// close_notify received: a clean end of stream.
    CloseNotify,
    /// The transport closed without close_notify: a truncation.
    Truncated,
}

/// A rustls client wired to a [`Conn`] through in-memory "sockets".
pub(super) struct Link {
    pub conn: Conn,
    pub client: ClientConnection,
    /// Accept time.
    pub t0: Instant,
    /// The synthetic clock every call into the core uses.
    pub now: Instant,
    /// Bytes the client sent that the core has not read yet (the client socket's buffer).
    c2s: Vec<u8>,
    /// The client half-closed its socket after the bytes in `c2s`.
    c2s_fin: bool,
    fin_delivered: bool,
    /// Largest single read from the client, as a driver's read chunk.
    pub read_chunk: usize,
    /// The client application reads what the core writes; `false` models a client that has
    /// stopped reading (its socket buffer full).
    pub client_reading: bool,
    /// Key operations handed out, in order; the test decides when (and whether) they run.
    pub jobs: VecDeque<KeyOpJob>,
    pub handshakes: Vec<HandshakeInfo>,
    /// The first error the client's rustls reported (an alert it got, a record it refused).
    pub client_error: Option<rustls::Error>,
}

impl Link {
    pub(super) fn new(
        listener: Arc<PreparedListener>,
        limits: &Limits,
        client: Arc<ClientConfig>,
    ) -> Self {
        Self::with_server_name(listener, limits, client, "localhost")
    }

    pub(super) fn with_server_name(
        listener: Arc<PreparedListener>,
        limits: &Limits,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> Self {
        let t0 = Instant::now();
        let peer: SocketAddr = PEER.parse().expect("literal");
        let local: SocketAddr = LOCAL.parse().expect("literal");
        let conn = Conn::new(listener, limits, false, peer, local, t0);
        let name = ServerName::try_from(name.to_string()).expect("valid DNS name");
        let mut client = ClientConnection::new(client, name).expect("client connection");
        // The client's own plaintext limit would refuse records before the test reads them; the
        // core's bounds are what is under test.
        client.set_buffer_limit(None);
        Self {
            conn,
            client,
            t0,
            now: t0,
            c2s: Vec::new(),
            c2s_fin: false,
            fin_delivered: false,
            read_chunk: 16 * 1024,
            client_reading: true,
            jobs: VecDeque::new(),
            handshakes: Vec::new(),
            client_error: None,
        }
    }

    /// Inline listener, handshake done, backend connected.
    pub(super) fn established(versions: &[&'static SupportedProtocolVersion]) -> Self {
        Self::established_with(inline_listener(), &Limits::default(), versions)
    }

    pub(super) fn established_with(
        listener: Arc<PreparedListener>,
        limits: &Limits,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Self {
        let mut l = Self::new(listener, limits, pki().client_config(versions));
        l.pump();
        l.run_key_ops();
        l.assert_handshake_done();
        l.connect_backend();
        l
    }

    /// Moves bytes both ways and collects events until nothing moves.
    pub(super) fn pump(&mut self) {
        loop {
            let mut progress = false;
            if self.client_error.is_none() {
                while self.client.wants_write() {
                    self.client
                        .write_tls(&mut self.c2s)
                        .expect("writing to a Vec cannot fail");
                    progress = true;
                }
            }
            if self.conn.wants_client_read() {
                if !self.c2s.is_empty() {
                    let n = self.c2s.len().min(self.read_chunk);
                    let chunk: Vec<u8> = self.c2s.drain(..n).collect();
                    self.conn.on_client_data(&chunk, self.now);
                    progress = true;
                } else if self.c2s_fin && !self.fin_delivered {
                    self.fin_delivered = true;
                    self.conn.on_client_eof(self.now);
                    progress = true;
                }
            }
            // Like a driver after close, what the core left for the client (an alert) is still
            // written.
            if self.client_reading
                && self.client_error.is_none()
                && !self.conn.client_out().is_empty()
            {
                let mut out = self.conn.client_out();
                let n = self.client.read_tls(&mut out).unwrap_or(0);
                if n > 0 {
                    self.conn.client_written(n, self.now);
                    progress = true;
                }
                if let Err(e) = self.client.process_new_packets() {
                    self.client_error = Some(e);
                }
            }
            while let Some(ev) = self.conn.take_event() {
                match ev {
                    Event::Offload(job) => self.jobs.push_back(job),
                    Event::HandshakeDone(info) => self.handshakes.push(info),
                }
                progress = true;
            }
            if !progress {
                break;
            }
        }
    }

    /// Runs every pending key operation as a worker would and answers with its result.
    pub(super) fn run_key_ops(&mut self) {
        while let Some(job) = self.jobs.pop_front() {
            let result = run_key_op(job);
            self.key_op_done(result);
        }
    }

    pub(super) fn key_op_done(&mut self, result: KeyOpResult) {
        self.conn.on_key_op_done(result, self.now);
        self.pump();
    }

    pub(super) fn assert_handshake_done(&self) {
        assert!(
            self.conn.closed().is_none(),
            "closed: {:?}",
            self.conn.closed()
        );
        assert!(
            self.client_error.is_none(),
            "client: {:?}",
            self.client_error
        );
        assert!(!self.client.is_handshaking(), "client still handshaking");
        assert_eq!(self.handshakes.len(), 1, "one HandshakeDone event");
        assert!(!self.conn.is_handshaking());
    }

    pub(super) fn connect_backend(&mut self) {
        self.conn.on_backend_connected(self.now);
        self.pump();
    }

    pub(super) fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    pub(super) fn client_send(&mut self, data: &[u8]) {
        self.client
            .writer()
            .write_all(data)
            .expect("client accepts plaintext");
        self.pump();
    }

    pub(super) fn client_close_notify(&mut self) {
        self.client.send_close_notify();
        self.pump();
    }

    /// The client shuts down its socket's write side after what it already sent.
    pub(super) fn client_fin(&mut self) {
        self.c2s_fin = true;
        self.pump();
    }

    /// Client bytes still waiting in its socket because the core did not read them.
    pub(super) fn client_unread(&self) -> usize {
        self.c2s.len()
    }

    /// Plaintext the client application can read now, and whether its stream has ended.
    pub(super) fn client_recv(&mut self) -> (Vec<u8>, Ending) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.client.reader().read(&mut buf) {
                Ok(0) => return (got, Ending::CloseNotify),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (got, Ending::Open),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return (got, Ending::Truncated)
                }
                Err(e) => panic!("client read: {e}"),
            }
        }
    }

    /// The driver closed the client socket: the client's transport reports end of stream.
    pub(super) fn client_socket_closed(&mut self) {
        let _ = self.client.read_tls(&mut io::empty());
        if let Err(e) = self.client.process_new_packets() {
            self.client_error.get_or_insert(e);
        }
    }

    /// The backend reads everything the core has for it (repeatedly: room lets more through).
    pub(super) fn backend_take(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        while !self.conn.backend_out().is_empty() {
            let out = self.conn.backend_out().to_vec();
            self.conn.backend_written(out.len(), self.now);
            got.extend_from_slice(&out);
            self.pump();
        }
        got
    }

    pub(super) fn backend_send(&mut self, data: &[u8]) {
        self.conn.on_backend_data(data, self.now);
        self.pump();
    }

    pub(super) fn backend_eof(&mut self) {
        self.conn.on_backend_eof(self.now);
        self.pump();
    }
}
