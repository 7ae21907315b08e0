//! One certificate rotation through the management API with many certificates bound.
//!
//! Starts the real `tlsgate serve` (its path in `TLSGATE_BIN`, else `target/release/tlsgate`
//! under `CARGO_TARGET_DIR` or the workspace) with the API on a unix socket and a state
//! directory, uploads software-key certificates (rcgen, one P-256 key each, issued by one CA)
//! with `PUT /v1/certificates/{id}`, binds all of them to one listener, and then times
//! rotations (`PUT` of a bound certificate with a new chain for its key) from the client side.
//! Steps: 100, 1,000 and 10,000 bound (`ROTATION_STEPS=100,1000` for fewer), 20 rotations
//! each (`ROTATIONS=N` for another count). Prints the median and the largest rotation and the server's VmRSS growth per bound
//! certificate. Not a test: nothing is asserted; BENCHMARKING.md records the figures.
//!
//! ```text
//! cargo build --release -p tlsgate-mgmt
//! cargo bench -p tlsgate-benches --bench rotation
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One keep-alive HTTP/1.1 connection to the API socket.
struct Api {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Api {
    fn connect(path: &Path) -> Result<Api> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Api {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    fn call(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        write!(
            self.writer,
            "{method} {path} HTTP/1.1\r\nhost: api\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )?;
        self.writer.flush()?;
        let mut status = String::new();
        self.reader.read_line(&mut status)?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .context("status line")?
            .parse()?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            ensure!(self.reader.read_line(&mut line)? > 0, "closed mid-answer");
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }

    fn ok(&mut self, method: &str, path: &str, body: &str) -> Result<()> {
        let (code, answer) = self.call(method, path, body)?;
        ensure!(
            (200..300).contains(&code),
            "{method} {path}: {code} {answer}"
        );
        Ok(())
    }
}

struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

fn ca() -> Result<Ca> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rotation bench CA");
    let cert = params.self_signed(&key)?;
    Ok(Ca {
        pem: cert.pem(),
        issuer: rcgen::Issuer::new(params, key),
    })
}

/// A chain (leaf + CA) for `name` with `key`.
fn chain(ca: &Ca, name: &str, key: &rcgen::KeyPair, serial: u64) -> Result<String> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    let leaf = params.signed_by(key, &ca.issuer)?;
    Ok(format!("{}{}", leaf.pem(), ca.pem))
}

fn put_cert_body(key: &Path, chain: &str) -> String {
    serde_json::json!({ "key": format!("file:{}", key.display()), "chain_pem": chain }).to_string()
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TLSGATE_BIN") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release/tlsgate")
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let steps: Vec<usize> = std::env::var("ROTATION_STEPS")
        .unwrap_or_else(|_| "100,1000,10000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let rotations: usize = std::env::var("ROTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let bin = binary();
    if !bin.exists() {
        bail!(
            "{} is missing: cargo build --release -p tlsgate-mgmt (or set TLSGATE_BIN)",
            bin.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("api.sock");
    let config = dir.path().join("tlsgate.toml");
    std::fs::write(
        &config,
        format!(
            "[process]\nallow_root = true\n\n[dataplane]\ncores = [0]\nio = \"portable\"\n\n[api]\nsocket = \"{}\"\n\n[state]\ndir = \"{}\"\n\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:9\"\n",
            socket.display(),
            dir.path().join("state").display()
        ),
    )?;
    let ready = dir.path().join("ready");
    let child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("serve.log"))?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let server = Server(child);
    let start = Instant::now();
    // Created empty before start-up ends, filled once it serves.
    while std::fs::metadata(&ready).map_or(true, |m| m.len() == 0) {
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "no ready file; the server said:\n{}",
            std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = server.0.id();
    let mut api = Api::connect(&socket)?;
    let ca = ca()?;
    let keys_dir = dir.path().join("keys");
    std::fs::create_dir(&keys_dir)?;
    let rss_start = rss_kib(pid)?;
    let mut keys: Vec<(PathBuf, rcgen::KeyPair)> = Vec::new();
    let mut serial = 1u64;
    println!("bound  rotation median  rotation max  upload+bind step  VmRSS growth per bound certificate");
    for &n in &steps {
        let t = Instant::now();
        while keys.len() < n {
            let i = keys.len();
            let key = rcgen::KeyPair::generate()?;
            let path = keys_dir.join(format!("k{i}.pem"));
            std::fs::write(&path, key.serialize_pem())?;
            let chain = chain(&ca, &format!("h{i}.bench.example"), &key, serial)?;
            serial += 1;
            api.ok(
                "PUT",
                &format!("/v1/certificates/c{i}"),
                &put_cert_body(&path, &chain),
            )?;
            keys.push((path, key));
        }
        let binding: Vec<serde_json::Value> = (0..n)
            .map(|i| serde_json::json!({ "cert": format!("c{i}"), "default": i == 0 }))
            .collect();
        api.ok(
            "PUT",
            "/v1/listeners/web/binding",
            &serde_json::json!({ "certificates": binding }).to_string(),
        )?;
        let step = t.elapsed();
        let rss = rss_kib(pid)?;
        eprintln!("rotating with {n} bound (server pid {pid})");
        let mut times = Vec::with_capacity(rotations);
        for r in 0..rotations {
            let i = (r * 7919) % n;
            let (path, key) = &keys[i];
            let chain = chain(&ca, &format!("h{i}.bench.example"), key, serial)?;
            serial += 1;
            let body = put_cert_body(path, &chain);
            let t = Instant::now();
            api.ok("PUT", &format!("/v1/certificates/c{i}"), &body)?;
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "{n:>6}  {:>12.1} ms  {:>10.1} ms  {:>14.1} s  {:>8.1} KiB",
            times[times.len() / 2].as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3,
            step.as_secs_f64(),
            rss.saturating_sub(rss_start) as f64 / n as f64,
        );
    }
    drop(server);
    Ok(())
}
