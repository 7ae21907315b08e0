//! Harness for the management API tests: a management CA with server and client certificates,
//! a configuration with `[api]` and `[state]`, `tlsgate ctl`, curl over HTTPS and the unix
//! socket, and the fingerprint of the certificate a listener serves.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{ensure, Context, Result};

use crate::common::{check, tlsgate, Lab};

/// The management zone's PKI: its own lab CA, the API's server certificate and two clients
/// (one from this CA, one from the data plane's CA, which must be refused).
pub struct MgmtPki {
    pub ca_root: PathBuf,
    pub server_chain: PathBuf,
    pub server_key: PathBuf,
    pub client_chain: PathBuf,
    pub client_key: PathBuf,
    pub foreign_chain: PathBuf,
    pub foreign_key: PathBuf,
}

fn openssl_key_and_csr(dir: &Path, name: &str, cn: &str, san: &str) -> Result<(PathBuf, PathBuf)> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    check(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
            ])
            .arg(&key)
            .output()?,
        "openssl genpkey",
    )?;
    check(
        Command::new("openssl")
            .args(["req", "-new", "-key"])
            .arg(&key)
            .args([
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                &format!("subjectAltName={san}"),
                "-out",
            ])
            .arg(&csr)
            .output()?,
        "openssl req",
    )?;
    Ok((key, csr))
}

fn sign(lab: &Lab, ca_dir: &str, csr: &Path, out: &Path) -> Result<()> {
    lab.run(&[
        "ca",
        "sign",
        "--dir",
        &lab.p(ca_dir),
        "--csr",
        &csr.display().to_string(),
        "--out",
        &out.display().to_string(),
    ])?;
    Ok(())
}

impl MgmtPki {
    pub fn new(lab: &Lab) -> Result<MgmtPki> {
        let dir = lab.path("mgmt");
        std::fs::create_dir_all(&dir)?;
        lab.run(&[
            "ca",
            "init-lab",
            "--dir",
            &lab.p("mgmt-ca"),
            "--name",
            "mgmt zone",
        ])?;
        if !lab.path("ca/root.pem").exists() {
            lab.run(&["ca", "init-lab", "--dir", &lab.p("ca")])?;
        }
        let (server_key, csr) = openssl_key_and_csr(&dir, "api", "localhost", "DNS:localhost")?;
        let server_chain = dir.join("api.pem");
        sign(lab, "mgmt-ca", &csr, &server_chain)?;
        let (client_key, csr) = openssl_key_and_csr(&dir, "ops", "ops-alice", "DNS:ops-alice")?;
        let client_chain = dir.join("ops.pem");
        sign(lab, "mgmt-ca", &csr, &client_chain)?;
        let (foreign_key, csr) = openssl_key_and_csr(&dir, "foreign", "mallory", "DNS:mallory")?;
        let foreign_chain = dir.join("foreign.pem");
        sign(lab, "ca", &csr, &foreign_chain)?;
        Ok(MgmtPki {
            ca_root: lab.path("mgmt-ca/root.pem"),
            server_chain,
            server_key,
            client_chain,
            client_key,
            foreign_chain,
            foreign_key,
        })
    }
}

