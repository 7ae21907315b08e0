//! Protocol edges answered as the RFCs ask, checked on the wire against the real binary:
//! a ClientHello over `max_client_hello_bytes` gets a fatal `decode_error` alert (and is
//! counted); a TLS 1.2 client without a certificate where one is required gets
//! `handshake_failure` (40), not TLS 1.3's `certificate_required` (116); a TLS 1.2 client
//! supporting only secp384r1 gets the RSA certificate where there is one and `handshake_failure`
//! where there is only a P-256 one; and none of it is logged at WARN.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{Lab, Serve};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

fn roots(lab: &Lab) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(lab.path("ca/root.pem"))? {
        roots.add(cert?)?;
    }
    Ok(roots)
}

fn tls12_client(lab: &Lab, groups: Option<&[rustls::NamedGroup]>) -> Result<Arc<ClientConfig>> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // As a TLS 1.2-only client (OpenSSL 1.0.2, or 1.1.1 capped at 1.2) sends no TLS 1.3 suite.
    provider
        .cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS12);
    if let Some(groups) = groups {
        provider.kx_groups.retain(|g| groups.contains(&g.name()));
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12])?
        .with_root_certificates(roots(lab)?)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A full handshake: the negotiated suite, or the error.
fn handshake(
    port: u16,
    config: &Arc<ClientConfig>,
) -> Result<std::result::Result<rustls::SupportedCipherSuite, rustls::Error>> {
    let mut sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut conn = ClientConnection::new(
        config.clone(),
        ServerName::try_from("localhost")?.to_owned(),
    )?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            let err = e
                .into_inner()
                .and_then(|i| i.downcast::<rustls::Error>().ok())
                .map(|b| *b)
                .unwrap_or(rustls::Error::General("connection closed".into()));
            return Ok(Err(err));
        }
    }
    // TLS 1.2 with client auth: the server's verdict on our (empty) certificate comes after
    // its Finished; read until it arrives or the connection closes.
    let mut buf = [0u8; 64];
    let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
    loop {
        match conn.complete_io(&mut sock) {
            Ok((0, _)) => break,
            Ok(_) => {}
            Err(e) => {
                if let Some(err) = e
                    .into_inner()
                    .and_then(|i| i.downcast::<rustls::Error>().ok())
                {
                    return Ok(Err(*err));
                }
                break;
            }
        }
        if conn.reader().read(&mut buf).is_ok() {
            break;
        }
    }
    conn.negotiated_cipher_suite()
        .context("a suite after the handshake")
        .map(Ok)
}

fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn scrape(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn protocol_edges_get_the_alert_the_rfc_names() -> Result<()> {
    let lab = Lab::new()?;
    let (ec_key, ec_chain) = lab.software_key_with_chain("EC", "ec")?;
    let (rsa_key, rsa_chain) = lab.software_key_with_chain("RSA", "rsa")?;
    let config = lab.path("edges.toml");
    std::fs::write(
        &config,
        format!(
            r#"[metrics]
listen = "127.0.0.1:0"

[dataplane]
cores = [0]
io = "portable"

[[listener]]
name = "both"
bind = "127.0.0.1:0"
backend = "127.0.0.1:9"

[[listener.certificate]]
chain = "{ec_chain}"
key = "file:{ec_key}"

[[listener.certificate]]
chain = "{rsa_chain}"
key = "file:{rsa_key}"

[[listener]]
name = "ecdsa"
bind = "127.0.0.1:0"
backend = "127.0.0.1:9"

[[listener.certificate]]
chain = "{ec_chain}"
key = "file:{ec_key}"

[[listener]]
name = "mtls"
bind = "127.0.0.1:0"
backend = "127.0.0.1:9"

[[listener.certificate]]
chain = "{ec_chain}"
key = "file:{ec_key}"

[listener.client_auth]
mode = "required"
ca = "{ca}"
"#,
            ec_chain = ec_chain.display(),
            ec_key = ec_key.display(),
            rsa_chain = rsa_chain.display(),
            rsa_key = rsa_key.display(),
            ca = lab.p("ca/root.pem"),
        ),
    )?;
    let mut serve = Serve::start_with_env(&lab, &config, &[("TLSGATE_LOG", "info".to_owned())])?;
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    let port = |name: &str| -> Result<u16> {
        let addr = ready
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .with_context(|| format!("{name} in the ready file"))?;
        Ok(addr.trim().rsplit(':').next().context("port")?.parse()?)
    };
    let metrics = ready
        .lines()
        .find_map(|l| l.strip_prefix("metrics "))
        .context("metrics address")?
        .trim()
        .to_owned();

    // 1. A ClientHello of 20 KiB over two records: a fatal decode_error alert, then the close.
    let mut sock = TcpStream::connect(("127.0.0.1", port("both")?))?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let body_len = 20 * 1024;
    let mut hello = vec![0x01, 0x00, (body_len >> 8) as u8, body_len as u8];
    hello.extend([0x03, 0x03]);
    hello.resize(4 + body_len, 0x00);
    for record in hello.chunks(16384) {
        let mut r = vec![0x16, 0x03, 0x01];
        r.extend((record.len() as u16).to_be_bytes());
        r.extend(record);
        if sock.write_all(&r).is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = sock.read_to_end(&mut answer);
    ensure!(
        answer == [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50],
        "an oversized ClientHello gets a fatal decode_error alert, got {answer:02x?}"
    );

    // 2. TLS 1.2 without a client certificate where one is required: handshake_failure (40).
    let result = handshake(port("mtls")?, &tls12_client(&lab, None)?)?;
    ensure!(
        matches!(
            result,
            Err(rustls::Error::AlertReceived(
                rustls::AlertDescription::HandshakeFailure
            ))
        ),
        "TLS 1.2 without a certificate: handshake_failure, got {result:?}"
    );

    // 3. A TLS 1.2 client supporting only secp384r1: the RSA certificate where there is one ...
    let p384 = tls12_client(&lab, Some(&[rustls::NamedGroup::secp384r1]))?;
    let suite = handshake(port("both")?, &p384)?;
    ensure!(
        matches!(&suite, Ok(s) if format!("{:?}", s.suite()).contains("ECDHE_RSA")),
        "secp384r1-only TLS 1.2 client gets the RSA certificate, got {suite:?}"
    );
    // ... and handshake_failure where the only certificate is on P-256.
    let result = handshake(port("ecdsa")?, &p384)?;
    ensure!(
        matches!(
            result,
            Err(rustls::Error::AlertReceived(
                rustls::AlertDescription::HandshakeFailure
            ))
        ),
        "secp384r1-only TLS 1.2 client and a P-256 certificate: handshake_failure, got {result:?}"
    );
    // A client that supports P-256 still gets the ECDSA certificate there.
    let any = tls12_client(&lab, None)?;
    let suite = handshake(port("ecdsa")?, &any)?;
    ensure!(
        matches!(&suite, Ok(s) if format!("{:?}", s.suite()).contains("ECDHE_ECDSA")),
        "{suite:?}"
    );

    // Counted by reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(&metrics)?;
        let done = metric(
            &text,
            "tlsgate_connections_closed_total",
            &["reason=\"client_hello_too_large\""],
        ) >= 1.0;
        if done || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for (reason, at_least) in [
        ("client_hello_too_large", 1.0),
        ("client_cert_rejected", 1.0),
        ("negotiation_failed", 1.0),
    ] {
        let n = metric(
            &text,
            "tlsgate_connections_closed_total",
            &[&format!("reason=\"{reason}\"")],
        );
        ensure!(n >= at_least, "{reason} counted {n} times");
    }

    // 4. None of this is a WARN line: what a peer does wrong is counted, not shouted.
    serve.signal("TERM")?;
    let _ = serve.guard.child.wait()?;
    let mut stderr = String::new();
    if let Some(mut e) = serve.guard.child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    let warns: Vec<&str> = stderr.lines().filter(|l| l.contains("WARN")).collect();
    ensure!(
        warns.is_empty(),
        "peer errors logged at WARN:\n{}",
        warns.join("\n")
    );
    ensure!(
        stderr.contains("listening"),
        "the log was captured: {stderr}"
    );
    Ok(())
}
