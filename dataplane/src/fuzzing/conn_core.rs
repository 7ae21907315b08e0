//! The sans-io connection core (`conn::Conn`) driven by fuzz input, with a simulated driver
//! that keeps the driver contract (reads only when the core wants them, answers every event).
//!
//! Input: a flags byte, then a script.
//! - bit 0: key operations offloaded (tripwire + replay on a "worker", run synchronously here);
//!   bit 1: PROXY v2 header to the backend; bit 2: unknown SNI refused; bit 7: 1 KiB buffers.
//! - bit 3 clear, *raw* mode: the script is a list of driver events with arbitrary bytes as
//!   client and backend data (ClientHellos captured from real clients are the seeds).
//! - bit 3 set, *scripted* mode: a real rustls client talks to the core; the script chooses
//!   what the client and the backend send, chunking, timers, key-op failures and damaged bytes.
//!   bits 4-5: client versions (1: TLS 1.2, 2: TLS 1.3, else both); bit 6: a second connection
//!   that resumes the first one's session.
//!
//! Invariants: no panic; the buffers stay within their bounds; a closed connection wants
//! nothing more; and in scripted mode, when nothing was damaged or failed, the handshake
//! completes, the backend receives exactly the PROXY header and what the client sent, the
//! client receives exactly what the backend sent, and the closing handshake finishes the
//! connection.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::ClientConnection;
use rustls::crypto::aws_lc_rs::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::ServerSessionMemoryCache;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};

use super::input::Input;
use crate::config::Limits;
use crate::conn::{proxy_v2, run_key_op, CloseReason, Conn, Event, KeyOpFailure};
use crate::snapshot::{ListenerSnapshot, Prepared, PreparedListener, Snapshot, SniFilter};

const SERVER_NAME: &str = "fuzz.example";
/// Rounds of a scripted connection that read the script.
const SCRIPT_ROUNDS: usize = 256;
/// Bytes the backend may deliver per read (a driver's read chunk).
const BACKEND_CHUNK: usize = 4096;
/// Room over `buffer_bytes` for what one step may add: a handshake flight, one encrypted
/// backend chunk, an alert.
const SLACK: usize = 16 * 1024;

struct Pki {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        // The fixtures are checked in and made by fuzz/make-seeds.sh: parsing them cannot fail.
        let leaf = CertificateDer::from_pem_slice(include_bytes!("fixtures/leaf.pem"))
            .expect("fixture leaf");
        let ca =
            CertificateDer::from_pem_slice(include_bytes!("fixtures/ca.pem")).expect("fixture CA");
        let key = PrivateKeyDer::from_pem_slice(include_bytes!("fixtures/leaf.key"))
            .expect("fixture key");
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone()).expect("fixture CA is a trust anchor");
        Pki {
            chain: vec![leaf, ca],
            key,
            roots: Arc::new(roots),
        }
    })
}

fn peer() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 7], 40_000))
}

fn local() -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 1], 443))
}

/// A fresh listener (own session cache) for one fuzz input.
fn listener(flags: u8) -> Arc<PreparedListener> {
    let p = pki();
    let mut tls = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(&[&TLS13, &TLS12])
        .expect("the provider supports both versions")
        .with_no_client_auth()
        .with_single_cert(p.chain.clone(), p.key.clone_key())
        .expect("the fixture key matches its certificate");
    tls.session_storage = ServerSessionMemoryCache::new(16);
    let snap = ListenerSnapshot {
        name: "fuzz".into(),
        bind: local(),
        tls: Arc::new(tls),
        offload_key_ops: flags & 1 != 0,
        backend: SocketAddr::from(([127, 0, 0, 1], 8080)),
        proxy_protocol: flags & 2 != 0,
        sni_filter: (flags & 4 != 0)
            .then(|| SniFilter::new(|sni| sni.is_none_or(|s| s == SERVER_NAME))),
        client_cert_check: None,
        backend_tls: None,
        routes: None,
        acme_tls_alpn: None,
    };
    let names = ["fuzz".to_owned()];
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
        .expect("the listener is in its own snapshot")
}

