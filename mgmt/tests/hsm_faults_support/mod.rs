//! Harness for the HSM fault tests: an appliance started on the fault-injecting PKCS#11 shim
//! (its control file, a 64-client handshake load, metrics scraped), one key imported on two
//! tokens, and the probe client that measures round trips while the load runs.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::common::{self, demo_backend, uri, Lab, Serve};

pub const SIGN_DELAY: &str = "20ms";
pub const IN_FLIGHT: usize = 64;

/// The shim is built beside the binary by `cargo build --workspace` (scripts/test.sh does).
pub fn shim_path() -> Result<PathBuf> {
    let bin = Path::new(env!("CARGO_BIN_EXE_tlsgate"));
    let shim = bin
        .parent()
        .context("binary dir")?
        .join("libtlsgate_pkcs11_shim.so");
    ensure!(
        shim.exists(),
        "{} is missing: run `cargo build -p tlsgate-pkcs11-shim` first (scripts/test.sh builds the workspace before testing)",
        shim.display()
    );
    Ok(shim)
}

/// Replaces the control file in one step (write beside, rename over), as the shim asks.
pub fn set_faults(control: &Path, directives: &str) -> Result<()> {
    let tmp = control.with_extension("tmp");
    std::fs::write(&tmp, directives)?;
    std::fs::rename(&tmp, control)?;
    Ok(())
}

pub struct Appliance {
    pub lab: Lab,
    pub control: PathBuf,
    pub serve: Serve,
    pub metrics: String,
    pub _backend: common::ChildGuard,
}

pub fn start(io: &str, inline: bool, faults: &str) -> Result<Appliance> {
    let key_ops = format!(
        "workers = {IN_FLIGHT}\nqueue_depth = {queue}\nmax_in_flight_per_core = {queue}\ndeadline_ms = 5000",
        queue = 4 * IN_FLIGHT
    );
    start_with(io, inline, faults, &key_ops)
}

/// `start` with its own `[dataplane.key_ops]` lines.
pub fn start_with(io: &str, inline: bool, faults: &str, key_ops: &str) -> Result<Appliance> {
    start_full(io, inline, faults, key_ops, "", None)
}

/// `start_with` plus lines for `[pkcs11]` and, with `replica`, a second token `lab-b` behind the
/// same shim holding the same key (imported into both from one PKCS#8 file) with these
/// `[[pkcs11.replica]]` lines.
pub fn start_full(
    io: &str,
    inline: bool,
    faults: &str,
    key_ops: &str,
    pkcs11: &str,
    replica: Option<&str>,
) -> Result<Appliance> {
    let lab = Lab::new()?;
    let chain = match replica {
        None => lab.token_key_with_chain("ec-p256", "web")?,
        Some(_) => imported_key_on_two_tokens(&lab)?,
    };
    let replica = match replica {
        None => String::new(),
        Some(lines) => format!(
            "\n[[pkcs11.replica]]\nmodule = \"{shim}\"\ntoken = \"lab-b\"\npin = \"file:{pin}\"\n{lines}\n",
            shim = shim_path()?.display(),
            pin = lab.p("token/user.pin"),
        ),
    };
    let (backend, backend_addr) = demo_backend(lab.dir.path())?;
    let control = lab.path("shim.control");
    set_faults(&control, faults)?;
    let config = lab.path("slow.toml");
    std::fs::write(
        &config,
        format!(
            r#"[pkcs11]
module = "{shim}"
token = "lab"
pin = "file:{pin}"
{pkcs11}
{replica}
[metrics]
listen = "127.0.0.1:0"

[dataplane]
cores = [0]
io = "{io}"
danger_inline_key_ops = {inline}

[dataplane.key_ops]
{key_ops}

[[listener]]
name = "hsm"
bind = "127.0.0.1:0"
backend = "{backend_addr}"

[[listener.certificate]]
chain = "{chain}"
key = "{key}"
"#,
            shim = shim_path()?.display(),
            pin = lab.p("token/user.pin"),
            chain = chain.display(),
            key = uri("web"),
        ),
    )?;
    let serve = Serve::start_with_env(
        &lab,
        &config,
        &[
            ("TLSGATE_SHIM_CONTROL", control.display().to_string()),
            (
                "TLSGATE_SHIM_MODULE",
                "/usr/lib/softhsm/libsofthsm2.so".to_owned(),
            ),
        ],
    )?;
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    let metrics = ready
        .lines()
        .find_map(|l| l.strip_prefix("metrics "))
        .context("metrics address in the ready file")?
        .trim()
        .to_owned();
    Ok(Appliance {
        lab,
        control,
        serve,
        metrics,
        _backend: backend,
    })
}

