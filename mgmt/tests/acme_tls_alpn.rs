//! ACME through `tls-alpn-01` against a real CA (pebble on loopback): the data plane answers the
//! validation on the listener itself; the certificate's key is generated on the SoftHSM token
//! (sensitive, non-extractable) and the CSR signed there; the served chain is pebble's. With a
//! short renewal threshold a second certificate (with a new key) replaces the first by itself,
//! while a client connection made under the first keeps working.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::acme_support::{
    acme_entry, have_pebble, s_client_chain, wait_for, write_config, Gate, Pebble, PebbleOpts,
};
use common::{demo_backend, Lab};

/// Pebble 2.4 issues for five years (1826 days): renewing when all but ~25 s of that is left
/// renews about 25 s after issuance.
const RENEW_BEFORE: &str = "renew_before = 0.99999984";

#[test]
fn tls_alpn_01_issues_on_the_token_and_renews_under_an_open_connection() -> Result<()> {
    if !have_pebble() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let pebble_port = common::acme_support::free_port()?;
    let directory = format!("https://127.0.0.1:{pebble_port}/dir");
    let entry = acme_entry(&lab, "www", &directory, &["www.acme.test"], RENEW_BEFORE);
    let config = write_config(&lab, "t", &backend, &entry)?;
    // tlsgate first: pebble validates on its listener's port. Until pebble is up the ACME task
    // meets a closed port and backs off.
    let gate = Gate::start(&lab, &config)?;
    let web = gate.port("web")?;
    let _pebble = Pebble::start(
        &lab,
        PebbleOpts {
            port: pebble_port,
            tls_port: web,
            http_port: 1,
            ipv4: "127.0.0.1",
            env: vec![("PEBBLE_WFE_NONCEREJECT", "0".into())],
            ..PebbleOpts::default()
        },
    )?;

    // 1. Issued, served, from pebble, key on the token.
    let first = gate.wait_issued(&lab, "www", None, Duration::from_secs(60))?;
    let key1 = first["key"].as_str().context("key")?.to_owned();
    let serial1 = first["serial"].as_str().context("serial")?.to_owned();
    ensure!(
        first["issuer"]
            .as_str()
            .is_some_and(|i| i.contains("Pebble Intermediate CA")),
        "{first}"
    );
    let chain = s_client_chain(web, "www.acme.test")?;
    ensure!(
        chain.contains("CN = www.acme.test") && chain.contains("i:CN = Pebble Intermediate CA"),
        "served chain is not pebble's: {chain}"
    );
    let keys = lab.list()?;
    let on_token = keys
        .iter()
        .find(|k| k["label"] == key1.as_str())
        .with_context(|| format!("{key1} not on the token: {keys:?}"))?;
    ensure!(
        on_token["sensitive"] == true && on_token["extractable"] == false,
        "{on_token}"
    );
    // The file's certificate still answers other names.
    let other = s_client_chain(web, "localhost")?;
    ensure!(other.contains("CN = localhost"), "{other}");
    let audit = std::fs::read_to_string(lab.path("state-t/audit.log"))?;
    ensure!(
        audit.contains("\"client\":\"internal:acme\",\"operation\":\"acme_issue\",\"target\":\"www\",\"result\":\"ok\""),
        "{audit}"
    );

    // 2. A connection made under the first certificate, held open.
    let mut held = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{web}")])
        .args(["-servername", "www.acme.test", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = Arc::new(Mutex::new(String::new()));
    let mut stdout = held.stdout.take().context("stdout")?;
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut o) = sink.lock() {
                o.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let pem1 = first_pem(&chain)?;
    wait_for(Duration::from_secs(20), "the held handshake", || {
        Ok(out
            .lock()
            .map(|o| o.contains("Verify return code"))
            .ok()
            .filter(|d| *d))
    })?;
    ensure!(
        out.lock().map(|o| o.contains(&pem1)).unwrap_or(false),
        "the held connection did not get the first certificate"
    );

    // 3. The renewal comes by itself (short threshold): a new certificate and a new key.
    let second = gate.wait_issued(&lab, "www", Some(&serial1), Duration::from_secs(90))?;
    let key2 = second["key"].as_str().context("key")?;
    ensure!(key2 != key1, "the renewal reused key {key1}");
    let chain2 = s_client_chain(web, "www.acme.test")?;
    ensure!(
        first_pem(&chain2)? != pem1,
        "new handshakes still get the first certificate"
    );
    let keys = lab.list()?;
    ensure!(keys.iter().any(|k| k["label"] == key2), "{keys:?}");
    // The old key waits on the token until its certificate has expired.
    ensure!(keys.iter().any(|k| k["label"] == key1.as_str()), "{keys:?}");

    // 4. The held connection still carries traffic.
    let mut stdin = held.stdin.take().context("stdin")?;
    stdin.write_all(b"GET / HTTP/1.1\r\nHost: www.acme.test\r\nConnection: close\r\n\r\n")?;
    stdin.flush()?;
    wait_for(
        Duration::from_secs(20),
        "the held connection's answer",
        || {
            Ok(out
                .lock()
                .map(|o| o.contains("HTTP/1.1 200"))
                .ok()
                .filter(|d| *d))
        },
    )?;
    drop(stdin);
    let _ = held.kill();
    let _ = held.wait();
    let _ = reader.join();

    let text = gate.log_text();
    ensure!(text.contains("ACME certificate issued and live"), "{text}");
    Ok(())
}

/// The first PEM block of `openssl s_client -showcerts` output (the leaf).
fn first_pem(text: &str) -> Result<String> {
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .context("no certificate")?;
    let end = text[start..]
        .find("-----END CERTIFICATE-----")
        .context("no end")?
        + start;
    Ok(text[start..end].to_owned())
}
