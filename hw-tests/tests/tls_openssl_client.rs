//! A real client over a real socket: `openssl s_client` completes TLS 1.3 and 1.2 handshakes
//! against a rustls server whose key is on a SoftHSM2 token, verifying the chain to the lab root.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use tlsgate_hw_tests::{tls, Backend, TestCa};
use tlsgate_keystore::{certified_key, KeySpec};

const NAME: &str = "web.lab.test";

fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Serves one connection: handshake, read the request line, answer, close.
fn serve_one(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Result<()> {
    let (mut sock, _) = listener.accept()?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut conn = rustls::ServerConnection::new(config)?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let mut buf = [0u8; 64];
    let n = tls.read(&mut buf)?;
    ensure!(
        &buf[..n] == b"hello\n",
        "unexpected request {:?}",
        &buf[..n]
    );
    tls.write_all(b"token-signed hello\n")?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

#[test]
fn openssl_s_client_verifies_a_token_key_server() -> Result<()> {
    if !openssl_available() {
        tlsgate_hw_tests::skip::missing("`openssl` is not installed (Debian package openssl)");
        return Ok(());
    }
    let ca = TestCa::new()?;
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root.pem");
    std::fs::write(&root, ca.ca.root_pem())?;
    for backend in tlsgate_hw_tests::backends()? {
        if matches!(backend, Backend::Software) {
            continue; // the token path is what this test is about
        }
        for spec in [KeySpec::EcP256, KeySpec::Rsa2048] {
            let Some(key) = backend.generate(spec, &format!("ossl-{spec}"))? else {
                continue;
            };
            let chain = ca.issue_csr(&key.csr(NAME, &[NAME.to_owned()])?)?;
            let certified = certified_key(&chain, key.signing_key.clone())?;
            for (version, flag) in [
                (&rustls::version::TLS13, "-tls1_3"),
                (&rustls::version::TLS12, "-tls1_2"),
            ] {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let port = listener.local_addr()?.port();
                let config = tls::server_config(certified.clone(), &[version])?;
                let server = std::thread::spawn(move || serve_one(listener, config));
                let mut child = Command::new("openssl")
                    .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
                    .args([
                        "-servername",
                        NAME,
                        "-verify_hostname",
                        NAME,
                        "-verify_return_error",
                    ])
                    .arg("-CAfile")
                    .arg(&root)
                    .args([flag, "-ign_eof", "-quiet"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("spawning openssl s_client")?;
                child.stdin.take().context("stdin")?.write_all(b"hello\n")?;
                let out = child.wait_with_output()?;
                let served = server
                    .join()
                    .map_err(|_| anyhow::anyhow!("server panicked"))?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr);
                if !stdout.contains("token-signed hello") {
                    bail!(
                        "{spec} {flag} on {}: s_client did not get the answer (server: {served:?})\n\
                         stdout: {stdout}\nstderr: {stderr}",
                        backend.name()
                    );
                }
                served?;
                ensure!(
                    stderr.contains("verify return:1") && !stderr.contains("verify error"),
                    "{spec} {flag}: chain not verified: {stderr}"
                );
            }
        }
    }
    Ok(())
}