/// Token `lab-b` beside `lab` in the lab's SoftHSM2 store (same PIN), one P-256 key imported
/// into both as `web`, and a chain for it; returns the chain's path.
pub fn imported_key_on_two_tokens(lab: &Lab) -> Result<PathBuf> {
    let pin = std::fs::read_to_string(lab.path("token/user.pin"))?
        .trim()
        .to_owned();
    common::check(
        std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", lab.path("token/softhsm2.conf"))
            .args(["--init-token", "--free", "--label", "lab-b"])
            .args(["--so-pin", "so-pin-b-1234", "--pin", &pin])
            .output()?,
        "softhsm2-util --init-token lab-b",
    )?;
    common::check(
        std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "EC"])
            .args(["-pkeyopt", "ec_paramgen_curve:P-256", "-out"])
            .arg(lab.path("web.key"))
            .output()?,
        "openssl genpkey",
    )?;
    for token in ["lab", "lab-b"] {
        let mut c = lab.cmd(&["token", "import", "--label", "web", "--key-file"]);
        c.arg(lab.path("web.key"));
        common::check(c.env("TLSGATE_TOKEN", token).output()?, "token import")?;
    }
    lab.localhost_chain("web")
}

/// The tests in this file measure timing: run them one at a time.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn client_config(lab: &Lab) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(lab.path("ca/root.pem"))? {
        roots.add(cert?)?;
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Every load handshake must be a full one that needs the token's signature.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

pub fn connect(
    port: u16,
    config: &Arc<ClientConfig>,
) -> Result<StreamOwned<ClientConnection, TcpStream>> {
    let sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    sock.set_nodelay(true)?;
    let conn = ClientConnection::new(
        config.clone(),
        ServerName::try_from("localhost")?.to_owned(),
    )?;
    Ok(StreamOwned::new(conn, sock))
}

pub fn handshake(t: &mut StreamOwned<ClientConnection, TcpStream>) -> std::io::Result<()> {
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock)?;
    }
    Ok(())
}

/// One keep-alive GET through the appliance to the demo backend; returns when the whole
/// response (content-length) has arrived.
pub fn get(t: &mut StreamOwned<ClientConnection, TcpStream>) -> Result<()> {
    t.write_all(b"GET /probe HTTP/1.1\r\nhost: localhost\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = t.read(&mut chunk)?;
        ensure!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .context("content-length")?
                .trim()
                .parse()?;
            if buf.len() >= end + 4 + len {
                return Ok(());
            }
        }
    }
}

pub fn scrape(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub struct Run {
    pub p99: Duration,
    pub rate: f64,
    pub probes: usize,
}

/// Runs the 64-client handshake load once and measures the probe's round trips in segments, one
/// per entry of `phases` (the shim directives in force during it), `rounds` times over in
/// alternation, so every phase sees the same background load of a shared machine. The first
/// quarter of each segment lets the queue settle and is not counted. One pooled [`Run`] per phase.
pub fn measure(
    app: &Appliance,
    phases: &[&str],
    rounds: usize,
    segment: Duration,
) -> Result<Vec<Run>> {
    let config = client_config(&app.lab)?;
    let port = app.serve.port;
    let mut probe = connect(port, &config)?;
    get(&mut probe)?;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (stop, done, config) = (stop.clone(), done.clone(), config.clone());
            thread::spawn(move || {
                pin_client_thread();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut t) = connect(port, &config) {
                        if handshake(&mut t).is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    let mut rtts = vec![Vec::new(); phases.len()];
    let mut handshakes = vec![0u64; phases.len()];
    let mut spent = vec![Duration::ZERO; phases.len()];
    let mut result = Ok(());
    'rounds: for _ in 0..rounds {
        for (i, phase) in phases.iter().enumerate() {
            if let Err(e) = set_faults(&app.control, phase) {
                result = Err(e);
                break 'rounds;
            }
            let start = Instant::now();
            let done_before = done.load(Ordering::Relaxed);
            let settled = start + segment / 4;
            let end = start + segment;
            while Instant::now() < end {
                let t0 = Instant::now();
                if let Err(e) = get(&mut probe) {
                    result = Err(e);
                    break 'rounds;
                }
                // A probe counts when it completes after the settling time, so a core stalled
                // for the whole segment still yields its (long) round trip.
                let now = Instant::now();
                if now >= settled {
                    rtts[i].push(now - t0);
                }
            }
            // Over the whole segment: an inline core completes its handshakes in bursts (one
            // flush after a queue of serial signatures), so a short window could catch one.
            handshakes[i] += done.load(Ordering::Relaxed) - done_before;
            spent[i] += start.elapsed();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    result?;
    let mut runs = Vec::new();
    for (i, mut r) in rtts.into_iter().enumerate() {
        ensure!(
            !r.is_empty(),
            "phase {:?}: no probe after settling",
            phases[i]
        );
        r.sort();
        runs.push(Run {
            p99: r[(r.len() * 99 / 100).min(r.len() - 1)],
            rate: handshakes[i] as f64 / spent[i].as_secs_f64(),
            probes: r.len(),
        });
    }
    Ok(runs)
}

/// Pins the calling (load) thread to the last CPU when there are several, at nice 10, so the clients leave CPU 0
/// to the appliance's one core (as a benchmark pins server and generator apart).
pub fn pin_client_thread() {
    let n = thread::available_parallelism().map_or(1, |n| n.get());
    if n > 1 {
        core_affinity::set_for_current(core_affinity::CoreId { id: n - 1 });
    }
    // The load is the generator, not what is measured: the probe thread (normal priority)
    // must not queue behind 64 load threads for its own CPU time.
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
}
