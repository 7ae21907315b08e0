//! Shared harness for the binary-level tests: a lab token of its own per test (its own
//! SOFTHSM2_CONF), the lab CA, certificate chains, and child processes killed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod acme_support;
pub mod hsm_support;
pub mod ocsp_support;
pub mod policy_support;

use anyhow::{bail, ensure, Context, Result};

/// The io drivers to run a binary-level test with: both, or only the portable one where io_uring
/// is off (a skip outside CI, a failure under `CI=true`).
pub fn drivers() -> Vec<&'static str> {
    match tlsgate_hw_tests::skip::io_uring_sysctl_off() {
        Some(why) => {
            tlsgate_hw_tests::skip::missing(format!("io = \"uring\" cases: {why}"));
            vec!["portable"]
        }
        None => vec!["portable", "uring"],
    }
}

/// Whether `program` (from the Debian package `package`) is here; a skip outside CI and a failure
/// under `CI=true` when not. The caller returns when this is false.
pub fn require(program: &str, package: &str) -> bool {
    tlsgate_hw_tests::skip::unless(tlsgate_hw_tests::skip::tool_missing(program, package))
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

/// The binary, allowed to run on as root (`TLSGATE_ALLOW_ROOT=1`, as `[process] allow_root =
/// true`): CI runs the suite as root and these tests are not about privileges
/// (`privileges_dropped.rs` is, and starts its servers without it).
pub fn tlsgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tlsgate"));
    c.env(ALLOW_ROOT_ENV, "1");
    c
}

/// `[process] allow_root` in the environment.
pub const ALLOW_ROOT_ENV: &str = "TLSGATE_ALLOW_ROOT";

pub fn check(out: Output, what: &str) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