fn limits(flags: u8) -> Limits {
    let mut l = Limits::default();
    if flags & 0x80 != 0 {
        l.buffer_bytes = 1024;
        l.max_client_hello_bytes = 4096;
    }
    l
}

/// The simulated driver around one connection.
struct Sim {
    conn: Conn,
    now: Instant,
    cap: usize,
    /// Next key operation: 6 → queue full, 7 → deadline, else it runs.
    key_op_outcome: u8,
    backend_connect_fails: bool,
    stall_client: bool,
    stall_backend: bool,
    backend_connected: bool,
    /// Something other than the happy path happened (a failure was injected).
    disturbed: bool,
    to_client_wire: Vec<u8>,
    backend_got: Vec<u8>,
}

impl Sim {
    fn new(listener: Arc<PreparedListener>, limits: &Limits, now: Instant) -> Self {
        Self {
            conn: Conn::new(listener, limits, false, peer(), local(), now),
            now,
            cap: limits.buffer_bytes,
            key_op_outcome: 0,
            backend_connect_fails: false,
            stall_client: false,
            stall_backend: false,
            backend_connected: false,
            disturbed: false,
            to_client_wire: Vec::new(),
            backend_got: Vec::new(),
        }
    }

    /// Does what a driver does until nothing moves: answers events, writes what is queued
    /// (unless that socket is stalled), shuts write sides when asked. Checks the invariants.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut progressed = false;
            while let Some(ev) = self.conn.take_event() {
                progressed = true;
                match ev {
                    Event::Offload(job) => {
                        let result = match self.key_op_outcome % 8 {
                            6 => Err(KeyOpFailure::Rejected),
                            7 => Err(KeyOpFailure::Deadline),
                            _ => run_key_op(job),
                        };
                        if result.is_err() {
                            self.disturbed = true;
                        }
                        self.conn.on_key_op_done(result, self.now);
                    }
                    Event::HandshakeDone(info) => {
                        assert!(!self.conn.is_handshaking());
                        assert!(info.version.starts_with("TLSv1_"));
                        if self.backend_connect_fails {
                            self.disturbed = true;
                            self.conn.abort(CloseReason::BackendConnectFailed);
                        } else {
                            self.conn.on_backend_connected(self.now);
                            self.backend_connected = true;
                        }
                    }
                }
            }
            let n = self.conn.client_out().len();
            if n > 0 && !self.stall_client {
                self.to_client_wire
                    .extend_from_slice(self.conn.client_out());
                self.conn.client_written(n, self.now);
                progressed = true;
            }
            let n = self.conn.backend_out().len();
            if n > 0 && !self.stall_backend {
                assert!(self.backend_connected, "backend bytes before the connect");
                self.backend_got.extend_from_slice(self.conn.backend_out());
                self.conn.backend_written(n, self.now);
                progressed = true;
            }
            if self.conn.wants_backend_shutdown() {
                self.conn.backend_write_shut();
                progressed = true;
            }
            if self.conn.wants_client_shutdown() {
                self.conn.client_write_shut();
                progressed = true;
            }
            self.check();
            if !progressed {
                return;
            }
        }
        panic!("the connection core keeps asking for work without end");
    }

    fn check(&self) {
        let c = &self.conn;
        let _ = c.deadline();
        assert!(
            c.client_out().len() <= self.cap + SLACK,
            "client queue over its bound: {}",
            c.client_out().len()
        );
        assert!(
            c.backend_out().len() <= self.cap + SLACK,
            "backend queue over its bound: {}",
            c.backend_out().len()
        );
        if c.closed().is_some() {
            assert!(!c.wants_client_read(), "closed but wants client reads");
            assert!(!c.wants_backend_read(), "closed but wants backend reads");
            assert!(!c.wants_backend_shutdown() && !c.wants_client_shutdown());
            assert!(!c.is_finished(), "closed and finished at once");
            assert!(
                c.backend_out().is_empty(),
                "closed with bytes for the backend"
            );
        }
    }

    fn client_data(&mut self, data: &[u8]) {
        if self.conn.wants_client_read() {
            self.conn.on_client_data(data, self.now);
        }
    }

    fn backend_data(&mut self, data: &[u8]) -> bool {
        if self.conn.wants_backend_read() {
            self.conn.on_backend_data(data, self.now);
            true
        } else {
            false
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        self.conn.on_timer(self.now);
    }
}