/// A configuration with one listener `web` (bootstrap certificate from the file), the API on a
/// unix socket and on HTTPS, and a state directory.
pub fn write_config(
    lab: &Lab,
    pki: &MgmtPki,
    backend: &str,
    boot_chain: &Path,
    boot_key: &str,
    name: &str,
) -> Result<PathBuf> {
    let path = lab.path(&format!("{name}.toml"));
    let text = format!(
        r#"
[pkcs11]
token = "lab"
pin = "file:{pin}"

[dataplane]
cores = [0]
io = "portable"

[api]
socket = "{socket}"
listen = "127.0.0.1:0"
cert = "{server_chain}"
key = "file:{server_key}"
client_ca = "{ca}"

[state]
dir = "{state}"

[[listener]]
name = "web"
bind = "127.0.0.1:0"
backend = "{backend}"

[[listener.certificate]]
chain = "{boot_chain}"
key = "{boot_key}"
"#,
        pin = lab.path("token/user.pin").display(),
        socket = lab.path("api.sock").display(),
        server_chain = pki.server_chain.display(),
        server_key = pki.server_key.display(),
        ca = pki.ca_root.display(),
        state = lab.path("state").display(),
        boot_chain = boot_chain.display(),
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The address of the HTTPS API from a ready file.
pub fn api_port(config: &Path) -> Result<u16> {
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    let line = ready
        .lines()
        .find(|l| l.starts_with("api "))
        .context("ready file names the API")?;
    Ok(line.rsplit(':').next().context("port")?.trim().parse()?)
}

/// `tlsgate ctl --socket <lab>/api.sock ARGS`.
pub fn ctl(lab: &Lab, args: &[&str]) -> Result<Output> {
    Ok(tlsgate()
        .args(["ctl", "--socket", &lab.p("api.sock")])
        .args(args)
        .output()?)
}

/// `ctl` that must succeed; its stdout.
pub fn ctl_ok(lab: &Lab, args: &[&str]) -> Result<String> {
    check(ctl(lab, args)?, &format!("tlsgate ctl {}", args.join(" ")))
}

/// `ctl certs upload`: stores `chain` as certificate `id` for `key` (a label, `pkcs11:` URI or
/// `file:` path).
pub fn upload_cert(lab: &Lab, id: &str, key: &str, chain: &Path) -> Result<String> {
    ctl_ok(
        lab,
        &[
            "certs",
            "upload",
            "--id",
            id,
            "--key",
            key,
            "--chain",
            &chain.display().to_string(),
        ],
    )
}

/// `ctl --json` that must succeed; its JSON.
pub fn ctl_json(lab: &Lab, args: &[&str]) -> Result<serde_json::Value> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = ctl_ok(lab, &a)?;
    serde_json::from_str(&out).with_context(|| format!("ctl printed {out}"))
}

/// A refused `ctl`: exit code 1 and the error code on stderr.
pub fn ctl_refused(lab: &Lab, args: &[&str], code: &str) -> Result<()> {
    let out = ctl(lab, args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1),
        "ctl {args:?} should exit 1, got {:?}: {stderr}",
        out.status
    );
    ensure!(
        stderr.contains(code),
        "ctl {args:?}: expected {code}, got {stderr}"
    );
    Ok(())
}

/// curl to the HTTPS API with a client certificate: (status, body).
pub fn curl_https(
    pki: &MgmtPki,
    port: u16,
    cert: Option<(&Path, &Path)>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String, Output)> {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&pki.ca_root)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some((chain, key)) = cert {
        c.arg("--cert").arg(chain).arg("--key").arg(key);
    }
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    c.arg(format!("https://localhost:{port}{path}"));
    let out = c.stdin(Stdio::null()).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned(), out))
}

/// curl over the unix socket: (status, body).
pub fn curl_unix(lab: &Lab, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "20",
        "--unix-socket",
        &lab.p("api.sock"),
    ])
    .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    c.arg(format!("http://localhost{path}"));
    let out = c.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

/// Hex SHA-256 of the leaf certificate a TLS listener serves for SNI `localhost`.
pub fn served_fingerprint(port: u16) -> Result<String> {
    served_fingerprint_for(port, "localhost")
}

/// Hex SHA-256 of the leaf certificate a TLS listener serves for SNI `sni`.
pub fn served_fingerprint_for(port: u16, sni: &str) -> Result<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            sni,
        ])
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(text.as_bytes())
        .with_context(|| format!("s_client printed no certificate: {text}"))?;
    Ok(hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        der.as_ref(),
    )))
}

/// Hex SHA-256 of the first certificate in a PEM file.
pub fn file_fingerprint(pem: &Path) -> Result<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(pem)
        .with_context(|| format!("{}", pem.display()))?;
    Ok(hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        der.as_ref(),
    )))
}

/// Generates a token key through the API, gets its CSR through the API and has the lab CA sign
/// it; returns the chain file.
pub fn key_csr_chain(lab: &Lab, label: &str) -> Result<PathBuf> {
    ctl_ok(
        lab,
        &["keys", "generate", "--type", "ec-p256", "--label", label],
    )?;
    let csr = lab.path(&format!("{label}.csr"));
    ctl_ok(
        lab,
        &[
            "keys",
            "csr",
            "--label",
            label,
            "--cn",
            "localhost",
            "--san",
            "localhost",
            "--out",
            &csr.display().to_string(),
        ],
    )?;
    let chain = lab.path(&format!("{label}.pem"));
    sign(lab, "ca", &csr, &chain)?;
    Ok(chain)
}
