//! The out-of-process HSM for the HSM-failure tests: p11-kit's server (`p11-kit-server`, Debian
//! `p11-kit`) in front of a lab SoftHSM2 token, reached through `p11-kit-client.so`
//! (`p11-kit-modules`); plus the TLS client and metrics helpers those tests share.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, StreamOwned};

use super::{check, ChildGuard, Lab};

pub const P11_KIT_SERVER: &str = "/usr/libexec/p11-kit/p11-kit-server";
pub const SOFTHSM2: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Debian's p11-kit client module, in the multiarch library folder (`/usr/lib/<triplet>/pkcs11`).
pub fn p11_kit_client() -> PathBuf {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("pkcs11/p11-kit-client.so"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"))
}

/// Whether the p11-kit server and client module are here (a skip outside CI, a failure under
/// `CI=true` when not).
pub fn have_parts() -> bool {
    let client = p11_kit_client();
    for (path, package) in [
        (Path::new(P11_KIT_SERVER), "p11-kit"),
        (client.as_path(), "p11-kit-modules"),
        (Path::new(SOFTHSM2), "softhsm2"),
    ] {
        if !path.exists() {
            tlsgate_hw_tests::skip::missing(format!(
                "{} is missing (Debian package {package}; scripts/test.sh installs it)",
                path.display()
            ));
            return false;
        }
    }
    true
}

/// The "network HSM": p11-kit-server exporting the lab token on a unix socket, in a process
/// group of its own.
pub struct Hsm {
    socket: PathBuf,
    conf: PathBuf,
    child: Option<ChildGuard>,
}

impl Hsm {
    pub fn start(lab: &Lab) -> Result<Hsm> {
        let mut hsm = Hsm {
            socket: lab.path("hsm.sock"),
            conf: lab.path("token/softhsm2.conf"),
            child: None,
        };
        hsm.restart()?;
        Ok(hsm)
    }

    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }

    pub fn pgid(&self) -> Result<String> {
        Ok(format!(
            "-{}",
            self.child.as_ref().context("HSM not running")?.child.id()
        ))
    }

    pub fn signal(&self, sig: &str) -> Result<()> {
        check(
            Command::new("kill")
                .args([sig, "--", &self.pgid()?])
                .output()?,
            "kill",
        )?;
        Ok(())
    }

    /// kill -9 the server and every process it started.
    pub fn kill(&mut self) -> Result<()> {
        self.signal("-KILL")?;
        if let Some(mut c) = self.child.take() {
            let _ = c.child.wait();
        }
        Ok(())
    }

    /// A new server on the same socket (the old one must be dead).
    pub fn restart(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "the HSM is still running");
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(P11_KIT_SERVER)
            .args(["-f", "-n"])
            .arg(&self.socket)
            .args(["--provider", SOFTHSM2, "pkcs11:token=lab"])
            .env("SOFTHSM2_CONF", &self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let mut guard = ChildGuard {
            child,
            name: "p11-kit-server",
        };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = guard.child.try_wait()? {
                bail!("p11-kit-server exited ({status})");
            }
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "p11-kit-server did not listen"
            );
            thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(guard);
        Ok(())
    }
}

impl Drop for Hsm {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.signal("-CONT");
            let _ = self.kill();
        }
    }
}

pub fn client_config(lab: &Lab, resume: bool) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(lab.path("ca/root.pem"))? {
        roots.add(cert?)?;
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    if !resume {
        // Every such handshake is a full one that needs the token's signature.
        config.resumption = Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// One handshake and one GET through the appliance; the handshake's kind.
pub fn get(port: u16, config: &Arc<ClientConfig>) -> Result<HandshakeKind> {
    let sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let conn = ClientConnection::new(
        config.clone(),
        ServerName::try_from("localhost")?.to_owned(),
    )?;
    let mut t = StreamOwned::new(conn, sock);
    t.write_all(b"GET /probe HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")?;
    let mut out = Vec::new();
    // The demo backend closes after its answer; a TLS close without close_notify still ends it.
    let _ = t.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    ensure!(text.contains("demo backend"), "unexpected answer: {text}");
    t.conn.handshake_kind().context("handshake kind")
}

pub fn scrape(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sum of the samples of `name` whose labels contain every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