/// See the module docs.
pub fn conn_core(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let listener = listener(flags);
    let limits = limits(flags);
    let start = Instant::now();
    if flags & 0x08 == 0 {
        raw(listener, &limits, start, &mut input);
        return;
    }
    let versions: &[&'static SupportedProtocolVersion] = match (flags >> 4) & 3 {
        1 => &[&TLS12],
        2 => &[&TLS13],
        _ => &[&TLS13, &TLS12],
    };
    let client = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_protocol_versions(versions)
            .expect("the provider supports both versions")
            .with_root_certificates(pki().roots.clone())
            .with_no_client_auth(),
    );
    let connections = if flags & 0x40 != 0 { 2 } else { 1 };
    for _ in 0..connections {
        scripted(
            listener.clone(),
            &limits,
            client.clone(),
            flags & 2 != 0,
            start,
            &mut input,
        );
    }
}

fn raw(listener: Arc<PreparedListener>, limits: &Limits, now: Instant, input: &mut Input<'_>) {
    let mut sim = Sim::new(listener, limits, now);
    while !input.is_empty() {
        match input.u8() % 10 {
            0 => {
                let n = usize::from(input.u16());
                let d = input.take(n);
                sim.client_data(d);
            }
            1 => {
                if sim.conn.wants_client_read() {
                    sim.conn.on_client_eof(sim.now);
                }
            }
            2 => {
                let n = usize::from(input.u8()) * 16;
                let d = input.take(n.min(BACKEND_CHUNK));
                sim.backend_data(d);
            }
            3 => {
                if sim.conn.wants_backend_read() {
                    sim.conn.on_backend_eof(sim.now);
                }
            }
            4 => {
                let ms = u64::from(input.u16()) * 10;
                sim.advance(ms);
            }
            5 => sim.stall_client = !sim.stall_client,
            6 => sim.stall_backend = !sim.stall_backend,
            7 => sim.key_op_outcome = input.u8(),
            8 => sim.conn.abort(CloseReason::ClientIoError),
            _ => sim.backend_connect_fails = !sim.backend_connect_fails,
        }
        sim.settle();
    }
}

