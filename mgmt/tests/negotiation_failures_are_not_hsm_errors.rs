//! On a listener whose key is on the token, what a client or a scanner gets wrong (no shared
//! cipher suite, a broken ClientHello) is counted as the peer's, never as an HSM error: 100
//! handshakes without a shared suite and 100 garbage ClientHellos leave `key_op_failed`,
//! `tlsgate_errors_total{source="hsm"}` and `tlsgate_key_ops_total{result="failed"}` at zero.
//! A signature the token really refuses (the PKCS#11 shim fails `C_Sign`) is counted there.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{uri, Lab, Serve};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

const ROUNDS: usize = 100;

fn shim_path() -> Result<PathBuf> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tlsgate"));
    let shim = bin
        .parent()
        .context("binary directory")?
        .join("libtlsgate_pkcs11_shim.so");
    ensure!(
        shim.exists(),
        "{} is missing: run `cargo build -p tlsgate-pkcs11-shim` first",
        shim.display()
    );
    Ok(shim)
}

fn set_faults(control: &Path, directives: &str) -> Result<()> {
    let tmp = control.with_extension("tmp");
    std::fs::write(&tmp, directives)?;
    std::fs::rename(&tmp, control)?;
    Ok(())
}

fn client(lab: &Lab, suite: rustls::SupportedCipherSuite) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(lab.path("ca/root.pem"))? {
        roots.add(cert?)?;
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![suite];
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// One handshake; the error rustls saw, if any.
fn handshake(port: u16, config: &Arc<ClientConfig>) -> Result<Option<rustls::Error>> {
    let mut sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut conn = ClientConnection::new(
        config.clone(),
        ServerName::try_from("localhost")?.to_owned(),
    )?;
    while conn.is_handshaking() {
        match conn.complete_io(&mut sock) {
            Ok(_) => {}
            Err(e) => {
                return Ok(Some(
                    e.into_inner()
                        .and_then(|i| i.downcast::<rustls::Error>().ok())
                        .map(|b| *b)
                        .unwrap_or(rustls::Error::General("io".into())),
                ))
            }
        }
    }
    Ok(None)
}

/// A handshake record that claims to be a ClientHello and is not one; waits for the close.
fn garbage_hello(port: u16, i: usize) -> Result<()> {
    let mut sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut record = vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c];
    record.extend((0..0x3c).map(|j| (i * 31 + j * 7) as u8));
    sock.write_all(&record)?;
    let mut sink = Vec::new();
    let _ = sock.read_to_end(&mut sink);
    Ok(())
}

fn scrape(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sum of the samples of `name` whose labels contain every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Scrapes until `done` holds (the cores flush their counters about once a second).
fn scrape_until(addr: &str, done: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(addr)?;
        if done(&text) || Instant::now() > deadline {
            return Ok(text);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn hsm_errors(text: &str) -> [(&'static str, f64); 3] {
    [
        (
            "closed key_op_failed",
            metric(
                text,
                "tlsgate_connections_closed_total",
                &["reason=\"key_op_failed\""],
            ),
        ),
        (
            "errors source=hsm",
            metric(text, "tlsgate_errors_total", &["source=\"hsm\""]),
        ),
        (
            "key_ops failed",
            metric(text, "tlsgate_key_ops_total", &["result=\"failed\""]),
        ),
    ]
}

#[test]
fn scanner_traffic_on_a_token_listener_is_not_an_hsm_error() -> Result<()> {
    let lab = Lab::new()?;
    let chain = lab.token_key_with_chain("ec-p256", "web")?;
    let control = lab.path("shim.control");
    set_faults(&control, "")?;
    let config = lab.path("probe.toml");
    std::fs::write(
        &config,
        format!(
            r#"[pkcs11]
module = "{shim}"
token = "lab"
pin = "file:{pin}"

[metrics]
listen = "127.0.0.1:0"

[dataplane]
cores = [0]
io = "portable"

[[listener]]
name = "hsm"
bind = "127.0.0.1:0"
backend = "127.0.0.1:9"
policy = "custom"

[listener.custom_policy]
versions = ["TLSv1.3"]
suites = ["TLS_AES_256_GCM_SHA384"]

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

    let no_shared = client(
        &lab,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    )?;
    for _ in 0..ROUNDS {
        let err = handshake(serve.port, &no_shared)?;
        ensure!(
            matches!(
                err,
                Some(rustls::Error::AlertReceived(
                    rustls::AlertDescription::HandshakeFailure
                ))
            ),
            "no shared suite must end in handshake_failure, got {err:?}"
        );
    }
    for i in 0..ROUNDS {
        garbage_hello(serve.port, i)?;
    }
    let text = scrape_until(&metrics, |t| {
        metric(
            t,
            "tlsgate_connections_closed_total",
            &["reason=\"negotiation_failed\""],
        ) >= ROUNDS as f64
            && metric(
                t,
                "tlsgate_connections_closed_total",
                &["reason=\"bad_client_hello\""],
            ) >= ROUNDS as f64
    })?;
    let negotiation = metric(
        &text,
        "tlsgate_connections_closed_total",
        &["reason=\"negotiation_failed\""],
    );
    let bad_hello = metric(
        &text,
        "tlsgate_connections_closed_total",
        &["reason=\"bad_client_hello\""],
    );
    ensure!(
        negotiation == ROUNDS as f64 && bad_hello == ROUNDS as f64,
        "each failure counted once under its own reason: negotiation_failed {negotiation}, bad_client_hello {bad_hello}"
    );
    ensure!(
        metric(&text, "tlsgate_errors_total", &["source=\"peer\""]) >= 2.0 * ROUNDS as f64,
        "the peer's failures are the peer's"
    );
    for (what, n) in hsm_errors(&text) {
        ensure!(n == 0.0, "{what} = {n} after scanner traffic only");
    }

    // The counters still count what the token does wrong.
    set_faults(&control, "fail C_Sign CKR_DEVICE_ERROR")?;
    let good = client(
        &lab,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    )?;
    let err = handshake(serve.port, &good)?;
    ensure!(err.is_some(), "a failed C_Sign must fail the handshake");
    let text = scrape_until(&metrics, |t| hsm_errors(t).iter().all(|(_, n)| *n >= 1.0))?;
    for (what, n) in hsm_errors(&text) {
        ensure!(n == 1.0, "{what} = {n} after one failed C_Sign");
    }
    Ok(())
}
