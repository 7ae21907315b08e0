//! Harness for the session-resumption tests: a rustls client that counts the tickets and
//! sessions it is given (optionally on a stopped clock), `openssl s_client`, configurations
//! with `[listener.session]` settings, the ready file's ports, the ticket secret on the lab
//! token, and the fault-injecting PKCS#11 shim.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use rustls::client::Tls13ClientSessionValue;
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::time_provider::TimeProvider;
use rustls::{ClientConfig, HandshakeKind, NamedGroup, RootCertStore, SupportedProtocolVersion};

use crate::common::{uri, Lab};

pub const SECRET: &str = "pkcs11:token=lab;object=tickets;type=secret-key";

/// Counts what the server gave the client to resume with.
#[derive(Debug)]
pub struct CountingStore {
    pub inner: Arc<ClientSessionMemoryCache>,
    pub tls13_tickets: AtomicUsize,
    pub tls12_sessions: AtomicUsize,
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(server_name, group)
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.tls12_sessions.fetch_add(1, Ordering::Relaxed);
        self.inner.set_tls12_session(server_name, value)
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.tls13_tickets.fetch_add(1, Ordering::Relaxed);
        self.inner.insert_tls13_ticket(server_name, value)
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

/// A clock stopped at a given time: the client keeps offering a ticket the server has long
/// expired (rustls clients drop tickets past the lifetime the server announced).
#[derive(Debug)]
pub struct Frozen(pub UnixTime);

impl TimeProvider for Frozen {
    fn current_time(&self) -> Option<UnixTime> {
        Some(self.0)
    }
}

pub struct Client {
    pub config: Arc<ClientConfig>,
    pub store: Arc<CountingStore>,
}

pub fn client(
    lab: &Lab,
    version: &'static SupportedProtocolVersion,
    frozen: bool,
) -> Result<Client> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(lab.path("ca/root.pem"))? {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = if frozen {
        ClientConfig::builder_with_details(provider, Arc::new(Frozen(UnixTime::now())))
    } else {
        ClientConfig::builder_with_provider(provider)
    };
    let mut config = builder
        .with_protocol_versions(&[version])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let store = Arc::new(CountingStore {
        inner: Arc::new(ClientSessionMemoryCache::new(32)),
        tls13_tickets: AtomicUsize::new(0),
        tls12_sessions: AtomicUsize::new(0),
    });
    config.resumption = rustls::client::Resumption::store(store.clone());
    Ok(Client {
        config: Arc::new(config),
        store,
    })
}

/// One request through the appliance; returns how the handshake went.
pub fn connect(c: &Client, port: u16) -> Result<HandshakeKind> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let conn = rustls::ClientConnection::new(c.config.clone(), ServerName::try_from("localhost")?)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /resume HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    // Reading the answer also reads the TLS 1.3 tickets sent after the handshake. The demo
    // backend closes after answering.
    let read = tls.read_to_end(&mut body);
    ensure!(
        String::from_utf8_lossy(&body).contains("GET /resume"),
        "no answer from the backend ({read:?}): {:?}",
        String::from_utf8_lossy(&body)
    );
    tls.conn.handshake_kind().context("handshake finished")
}

/// Listeners: (name, key reference, chain).
pub fn listeners(lab: &Lab) -> Result<Vec<(&'static str, String, PathBuf)>> {
    let tok = lab.token_key_with_chain("ec-p256", "tok")?;
    let (sw_key, sw) = lab.software_key_with_chain("EC", "sw")?;
    Ok(vec![
        ("tok", uri("tok"), tok),
        ("sw", format!("file:{}", sw_key.display()), sw),
    ])
}

pub fn write_config(
    lab: &Lab,
    file: &str,
    backend: &str,
    listeners: &[(&str, String, PathBuf, String)],
) -> Result<PathBuf> {
    write_config_with(lab, file, backend, listeners, "", "portable")
}

