//! Test support for TLS policy, SNI and client-certificate tests: certificates for any name from
//! the lab CA, client trust zones (CA, client certificates, CRLs) made with rcgen, and the real
//! clients (openssl s_client, gnutls-cli, curl) as one-shot commands.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SerialNumber,
};

use super::Lab;

/// A software key (`EC` P-256 or `RSA` 2048) with a chain from the lab CA for `cn` and `sans`
/// (DNS names); returns (key file, chain file).
pub fn lab_cert(
    lab: &Lab,
    algorithm: &str,
    label: &str,
    cn: &str,
    sans: &[&str],
) -> Result<(PathBuf, PathBuf)> {
    let san: Vec<String> = sans.iter().map(|s| format!("DNS:{s}")).collect();
    lab.software_cert(algorithm, label, cn, &san.join(","))
}

/// Whether a client with this certificate gets the demo backend's answer from the listener on
/// `port` (curl, no server verification).
pub fn let_in(port: u16, cert: &Path, key: &Path) -> Result<bool> {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", "--cert"])
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()?;
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains("hello from the tlsgate demo backend"))
}

/// A client trust zone: its own CA, client certificates it issued, CRLs it signs.
pub struct Zone {
    pub name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    next_serial: u64,
    /// (client name, serial) of every certificate issued.
    issued: Vec<(String, u64)>,
}

impl Zone {
    /// A new zone CA; its certificate is written to `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Result<Zone> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} client CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::write(dir.join(format!("{name}-ca.pem")), issuer.pem())?;
        Ok(Zone {
            name: name.to_owned(),
            issuer,
            dir: dir.to_owned(),
            next_serial: 1000,
            issued: Vec::new(),
        })
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A client certificate `cn` (clientAuth); returns (cert file, key file).
    pub fn client(&mut self, cn: &str) -> Result<(PathBuf, PathBuf)> {
        self.client_valid(cn, true)
    }

    /// Like [`Zone::client`]; `current = false` makes one that expired yesterday.
    pub fn client_valid(&mut self, cn: &str, current: bool) -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(vec![format!("{cn}.clients.test")])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if !current {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(30);
            params.not_after = now - time::Duration::days(1);
        }
        self.next_serial += 1;
        params.serial_number = Some(SerialNumber::from(self.next_serial));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_path = self.dir.join(format!("{}-{cn}.pem", self.name));
        let key_path = self.dir.join(format!("{}-{cn}.key", self.name));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        self.issued.push((cn.to_owned(), self.next_serial));
        Ok((cert_path, key_path))
    }

    /// A CRL revoking the clients named in `revoked`, written (PEM) to `path` atomically.
    pub fn write_crl(&self, path: &Path, number: u64, revoked: &[&str]) -> Result<()> {
        let now = time::OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|cn| {
                let serial = self
                    .issued
                    .iter()
                    .find(|(n, _)| n == cn)
                    .map(|(_, s)| *s)
                    .with_context(|| format!("no client {cn} in zone {}", self.name))?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from(serial),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let crl = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: now + time::Duration::days(7),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, crl.pem()?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// stdout + stderr of a finished command, and whether it succeeded.
pub struct Run {
    pub ok: bool,
    pub text: String,
}

pub fn run_cmd(cmd: &mut Command) -> Result<Run> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    Ok(Run {
        ok: out.status.success(),
        text: String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr),
    })
}

/// `openssl s_client` to 127.0.0.1:`port` with `args` (stdin closed: handshake, then quit).
pub fn s_client(port: u16, args: &[&str]) -> Result<Run> {
    run_cmd(
        Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(args),
    )
}

/// The suite s_client reports as negotiated, if any.
pub fn negotiated_cipher(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split_once("Cipher is ").map(|(_, c)| c.trim().to_owned()))
        .filter(|c| c != "(NONE)")
}

/// Whether the program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<bool> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(true);
        }
        if start.elapsed() > timeout {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A plain HTTP GET (the metrics endpoint); the whole answer.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The metrics address from a `serve --ready-file` file.
pub fn metrics_addr(config: &Path) -> Result<String> {
    std::fs::read_to_string(config.with_extension("ready"))?
        .lines()
        .find_map(|l| l.strip_prefix("metrics ").map(str::to_owned))
        .context("metrics address in the ready file")
}

/// Waits (up to 10 s: cores flush about once a second) until the sum of
/// `tlsgate_connections_closed_total{reason=...}` over cores reaches `at_least`; returns the
/// last scrape on failure.
pub fn wait_closed_reason(addr: &str, reason: &str, at_least: f64) -> Result<(bool, String)> {
    let mut last = String::new();
    let label = format!("reason=\"{reason}\"");
    let seen = eventually(Duration::from_secs(10), || {
        last = http_get(addr, "/metrics")?;
        let sum: f64 = last
            .lines()
            .filter(|l| l.starts_with("tlsgate_connections_closed_total") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Ok(sum >= at_least)
    })?;
    Ok((seen, last))
}

/// Forwards the server's log lines so a test can wait for "reloaded".
pub fn log_lines(serve: &mut super::Serve) -> Result<mpsc::Receiver<String>> {
    let stderr = serve.guard.child.stderr.take().context("stderr piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

pub fn wait_log(rx: &mpsc::Receiver<String>, needle: &str) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .with_context(|| format!("no log line with {needle:?} in 20 s"))?;
        if line.contains(needle) {
            return Ok(line);
        }
    }
}
