//! TLS 1.2 and 1.3, ECDSA and RSA, through the data plane to a plain HTTP backend, with the
//! in-test rustls client, `openssl s_client` and `curl`, on every io driver.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use tlsgate_dataplane::DataplaneConfig;

#[test]
fn rustls_client_all_versions_and_key_types() {
    let backend = http_backend();
    for kind in [KeyKind::Ecdsa, KeyKind::Rsa] {
        let p = pki(kind);
        let (tls, _) = server_config(&p, None);
        for io in drivers() {
            let Some(dp) = start_dp(
                DataplaneConfig::new(cores()),
                io,
                vec![listener("web", tls.clone(), backend)],
            ) else {
                continue;
            };
            for (vname, v) in [
                ("1.2", &rustls::version::TLS12),
                ("1.3", &rustls::version::TLS13),
            ] {
                let cc = client_config(&p, &[v]);
                let mut t = connect(addr(&dp), &cc);
                let resp = http_get(&mut t).expect("GET");
                assert!(
                    resp.starts_with("HTTP/1.1 200 OK") && resp.ends_with(HTTP_BODY),
                    "{kind:?} TLS {vname} {io:?}: {resp:?}"
                );
                assert_eq!(
                    t.conn.protocol_version(),
                    Some(if vname == "1.2" {
                        rustls::ProtocolVersion::TLSv1_2
                    } else {
                        rustls::ProtocolVersion::TLSv1_3
                    })
                );
            }
            eventually("two completed connections counted", || {
                dp.stats().closed(tlsgate_dataplane::CloseReason::Done) == 2
            });
            let s = dp.stats();
            assert_eq!(s.handshakes_full, 2, "{s:?}");
            assert_eq!(s.handshakes_failed, 0, "{s:?}");
            assert!(s.client_in_bytes > 0 && s.backend_in_bytes > 0, "{s:?}");
            dp.shutdown(std::time::Duration::from_secs(1))
                .expect("shutdown");
        }
    }
}

/// Whether `name` (shipped by the Debian package of the same name) can run; a skip, or a failure
/// under `CI=true`, when not.
fn tool(name: &str) -> bool {
    tlsgate_hw_tests::skip::unless(tlsgate_hw_tests::skip::tool_missing(name, name))
}

#[test]
fn curl_and_openssl_through_the_appliance() {
    if !tool("curl") || !tool("openssl") {
        return;
    }
    let backend = http_backend();
    let dir = tempfile::tempdir().expect("tempdir");
    for kind in [KeyKind::Ecdsa, KeyKind::Rsa] {
        let p = pki(kind);
        let ca = dir.path().join(format!("ca-{kind:?}.pem"));
        std::fs::write(&ca, &p.ca_pem).expect("write ca");
        let (tls, _) = server_config(&p, None);
        for io in drivers() {
            let Some(dp) = start_dp(
                DataplaneConfig::new(cores()),
                io,
                vec![listener("web", tls.clone(), backend)],
            ) else {
                continue;
            };
            let a = addr(&dp);
            for v in ["--tlsv1.2 --tls-max 1.2", "--tlsv1.3"] {
                let mut cmd = Command::new("curl");
                cmd.args(["-sS", "--max-time", "20", "--cacert"])
                    .arg(&ca)
                    .args(v.split(' '))
                    .arg("--resolve")
                    .arg(format!("localhost:{}:127.0.0.1", a.port()))
                    .arg(format!("https://localhost:{}/", a.port()));
                let out = cmd.output().expect("curl runs");
                assert!(
                    out.status.success(),
                    "curl {v} {kind:?} {io:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(String::from_utf8_lossy(&out.stdout), HTTP_BODY);
            }
            for v in ["-tls1_2", "-tls1_3"] {
                let mut child = Command::new("openssl")
                    .args(["s_client", "-quiet", "-verify_return_error", "-CAfile"])
                    .arg(&ca)
                    .args([
                        v,
                        "-servername",
                        "localhost",
                        "-verify_hostname",
                        "localhost",
                    ])
                    .arg("-connect")
                    .arg(a.to_string())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("openssl runs");
                child
                    .stdin
                    .as_mut()
                    .expect("piped")
                    .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    .expect("write");
                let out = child.wait_with_output().expect("openssl output");
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    stdout.starts_with("HTTP/1.1 200 OK") && stdout.ends_with(HTTP_BODY),
                    "openssl {v} {kind:?} {io:?}: {stdout:?} / {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            dp.shutdown(std::time::Duration::from_secs(1))
                .expect("shutdown");
        }
    }
}