pub fn write_config_with(
    lab: &Lab,
    file: &str,
    backend: &str,
    listeners: &[(&str, String, PathBuf, String)],
    extra: &str,
    io: &str,
) -> Result<PathBuf> {
    let mut toml = format!(
        "[pkcs11]\ntoken = \"lab\"\npin = \"file:{}\"\n\n[dataplane]\ncores = [0, 1]\nio = \"{io}\"\n{extra}\n",
        lab.p("token/user.pin")
    );
    for (name, key, chain, session) in listeners {
        write!(
            toml,
            "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n\
             [listener.session]\n{session}\n\
             [[listener.certificate]]\nchain = \"{}\"\nkey = \"{key}\"\n",
            chain.display()
        )?;
    }
    let path = lab.path(file);
    std::fs::write(&path, toml)?;
    Ok(path)
}

pub fn ports(config: &Path) -> Result<Vec<(String, u16)>> {
    let text = std::fs::read_to_string(config.with_extension("ready"))?;
    text.lines()
        .filter(|l| !l.starts_with("metrics "))
        .map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next().context("name")?.to_owned();
            let port = it
                .next()
                .and_then(|a| a.rsplit(':').next())
                .context("addr")?
                .parse()?;
            Ok((name, port))
        })
        .collect()
}

pub fn port_of(ports: &[(String, u16)], name: &str) -> Result<u16> {
    ports
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| *p)
        .with_context(|| format!("no listener {name}"))
}

pub fn versions() -> [(&'static str, &'static SupportedProtocolVersion); 2] {
    [
        ("TLS 1.3", &rustls::version::TLS13),
        ("TLS 1.2", &rustls::version::TLS12),
    ]
}

pub fn lab_with_secret() -> Result<Lab> {
    let lab = Lab::new()?;
    let out = lab.run(&[
        "token",
        "generate",
        "--type",
        "ticket-secret",
        "--label",
        "tickets",
    ])?;
    ensure!(out.contains("type=secret-key"), "{out}");
    Ok(lab)
}

/// One request through `openssl s_client`; `-ign_eof` keeps it reading until the appliance
/// closes, so TLS 1.3 tickets (sent after the handshake) are in a saved session.
pub fn s_client(lab: &Lab, port: u16, version: &str, extra: &[&str]) -> Result<String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost", "-CAfile", &lab.p("ca/root.pem")])
        .args([version, "-verify_return_error", "-ign_eof"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"GET /resume HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    // Never hang the suite on a client that does not finish.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            child.kill()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(
        text.contains("GET /resume"),
        "no answer through s_client: {text}"
    );
    Ok(text)
}

/// `uring` when the kernel allows io_uring, else `portable` (and says so).
pub fn uring_or_portable() -> &'static str {
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(v) if v.trim() != "0" => {
            println!("io_uring disabled (kernel.io_uring_disabled = {}): process B runs the portable driver", v.trim());
            "portable"
        }
        _ => "uring",
    }
}

pub fn listeners_sw(
    ls: &[(&'static str, String, PathBuf, String)],
) -> Result<(&'static str, String, PathBuf)> {
    ls.iter()
        .find(|l| l.0 == "sw")
        .map(|l| (l.0, l.1.clone(), l.2.clone()))
        .context("sw listener")
}

pub fn sleep_until(t: f64) {
    let wait = t - unix_now();
    if wait > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(wait));
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The fault-injecting PKCS#11 shim, built beside the binary (scripts/test.sh builds the
/// workspace before testing).
pub fn shim_path() -> Result<PathBuf> {
    let bin = Path::new(env!("CARGO_BIN_EXE_tlsgate"));
    let shim = bin
        .parent()
        .context("binary dir")?
        .join("libtlsgate_pkcs11_shim.so");
    ensure!(
        shim.exists(),
        "{} is missing: run `cargo build -p tlsgate-pkcs11-shim` first",
        shim.display()
    );
    Ok(shim)
}

pub fn metric_sum(metrics_addr: &str, name: &str, label: &str) -> Result<f64> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{metrics_addr}/metrics"))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