/// Reads everything rustls has for us; false when the client refused what it got.
fn client_receive(client: &mut ClientConnection, wire: &[u8], got: &mut Vec<u8>) -> bool {
    let mut rd = wire;
    while !rd.is_empty() {
        match client.read_tls(&mut rd) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        if client.process_new_packets().is_err() {
            return false;
        }
    }
    let mut buf = [0u8; 4096];
    loop {
        match client.reader().read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

fn flush_client(client: &mut ClientConnection, pending: &mut Vec<u8>) {
    while client.wants_write() {
        match client.write_tls(pending) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn scripted(
    listener: Arc<PreparedListener>,
    limits: &Limits,
    config: Arc<ClientConfig>,
    proxy: bool,
    now: Instant,
    input: &mut Input<'_>,
) {
    let name = ServerName::try_from(SERVER_NAME).expect("literal name");
    let mut client = ClientConnection::new(config, name).expect("client config is complete");
    let mut sim = Sim::new(listener, limits, now);
    let mut pending = Vec::new();
    let mut client_sent = Vec::new();
    let mut client_got = Vec::new();
    let mut backend_queue = Vec::new();
    let mut backend_sent = Vec::new();
    let mut damaged = false;
    // The script drives the first rounds; after it (or after SCRIPT_ROUNDS) the rounds only
    // deliver what is queued, which must settle within a few rounds.
    let mut after_script = Input::new(&[]);
    let mut quiet = false;
    for round in 0..SCRIPT_ROUNDS + 64 {
        let input = if round < SCRIPT_ROUNDS {
            &mut *input
        } else {
            &mut after_script
        };
        flush_client(&mut client, &mut pending);
        match input.u8() % 16 {
            1 if !pending.is_empty() => {
                let i = usize::from(input.u16()) % pending.len();
                pending[i] ^= 1 << (input.u8() % 8);
                damaged = true;
            }
            2 if !pending.is_empty() => {
                let keep = usize::from(input.u16()) % pending.len();
                pending.truncate(keep);
                damaged = true;
            }
            3 if !client.is_handshaking() => {
                let n = usize::from(input.u8());
                let d = input.take(n);
                if client.writer().write_all(d).is_ok() {
                    client_sent.extend_from_slice(d);
                }
                flush_client(&mut client, &mut pending);
            }
            4 => {
                let n = usize::from(input.u8()) * 8;
                backend_queue.extend_from_slice(input.take(n));
            }
            5 => {
                let ms = u64::from(input.u16()) * 10;
                sim.advance(ms);
            }
            6 => sim.key_op_outcome = input.u8(),
            _ => {}
        }
        if !pending.is_empty() && sim.conn.wants_client_read() {
            let n = match input.u8() {
                0 => pending.len(),
                k => (usize::from(k) * 37) % pending.len() + 1,
            };
            sim.client_data(&pending[..n]);
            pending.drain(..n);
        }
        if !backend_queue.is_empty() && sim.backend_connected {
            let n = backend_queue.len().min(BACKEND_CHUNK);
            if sim.backend_data(&backend_queue[..n]) {
                backend_sent.extend(backend_queue.drain(..n));
            }
        }
        sim.settle();
        let wire = std::mem::take(&mut sim.to_client_wire);
        if !client_receive(&mut client, &wire, &mut client_got) {
            // The client refused what it got (after damage, or an alert): it is done.
            damaged = true;
            break;
        }
        if sim.conn.closed().is_some() {
            break;
        }
        // Damaged bytes keep flowing until the script ends, so the core sees what follows.
        quiet = pending.is_empty() && !client.wants_write() && backend_queue.is_empty();
        if input.is_empty() && quiet && (damaged || !client.is_handshaking()) {
            break;
        }
    }
    if damaged || sim.disturbed || sim.conn.closed().is_some() {
        return;
    }
    assert!(
        quiet,
        "an undisturbed connection settles once the script ends"
    );
    // Nothing went wrong: the proxy must have been exact, and closing must finish cleanly.
    assert!(
        !client.is_handshaking(),
        "an undisturbed handshake completes"
    );
    assert!(sim.backend_connected);
    let mut expected = Vec::new();
    if proxy {
        expected.extend_from_slice(&proxy_v2::header(peer(), local()));
    }
    expected.extend_from_slice(&client_sent);
    assert_eq!(
        sim.backend_got, expected,
        "the backend gets what the client sent"
    );
    assert_eq!(
        client_got, backend_sent,
        "the client gets what the backend sent"
    );

    client.send_close_notify();
    flush_client(&mut client, &mut pending);
    sim.client_data(&pending);
    sim.settle();
    if sim.conn.wants_client_read() {
        sim.conn.on_client_eof(sim.now);
        sim.settle();
    }
    assert!(sim.conn.wants_backend_read(), "the backend may still talk");
    sim.conn.on_backend_eof(sim.now);
    sim.settle();
    let wire = std::mem::take(&mut sim.to_client_wire);
    assert!(client_receive(&mut client, &wire, &mut client_got));
    assert_eq!(sim.conn.closed(), None);
    assert!(sim.conn.is_finished(), "both directions closed: finished");
}