pub fn fail(out: Output, what: &str) -> Result<String> {
    ensure!(
        !out.status.success(),
        "{what} should have failed but succeeded"
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `tlsgate ctl --socket SOCKET ARGS` (with `lab`'s token environment) must be refused (exit 1)
/// with `code` in its error; returns that error.
pub fn ctl_refused_at(lab: &Lab, socket: &str, args: &[&str], code: &str) -> Result<String> {
    let mut all = vec!["ctl", "--socket", socket];
    all.extend_from_slice(args);
    let out = lab.cmd(&all).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.code() == Some(1) && stderr.contains(code),
        "ctl {args:?} should be refused with {code}, got {:?}: {stderr}",
        out.status
    );
    Ok(stderr)
}

pub fn uri(label: &str) -> String {
    format!("pkcs11:token=lab;object={label};type=private")
}

/// A lab token of its own in a temporary directory.
pub struct Lab {
    pub dir: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Result<Lab> {
        let dir = tempfile::tempdir()?;
        let out = tlsgate()
            .args(["token", "init-lab", "--label", "lab", "--dir"])
            .arg(dir.path().join("token"))
            .env_remove("SOFTHSM2_CONF")
            .output()?;
        let stdout = check(out, "token init-lab")?;
        ensure!(stdout.contains("export TLSGATE_PIN=file:"), "{stdout}");
        Ok(Lab { dir })
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn p(&self, p: &str) -> String {
        self.path(p).display().to_string()
    }

    pub fn env(&self, c: &mut Command) {
        c.env("SOFTHSM2_CONF", self.path("token/softhsm2.conf"))
            .env("TLSGATE_TOKEN", "lab")
            .env(
                "TLSGATE_PIN",
                format!("file:{}", self.path("token/user.pin").display()),
            )
            .env_remove("TLSGATE_PKCS11_MODULE")
            .env(ALLOW_ROOT_ENV, "1");
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = tlsgate();
        c.args(args);
        self.env(&mut c);
        c
    }

    pub fn run(&self, args: &[&str]) -> Result<String> {
        check(self.cmd(args).output()?, &args.join(" "))
    }

    pub fn list(&self) -> Result<Vec<serde_json::Value>> {
        let out = self.run(&["token", "list", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("list --json printed {out}"))
    }

    /// Lab CA + a token key of `key_type` labelled `label` + its chain in `certs/<label>.pem`.
    pub fn token_key_with_chain(&self, key_type: &str, label: &str) -> Result<PathBuf> {
        self.ensure_ca()?;
        self.run(&["token", "generate", "--type", key_type, "--label", label])?;
        self.localhost_chain(label)
    }

    /// The chain in `certs/<label>.pem` for the token key `label` (already on the token), issued
    /// by the lab CA for localhost and 127.0.0.1.
    pub fn localhost_chain(&self, label: &str) -> Result<PathBuf> {
        self.ensure_ca()?;
        let chain = self.path(&format!("certs/{label}.pem"));
        std::fs::create_dir_all(self.path("certs"))?;
        self.run(&[
            "token",
            "issue-cert",
            "--key",
            &uri(label),
            "--ca-dir",
            &self.p("ca"),
            "--cn",
            "localhost",
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
            "--out",
            &chain.display().to_string(),
        ])?;
        Ok(chain)
    }

    /// A software key (PKCS#8 file) of `algorithm` (`EC` or `RSA`) and its chain from the lab CA.
    pub fn software_key_with_chain(
        &self,
        algorithm: &str,
        label: &str,
    ) -> Result<(PathBuf, PathBuf)> {
        self.software_cert(algorithm, label, "localhost", "DNS:localhost,IP:127.0.0.1")
    }

    /// A software key (`EC` P-256 or `RSA` 2048) and its chain from the lab CA for `cn` with the
    /// given subjectAltName value (e.g. `DNS:a,IP:127.0.0.1`); returns (key file, chain file).
    pub fn software_cert(
        &self,
        algorithm: &str,
        label: &str,
        cn: &str,
        subject_alt_name: &str,
    ) -> Result<(PathBuf, PathBuf)> {
        self.ensure_ca()?;
        std::fs::create_dir_all(self.path("certs"))?;
        let key = self.path(&format!("certs/{label}.key"));
        let opt = if algorithm == "EC" {
            "ec_paramgen_curve:P-256"
        } else {
            "rsa_keygen_bits:2048"
        };
        check(
            Command::new("openssl")
                .args(["genpkey", "-algorithm", algorithm, "-pkeyopt", opt, "-out"])
                .arg(&key)
                .output()?,
            "openssl genpkey",
        )?;
        let csr = self.path(&format!("certs/{label}.csr"));
        check(
            Command::new("openssl")
                .args(["req", "-new", "-key"])
                .arg(&key)
                .args(["-subj", &format!("/CN={cn}")])
                .args(["-addext", &format!("subjectAltName={subject_alt_name}")])
                .arg("-out")
                .arg(&csr)
                .output()?,
            "openssl req",
        )?;
        let chain = self.path(&format!("certs/{label}.pem"));
        self.sign_csr(&csr, &chain, None)?;
        Ok((key, chain))
    }

    /// The lab CA signs `csr` into the chain `out` (valid for `days`, or the CA's default).
    pub fn sign_csr(&self, csr: &Path, out: &Path, days: Option<&str>) -> Result<()> {
        let (ca, csr, out) = (
            self.p("ca"),
            csr.display().to_string(),
            out.display().to_string(),
        );
        let mut args = vec!["ca", "sign", "--dir", &ca, "--csr", &csr, "--out", &out];
        if let Some(days) = days {
            args.extend(["--days", days]);
        }
        self.run(&args)?;
        Ok(())
    }

    fn ensure_ca(&self) -> Result<()> {
        if !self.path("ca/root.pem").exists() {
            self.run(&["ca", "init-lab", "--dir", &self.p("ca")])?;
        }
        Ok(())
    }
}

/// A child process killed (SIGKILL) when dropped unless it already exited.
pub struct ChildGuard {
    pub child: Child,
    pub name: &'static str,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until `path` exists and is non-empty, failing early if `child` exits.
pub fn wait_ready(path: &Path, child: &mut ChildGuard, timeout: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.is_empty() {
                return Ok(s);
            }
        }
        if let Some(status) = child.child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!(
                "{} exited ({status}) before it was ready:\n{err}",
                child.name
            );
        }
        if start.elapsed() > timeout {
            bail!("{} not ready after {timeout:?}", child.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the demo backend on port 0 and returns it with its address.
pub fn demo_backend(dir: &Path) -> Result<(ChildGuard, String)> {
    demo_backend_named(dir, None, "127.0.0.1:0")
}

/// Starts the demo backend on `listen`, answering as `name` (its `x-backend` header) when given;
/// returns it with its address.
pub fn demo_backend_named(
    dir: &Path,
    name: Option<&str>,
    listen: &str,
) -> Result<(ChildGuard, String)> {
    let ready = dir.join(format!(
        "backend.{}.{}.ready",
        name.unwrap_or("demo"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = tlsgate();
    cmd.args(["demo-backend", "--listen", listen, "--ready-file"])
        .arg(&ready);
    if let Some(name) = name {
        cmd.args(["--name", name]);
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let mut guard = ChildGuard {
        child,
        name: "demo-backend",
    };
    let addr = wait_ready(&ready, &mut guard, Duration::from_secs(20))?;
    Ok((guard, addr.trim().to_owned()))
}

/// A running `tlsgate serve` and the address of its first listener.
pub struct Serve {
    pub guard: ChildGuard,
    pub addr: String,
    pub port: u16,
}

impl Serve {
    pub fn start(lab: &Lab, config: &Path) -> Result<Serve> {
        Self::start_with_env(lab, config, &[])
    }

    /// Like `start`, with extra environment variables for the child.
    pub fn start_with_env(lab: &Lab, config: &Path, env: &[(&str, String)]) -> Result<Serve> {
        Self::start_limited(lab, config, env, None)
    }

    /// Like `start_with_env`, with the child's file-descriptor limit (soft and hard) set to
    /// `nofile` first (`ulimit -n` in a shell that then execs the binary).
    pub fn start_limited(
        lab: &Lab,
        config: &Path,
        env: &[(&str, String)],
        nofile: Option<u64>,
    ) -> Result<Serve> {
        let ready = config.with_extension("ready");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = match nofile {
            None => tlsgate(),
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_tlsgate"));
                c
            }
        };
        lab.env(&mut cmd);
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let child = cmd
            .args(["serve", "--config"])
            .arg(config)
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut guard = ChildGuard {
            child,
            name: "tlsgate serve",
        };
        let lines = wait_ready(&ready, &mut guard, Duration::from_secs(30))?;
        let addr = lines
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .context("ready file names a listener")?
            .to_owned();
        let port = addr.rsplit(':').next().context("port")?.parse()?;
        Ok(Serve { guard, addr, port })
    }

    pub fn pid(&self) -> i32 {
        self.guard.child.id() as i32
    }

    /// Copies the server's stderr into `path` from now on. A test that makes the server log
    /// more than a pipe holds (64 KiB: a few hundred API calls) must call this, or the server
    /// blocks in its next log write, holding whatever lock it holds.
    pub fn log_to(&mut self, path: &Path) -> Result<()> {
        let mut from = self.guard.child.stderr.take().context("stderr was piped")?;
        let mut to = std::fs::File::create(path)?;
        std::thread::spawn(move || std::io::copy(&mut from, &mut to));
        Ok(())
    }

    /// Sends `signal` (by name, e.g. "TERM") with kill(1).
    pub fn signal(&self, signal: &str) -> Result<()> {
        check(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(self.pid().to_string())
                .output()?,
            "kill",
        )?;
        Ok(())
    }
}

/// curl through the appliance, verifying against the lab root.
pub fn curl(lab: &Lab, port: u16, path: &str, extra: &[&str]) -> Result<Output> {
    Ok(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert", &lab.p("ca/root.pem")])
        .args(extra)
        .arg(format!("https://localhost:{port}{path}"))
        .output()?)
}
