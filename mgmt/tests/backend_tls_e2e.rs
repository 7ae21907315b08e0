//! `[listener.backend_tls]` through the real binary: `openssl s_server` as a backend that requires
//! a client certificate gets the one whose key is on the SoftHSM2 token, signed for on a key-op
//! worker (counted as a key operation beside the client handshake's); a wrong expected name
//! fails the connection and shows in `tlsgate_backend_tls_errors_total`; on both io drivers.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{curl, uri, ChildGuard, Lab, Serve};

fn openssl_available() -> bool {
    common::require("openssl", "openssl")
}

/// `openssl s_server -www` on a free 127.0.0.1 port, requiring a client certificate from the
/// lab CA. Returns it once it accepts connections.
fn s_server(lab: &Lab, cert: &str, key: &str) -> Result<(ChildGuard, u16)> {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let child = Command::new("openssl")
        .args(["s_server", "-www", "-quiet", "-Verify", "2", "-CAfile"])
        .arg(lab.path("ca/root.pem"))
        .args(["-cert", cert, "-key", key, "-cert_chain"])
        .arg(lab.path("ca/intermediate.pem"))
        .arg("-accept")
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut guard = ChildGuard {
        child,
        name: "openssl s_server",
    };
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = guard.child.try_wait()? {
            bail!("openssl s_server exited: {status}");
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("openssl s_server not listening after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((guard, port))
}

fn scrape(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn token_client_key_reaches_a_backend_that_requires_it() -> Result<()> {
    if !openssl_available() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let web = lab.token_key_with_chain("ec-p256", "web")?;
    // The backend's own certificate (software key, lab CA) for `localhost`.
    let (backend_key, backend_chain) = lab.software_key_with_chain("EC", "backend")?;
    // tlsgate's client certificate: key on the token, CN names it.
    lab.run(&[
        "token",
        "generate",
        "--type",
        "ec-p256",
        "--label",
        "to-backend",
    ])?;
    let client_chain = lab.path("certs/to-backend.pem");
    lab.run(&[
        "token",
        "issue-cert",
        "--key",
        &uri("to-backend"),
        "--ca-dir",
        &lab.p("ca"),
        "--cn",
        "tlsgate-backend-client",
        "--san",
        "tlsgate.internal",
        "--out",
        &client_chain.display().to_string(),
    ])?;
    let (_backend, port) = s_server(
        &lab,
        &backend_chain.display().to_string(),
        &backend_key.display().to_string(),
    )?;

    for io in ["portable", "uring"] {
        let config = lab.path(&format!("backend-tls-{io}.toml"));
        let listener = |name: &str, server_name: &str| {
            format!(
                "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:{port}\"\n\
                 [[listener.certificate]]\nchain = \"{}\"\nkey = \"{}\"\n\
                 [listener.backend_tls]\nca = \"{}\"\nserver_name = \"{server_name}\"\nchain = \"{}\"\nkey = \"{}\"\n",
                web.display(),
                uri("web"),
                lab.p("ca/root.pem"),
                client_chain.display(),
                uri("to-backend"),
            )
        };
        let toml = format!(
            "[pkcs11]\ntoken = \"lab\"\npin = \"file:{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
             [dataplane]\ncores = [0]\nio = \"{io}\"\n{}{}",
            lab.p("token/user.pin"),
            listener("good", "localhost"),
            listener("wrong", "not-the-backend.internal"),
        );
        std::fs::write(&config, toml)?;
        let serve = match Serve::start(&lab, &config) {
            Ok(s) => s,
            Err(e) if io == "uring" && format!("{e:#}").contains("io_uring unavailable") => {
                tlsgate_hw_tests::skip::missing(format!("io = uring: {e:#}"));
                continue;
            }
            Err(e) => return Err(e),
        };
        let ready = std::fs::read_to_string(config.with_extension("ready"))?;
        let addr_of = |name: &str| -> Result<String> {
            ready
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .map(|s| s.trim().to_owned())
                .with_context(|| format!("{name} in the ready file: {ready}"))
        };
        let wrong_port: u16 = addr_of("wrong")?
            .rsplit(':')
            .next()
            .context("port")?
            .parse()?;
        let metrics = addr_of("metrics")?;

        // s_server -www answers with a page that describes the session, including the
        // client certificate it verified.
        let out = curl(&lab, serve.port, "/", &[])?;
        let body = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let mut serve = serve;
            let _ = serve.guard.child.kill();
            let mut log = String::new();
            if let Some(mut e) = serve.guard.child.stderr.take() {
                let _ = e.read_to_string(&mut log);
            }
            bail!(
                "{io}: curl: {}\ntlsgate log:\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            body.contains("tlsgate-backend-client"),
            "{io}: the backend saw our token-held client certificate:\n{body}"
        );
        // Two token signatures went through the key-op pool: the client handshake's and the
        // backend handshake's client signature (before, the latter was made on the io thread
        // and never counted there). Counters are flushed about once a second.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = scrape(&metrics)?;
            let ok: u64 = text
                .lines()
                .filter(|l| l.starts_with("tlsgate_key_ops_total{") && l.contains("result=\"ok\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            if ok == 2 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{io}: {ok} key ops, expected 2:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }

        let out = curl(&lab, wrong_port, "/", &[])?;
        assert!(
            out.stdout.is_empty(),
            "{io}: nothing from a backend whose name is wrong: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = scrape(&metrics)?;
            let hit = text.lines().any(|l| {
                l.starts_with("tlsgate_backend_tls_errors_total{")
                    && l.contains("listener=\"wrong\"")
                    && l.contains("reason=\"name_mismatch\"")
                    && l.ends_with(" 1")
            });
            if hit {
                break;
            }
            if Instant::now() > deadline {
                bail!("{io}: no name_mismatch in the metrics:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        serve.signal("TERM")?;
    }
    Ok(())
}
