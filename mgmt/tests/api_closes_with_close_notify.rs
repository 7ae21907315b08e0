//! Every HTTPS connection of the management API that the server ends, it ends with a TLS
//! close_notify — also the ones hyper gives up on (no request head within the header timeout)
//! and the idle ones the connection bound closes to make room. A client that has just sent a
//! request on such a keep-alive connection can then tell "closed before answering, resend it"
//! from "answer cut short" (a bare TCP end, which Python's ssl reports as "EOF occurred in
//! violation of protocol" and which no client may resend).
//!
//! Checked with rustls as the client: a read returns 0 bytes after a close_notify and
//! `UnexpectedEof` after a bare TCP end.

mod api_support;
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use api_support::*;
use common::{demo_backend, Lab, Serve};
use rustls_pki_types::pem::PemObject;

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A connection to the HTTPS API with the operator's client certificate.
fn connect(pki: &MgmtPki, port: u16) -> Result<Tls> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(
        &pki.ca_root,
    )?)?;
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(&pki.client_chain)?
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&pki.client_key)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// `GET /v1/keys` on a keep-alive connection; the status.
fn get_keys(tls: &mut Tls) -> Result<u16> {
    tls.write_all(b"GET /v1/keys HTTP/1.1\r\nhost: localhost\r\n\r\n")?;
    tls.flush()?;
    read_answer(tls)?
        .split_whitespace()
        .nth(1)
        .context("status line")?
        .parse()
        .context("status")
}

/// Reads one answer (head and content-length body) and returns its status line.
fn read_answer(tls: &mut Tls) -> Result<String> {
    let mut r = BufReader::new(tls);
    let mut status = String::new();
    ensure!(
        r.read_line(&mut status)? > 0,
        "connection closed before the answer"
    );
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        ensure!(r.read_line(&mut line)? > 0, "connection closed mid-answer");
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse()?;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    ensure!(r.buffer().is_empty(), "bytes after the answer");
    Ok(status.trim_end().to_owned())
}

/// A running `tlsgate serve` with the HTTPS API (`api_extra` added to its `[api]` section).
struct Api {
    pki: MgmtPki,
    port: u16,
    _serve: Serve,
    _backend: common::ChildGuard,
    _lab: Lab,
}

fn start_api(name: &str, api_extra: &str) -> Result<Api> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (backend_guard, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), name)?;
    let text = std::fs::read_to_string(&config)?;
    std::fs::write(
        &config,
        text.replacen("[api]\n", &format!("[api]\n{api_extra}"), 1),
    )?;
    let serve = Serve::start(&lab, &config)?;
    let port = api_port(&config)?;
    Ok(Api {
        pki,
        port,
        _serve: serve,
        _backend: backend_guard,
        _lab: lab,
    })
}

/// Reads until the server ends the connection: Ok(()) for a close_notify, an error naming
/// what came instead.
fn expect_close_notify(tls: &mut Tls, which: &str) -> Result<()> {
    let mut buf = [0u8; 64];
    match tls.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => anyhow::bail!("{which}: {n} unexpected bytes instead of the end"),
        Err(e) => {
            anyhow::bail!("{which}: the server ended the connection without close_notify ({e})")
        }
    }
}

#[test]
fn connections_the_server_ends_end_with_close_notify() -> Result<()> {
    let api = start_api("cn", "max_connections = 2\n")?;
    let (pki, port) = (&api.pki, api.port);

    // Two idle keep-alive connections fill the bound; a third closes the oldest to make room.
    let mut oldest = connect(pki, port)?;
    ensure!(get_keys(&mut oldest)? == 200);
    let mut idle = connect(pki, port)?;
    ensure!(get_keys(&mut idle)? == 200);
    let idle_since = Instant::now();
    let mut newest = connect(pki, port)?;
    ensure!(get_keys(&mut newest)? == 200, "the new client is served");
    expect_close_notify(&mut oldest, "the idle connection closed to make room")?;

    // The other one sends no request head: hyper gives up on it after its header timeout.
    expect_close_notify(&mut idle, "the connection closed for sending no request")?;
    ensure!(
        idle_since.elapsed() >= Duration::from_secs(5),
        "the idle connection was closed after {:?}, before any header timeout",
        idle_since.elapsed()
    );
    // A closed connection's request is never half answered: a new one is served.
    let mut again = connect(pki, port)?;
    ensure!(get_keys(&mut again)? == 200);
    Ok(())
}

/// A request whose body the server does not read (an answer decided by the method alone) ends
/// its connection, and the rest of the body may still be on its way. Bytes that reach a closed
/// socket are answered with a reset, and a reset can destroy what the client has not read yet:
/// its answer. So the server closes in stages (RFC 9112 §9.6): close_notify and FIN, then it
/// reads and discards what still comes for a while. Seen from the client: bytes sent after the
/// answer get no reset.
#[test]
fn bytes_sent_after_the_answer_get_no_reset() -> Result<()> {
    let api = start_api("ln", "")?;
    let (pki, port) = (&api.pki, api.port);

    let mut tls = connect(pki, port)?;
    ensure!(get_keys(&mut tls)? == 200);
    let body = br#"{"id": "00", "label": "0", "type": "ec-p256"}"#;
    // The head alone: the server answers 405 at once and, the body not being there to drain,
    // ends the connection.
    tls.write_all(
        format!(
            "OPTIONS /v1/keys HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )?;
    tls.flush()?;
    let status = read_answer(&mut tls)?;
    ensure!(status.starts_with("HTTP/1.1 405"), "{status}");
    expect_close_notify(&mut tls, "the connection ended after the answer")?;
    // The body comes late (as from a client whose head and body went out in two writes).
    tls.sock.write_all(body)?;
    std::thread::sleep(Duration::from_millis(300));
    // A reset in answer to it would make this write fail (a read cannot tell: the FIN that
    // came before the reset answers it with 0 bytes).
    match tls.sock.write_all(b"\r\n") {
        Ok(()) => Ok(()),
        Err(e) => anyhow::bail!(
            "the server reset the connection when the rest of the body arrived after the \
             answer ({e}): a client that had not read its answer yet could lose it"
        ),
    }
}
