//! Test support for OCSP stapling: `openssl` as a one-shot command and OCSP responses made by
//! `openssl ocsp` (a real responder's signing code) from an index file.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

use super::{check, Lab};

/// `openssl s_client -status` against `addr` (SNI localhost): what it printed.
pub fn s_client_status(addr: &str) -> Result<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-status",
            "-servername",
            "localhost",
            "-connect",
            addr,
        ])
        .stdin(std::process::Stdio::null())
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn openssl(args: &[&str]) -> Result<String> {
    check(
        Command::new("openssl").args(args).output()?,
        &format!("openssl {}", args.join(" ")),
    )
}

/// An OCSP response (DER file) for `leaf`, good or `revoked` in the responder's index, signed by
/// `signer` (cert, key; paths in the lab) and valid for one day.
pub fn response(
    lab: &Lab,
    name: &str,
    leaf: &Path,
    revoked: bool,
    signer: (&str, &str),
) -> Result<PathBuf> {
    response_valid(lab, name, leaf, revoked, signer, &["-ndays", "1"])
}

/// [`response`] valid as long as `validity` (`-ndays N` or `-nmin N`) says.
pub fn response_valid(
    lab: &Lab,
    name: &str,
    leaf: &Path,
    revoked: bool,
    signer: (&str, &str),
    validity: &[&str],
) -> Result<PathBuf> {
    let serial = openssl(&[
        "x509",
        "-in",
        &leaf.display().to_string(),
        "-noout",
        "-serial",
    ])?;
    let serial = serial.trim().trim_start_matches("serial=").to_owned();
    let index = lab.path(&format!("{name}.index"));
    let line = if revoked {
        format!("R\t491231235959Z\t200101000000Z\t{serial}\tunknown\t/CN=localhost\n")
    } else {
        format!("V\t491231235959Z\t\t{serial}\tunknown\t/CN=localhost\n")
    };
    std::fs::write(&index, line)?;
    let req = lab.path(&format!("{name}.req"));
    openssl(&[
        "ocsp",
        "-issuer",
        &lab.p("ca/intermediate.pem"),
        "-cert",
        &leaf.display().to_string(),
        "-no_nonce",
        "-reqout",
        &req.display().to_string(),
    ])?;
    let out = lab.path(&format!("{name}.der"));
    openssl(&[
        "ocsp",
        "-index",
        &index.display().to_string(),
        "-rsigner",
        &lab.p(signer.0),
        "-rkey",
        &lab.p(signer.1),
        "-CA",
        &lab.p("ca/intermediate.pem"),
        "-reqin",
        &req.display().to_string(),
        "-respout",
        &out.display().to_string(),
        validity[0],
        validity[1],
    ])?;
    Ok(out)
}

/// A software key and a chain (leaf, `ca/intermediate`) for `localhost` whose Authority
/// Information Access names the OCSP responder `http://127.0.0.1:{port}/`. Returns (key, chain,
/// leaf) paths.
pub fn aia_leaf(
    lab: &Lab,
    name: &str,
    port: u16,
    serial: u32,
) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let key = lab.path(&format!("{name}.key"));
    let csr = lab.path(&format!("{name}.csr"));
    let leaf = lab.path(&format!("{name}-leaf.pem"));
    let ext = lab.path(&format!("{name}.ext"));
    let p = |p: &Path| p.display().to_string();
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &p(&key),
    ])?;
    openssl(&[
        "req",
        "-new",
        "-key",
        &p(&key),
        "-subj",
        "/CN=localhost",
        "-out",
        &p(&csr),
    ])?;
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=DNS:localhost\nauthorityInfoAccess=OCSP;URI:http://127.0.0.1:{port}/\n"
        ),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &lab.p("ca/intermediate.pem"),
        "-CAkey",
        &lab.p("ca/intermediate.key"),
        "-set_serial",
        &serial.to_string(),
        "-days",
        "30",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&leaf),
    ])?;
    let chain = lab.path(&format!("{name}-chain.pem"));
    std::fs::write(
        &chain,
        format!(
            "{}{}",
            std::fs::read_to_string(&leaf)?,
            std::fs::read_to_string(lab.path("ca/intermediate.pem"))?
        ),
    )?;
    Ok((key, chain, leaf))
}

/// An OCSP responder on 127.0.0.1 for tests: answers every POST with the DER it holds now (or,
/// when silent, accepts and never answers), and counts the requests (and connections).
pub struct Responder {
    pub port: u16,
    pub answer: Arc<Mutex<Vec<u8>>>,
    pub requests: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
}

impl Responder {
    pub fn start(silent: bool) -> Result<Responder> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let answer = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (a, r, c) = (answer.clone(), requests.clone(), connections.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                if silent {
                    held.push(conn);
                    continue;
                }
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let (a, r) = (a.clone(), r.clone());
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // The head, then Content-Length bytes of body.
                    loop {
                        let Ok(n) = conn.read(&mut chunk) else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    let body = a.lock().map(|b| b.clone()).unwrap_or_default();
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/ocsp-response\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(&body);
                });
            }
        });
        Ok(Responder {
            port,
            answer,
            requests,
            connections,
        })
    }

    pub fn set(&self, der: Vec<u8>) {
        if let Ok(mut a) = self.answer.lock() {
            *a = der;
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}
