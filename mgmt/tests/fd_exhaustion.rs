//! File descriptors run out without collapse, tried from outside on the real binary with a
//! SoftHSM2 token: under `ulimit -n 512` the default connection cap is fitted to the limit (and a
//! cap the file sets that cannot fit is refused with the numbers); a flood of 2,000 connection
//! attempts leaves an established connection working, `/metrics` answering and the token signing,
//! and new full handshakes succeed once the flood is gone.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::policy_support::{http_get, metrics_addr};
use common::{demo_backend, metric, uri, Lab, Serve};
use rustls::pki_types::ServerName;

const NOFILE: u64 = 512;

fn write_config(lab: &Lab, name: &str, backend: &str, limits: &str) -> Result<std::path::PathBuf> {
    let chain = lab.token_key_with_chain("ec-p256", name)?;
    let path = lab.path(&format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[pkcs11]\ntoken = \"lab\"\npin = \"file:{pin}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
             [dataplane]\ncores = [0]\nio = \"portable\"\n{limits}\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n\
             [[listener.certificate]]\nchain = \"{chain}\"\nkey = \"{key}\"\n",
            pin = lab.p("token/user.pin"),
            chain = chain.display(),
            key = uri(name),
        ),
    )?;
    Ok(path)
}

/// `GET /metrics`, which must answer 200.
fn scrape(addr: &str) -> Result<String> {
    let out = http_get(addr, "/metrics")?;
    ensure!(out.starts_with("HTTP/1.1 200"), "{out}");
    Ok(out)
}

fn client(lab: &Lab) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_file_iter(lab.path("ca/root.pem"))? {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Every handshake full: each one needs the token.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A full TLS handshake (a token signature) and one HTTP request through the appliance.
fn request(cfg: &Arc<rustls::ClientConfig>, port: u16) -> Result<Tls> {
    let sock = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
    )?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ClientConnection::new(cfg.clone(), ServerName::try_from("localhost")?)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    get(&mut tls)?;
    Ok(tls)
}

fn get(tls: &mut Tls) -> Result<()> {
    tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")?;
    let mut buf = [0u8; 4096];
    let n = tls.read(&mut buf)?;
    let head = String::from_utf8_lossy(&buf[..n]);
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(())
}

#[test]
fn a_connection_cap_the_limit_cannot_hold_is_refused_with_the_numbers() -> Result<()> {
    let lab = Lab::new()?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(
        &lab,
        "chosen",
        &backend,
        "[dataplane.limits]\nmax_connections_per_core = 1000\n",
    )?;
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_tlsgate"));
    lab.env(&mut cmd);
    cmd.args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = common::ChildGuard {
        child: cmd.spawn()?,
        name: "tlsgate serve",
    };
    // It must refuse at once; one that starts instead is killed (on drop) and fails the test.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.child.try_wait()?.is_none() {
        ensure!(
            std::time::Instant::now() < deadline,
            "serve started with a cap that needs more descriptors than allowed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut err = String::new();
    if let Some(mut e) = child.child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    ensure!(
        !child.child.wait()?.success(),
        "serve exited 0 with a cap it cannot hold"
    );
    ensure!(
        err.contains("max_connections_per_core")
            && err.contains(&NOFILE.to_string())
            && err.contains("fit_connections_to_fd_limit"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_flood_at_the_descriptor_limit_does_not_collapse_the_appliance() -> Result<()> {
    let lab = Lab::new()?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    // A handshake timeout longer than the flood, so the flood connections accepted first are
    // still open (and still owe their handshake) at the end of it. The connection cap is left to
    // its default, fitted to the limit.
    let config = write_config(
        &lab,
        "flood",
        &backend,
        "[dataplane.limits]\nhandshake_timeout_ms = 120000\n",
    )?;
    let serve = Serve::start_limited(&lab, &config, &[], Some(NOFILE))?;
    let metrics = metrics_addr(&config)?;
    let cfg = client(&lab)?;

    // Established before the flood.
    let mut live = request(&cfg, serve.port).context("before the flood")?;

    // 2,000 connection attempts held open: far past what 512 descriptors allow.
    // 2,000 connection attempts from 16 threads, each trying a full TLS handshake (a token
    // signature) and holding on to whatever it got: far past what 512 descriptors allow for two
    // sockets a connection.
    let target = SocketAddr::from(([127, 0, 0, 1], serve.port));
    let established = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flooders: Vec<_> = (0..16)
        .map(|_| {
            let (cfg, established) = (cfg.clone(), established.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for _ in 0..125 {
                    let Ok(sock) = TcpStream::connect_timeout(&target, Duration::from_millis(50))
                    else {
                        continue;
                    };
                    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
                    let Ok(conn) = rustls::ClientConnection::new(
                        cfg.clone(),
                        ServerName::try_from("localhost").expect("literal name"),
                    ) else {
                        continue;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, sock);
                    if get(&mut tls).is_ok() {
                        established.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    held.push(tls);
                }
                held
            })
        })
        .collect();
    // Throughout: the established connection works and /metrics answers.
    while !flooders.iter().all(|t| t.is_finished()) {
        get(&mut live).context("live connection during the flood")?;
        scrape(&metrics).context("scrape during the flood")?;
        std::thread::sleep(Duration::from_millis(250));
    }
    let flood: Vec<Tls> = flooders
        .into_iter()
        .flat_map(|t| t.join().unwrap_or_default())
        .collect();
    let established = established.load(std::sync::atomic::Ordering::Relaxed);
    get(&mut live).context("live connection at the end of the flood")?;
    // Counters reach /metrics about once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let text = scrape(&metrics)?;
    println!(
        "{} flood connections held, {established} with a completed handshake; accept paused {} \
         times, {} accept errors",
        flood.len(),
        metric(&text, "tlsgate_accept_paused_total", &[]),
        metric(&text, "tlsgate_accept_errors_total", &[]),
    );
    // The cap held the connections below the descriptor limit: the kernel never refused an
    // accept, the token never failed (it needs descriptors of its own), and a good share of
    // the flood was served.
    ensure!(
        metric(&text, "tlsgate_accept_errors_total", &[]) == 0.0,
        "accepts failed in the kernel:\n{text}"
    );
    ensure!(
        metric(&text, "tlsgate_errors_total", &["source=\"hsm\""]) == 0.0,
        "the token failed during the flood:\n{text}"
    );
    ensure!(
        established >= 50,
        "only {established} flood handshakes completed"
    );

    // The flood goes; the appliance takes new full handshakes (token signatures) again.
    drop(flood);
    let mut ok = false;
    for _ in 0..50 {
        if request(&cfg, serve.port).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(ok, "no new handshake after the flood");
    for _ in 0..5 {
        request(&cfg, serve.port).context("handshakes after the flood")?;
    }
    get(&mut live).context("live connection after the flood")?;
    drop(serve);
    Ok(())
}
