//! `tlsgate-load` against a third-party server, `openssl s_server -www`, so the generator is not
//! only checked against the rustls server it shares code with.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use support::{load_ok, pki, u, Pki};

struct SServer {
    child: Child,
    addr: String,
    _pki: Pki,
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `openssl s_server` on 127.0.0.1:0 and waits for its `ACCEPT host:port` line; `None`
/// (after saying why) when openssl is not installed.
fn s_server(extra: &[&str]) -> Option<(SServer, String)> {
    let pki = pki();
    let spawned = Command::new("openssl")
        .arg("s_server")
        .args(["-accept", "127.0.0.1:0", "-www"])
        .arg("-cert")
        .arg(pki.dir.path().join("leaf.pem"))
        .arg("-key")
        .arg(pki.dir.path().join("leaf.key"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            tlsgate_hw_tests::skip::missing(format!(
                "cannot run `openssl s_server` ({e}); Debian package openssl"
            ));
            return None;
        }
    };
    let stdout = child.stdout.take().expect("stdout was piped");
    let mut addr = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read s_server stdout");
        if let Some(a) = line.strip_prefix("ACCEPT ") {
            addr = Some(a.trim().to_owned());
            break;
        }
    }
    let addr = addr.expect("s_server printed no ACCEPT line");
    let ca = pki.ca_pem.to_str().expect("utf-8 temp path").to_owned();
    Some((
        SServer {
            child,
            addr,
            _pki: pki,
        },
        ca,
    ))
}

#[test]
fn full_and_resumed_tls13_against_s_server() {
    let Some((srv, ca)) = s_server(&[]) else {
        return;
    };
    let r = load_ok(&[
        "--target",
        &srv.addr,
        "--ca",
        &ca,
        "--mode",
        "full",
        "--tls",
        "1.3",
        "--connections",
        "10",
        "--duration",
        "30",
    ]);
    assert_eq!(u(&r, "full_handshakes"), 10, "{r:#}");
    assert_eq!(u(&r, "errors_total"), 0, "{r:#}");
    assert!(u(&r, "body_bytes") > 0);

    let r = load_ok(&[
        "--target",
        &srv.addr,
        "--ca",
        &ca,
        "--mode",
        "resume",
        "--tls",
        "1.3",
        "--connections",
        "10",
        "--duration",
        "30",
    ]);
    assert_eq!(u(&r, "resumed_handshakes"), 10, "{r:#}");
    assert_eq!(u(&r, "errors_total"), 0, "{r:#}");
}

#[test]
fn tls12_full_handshake_with_x25519_against_s_server() {
    // OpenSSL reads the TLS 1.2 supported-groups list as the curves allowed for the ECDSA
    // certificate too: a client listing only X25519 gets a handshake_failure alert.
    let Some((srv, ca)) = s_server(&[]) else {
        return;
    };
    let r = load_ok(&[
        "--target",
        &srv.addr,
        "--ca",
        &ca,
        "--mode",
        "full",
        "--tls",
        "1.2",
        "--group",
        "x25519",
        "--connections",
        "5",
        "--duration",
        "30",
    ]);
    assert_eq!(u(&r, "full_handshakes"), 5, "{r:#}");
    let negotiated = r["negotiated"].as_object().expect("negotiated map");
    assert!(
        negotiated
            .keys()
            .all(|k| k.starts_with("TLSv1_2") && k.ends_with("X25519")),
        "{negotiated:?}"
    );
}

#[test]
fn tls12_session_ids_against_s_server_without_tickets() {
    let Some((srv, ca)) = s_server(&["-no_ticket"]) else {
        return;
    };
    let r = load_ok(&[
        "--target",
        &srv.addr,
        "--ca",
        &ca,
        "--mode",
        "resume",
        "--tls",
        "1.2",
        "--tls12-resumption",
        "ids",
        "--connections",
        "10",
        "--duration",
        "30",
    ]);
    assert_eq!(u(&r, "resumed_handshakes"), 10, "{r:#}");
    assert_eq!(u(&r, "errors_total"), 0, "{r:#}");
}
