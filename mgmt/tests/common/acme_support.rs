//! A real ACME CA for the tests: Debian's `pebble` with `pebble-challtestsrv` as its DNS (every
//! name resolves to a loopback address the test chooses), its HTTPS certificate from the lab CA,
//! validation pointed at tlsgate's ports; and `tlsgate serve` with its log in a file.

use std::collections::HashMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{check, tlsgate, wait_ready, ChildGuard, Lab};

/// The pebble binaries are here; a skip (a failure under `CI=true`) when not.
pub fn have_pebble() -> bool {
    super::require("pebble", "pebble")
        && super::require("pebble-challtestsrv", "pebble")
        && super::require("openssl", "openssl")
        && super::require("curl", "curl")
}

/// A port nobody listens on now (bound and released; the tests use it at once) and that no
/// other test of this process was given: the tests of one binary run side by side, and the
/// kernel may hand a just-released port to the next `bind(0)`.
pub fn free_port() -> Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    bail!("no free port not already given to another test in 100 tries")
}

/// Polls `f` every 200 ms until it gives `Some`, or fails with `what` after `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How to start pebble.
#[derive(Default, Clone)]
pub struct PebbleOpts {
    /// Its ACME port (fixed, so a restart keeps the directory URL).
    pub port: u16,
    /// Where it validates tls-alpn-01 and http-01.
    pub tls_port: u16,
    pub http_port: u16,
    /// Environment (PEBBLE_WFE_NONCEREJECT, ...).
    pub env: Vec<(&'static str, String)>,
    /// `externalAccountMACKeys` (kid → base64url key); EAB required when not empty.
    pub eab: Vec<(String, String)>,
    /// The address every name resolves to (A record).
    pub ipv4: &'static str,
    /// Names pebble refuses to issue for (`domainBlocklist`).
    pub blocklist: Vec<&'static str>,
}

/// A running pebble and its DNS.
pub struct Pebble {
    pebble: ChildGuard,
    _dns: ChildGuard,
    pub opts: PebbleOpts,
    pub log: PathBuf,
    dns_mgmt: u16,
    config: PathBuf,
    dns_port: u16,
    lab_root: PathBuf,
}

impl Pebble {
    pub fn start(lab: &Lab, opts: PebbleOpts) -> Result<Pebble> {
        let dir = lab.path("pebble");
        std::fs::create_dir_all(&dir)?;
        if !dir.join("cert.pem").exists() {
            let (key, chain) =
                lab.software_cert("EC", "pebble", "localhost", "DNS:localhost,IP:127.0.0.1")?;
            std::fs::copy(key, dir.join("key.pem"))?;
            std::fs::copy(chain, dir.join("cert.pem"))?;
        }
        let (dns_port, dns_mgmt) = (free_port()?, free_port()?);
        let dns = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", opts.ipv4, "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("pebble-challtestsrv")?;
        let dns = ChildGuard {
            child: dns,
            name: "pebble-challtestsrv",
        };
        let config = dir.join(format!("pebble-{}.json", opts.port));
        let mut p = Pebble {
            pebble: ChildGuard {
                child: Command::new("true").spawn()?,
                name: "placeholder",
            },
            _dns: dns,
            log: dir.join(format!("pebble-{}.log", opts.port)),
            dns_mgmt,
            config,
            dns_port,
            lab_root: lab.path("ca/root.pem"),
            opts,
        };
        p.write_config(&dir)?;
        p.run()?;
        Ok(p)
    }

    fn write_config(&self, dir: &Path) -> Result<()> {
        let o = &self.opts;
        let eab: HashMap<&str, &str> = o
            .eab
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{}", o.port),
            "managementListenAddress": format!("127.0.0.1:{}", free_port()?),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": o.http_port,
            "tlsPort": o.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": !eab.is_empty(),
            "externalAccountMACKeys": eab,
            "domainBlocklist": o.blocklist,
        }});
        std::fs::write(&self.config, serde_json::to_vec_pretty(&config)?)?;
        Ok(())
    }

    /// Starts pebble (again) and waits for its directory.
    pub fn run(&mut self) -> Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new("pebble");
        cmd.arg("-config")
            .arg(&self.config)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .envs(self.opts.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log);
        self.pebble = ChildGuard {
            child: cmd.spawn().context("pebble")?,
            name: "pebble",
        };
        wait_for(Duration::from_secs(20), "pebble's directory", || {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "2", "--cacert"])
                .arg(&self.lab_root)
                .arg(self.directory())
                .output()?;
            Ok(
                (out.status.success() && String::from_utf8_lossy(&out.stdout).contains("newOrder"))
                    .then_some(()),
            )
        })
    }

    /// Stops pebble (SIGKILL, by its pid): its orders and accounts are gone with it.
    pub fn stop(&mut self) -> Result<()> {
        self.pebble.child.kill()?;
        self.pebble.child.wait()?;
        Ok(())
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.opts.port)
    }

    /// Orders placed at pebble (its log line for each POST to new-order).
    pub fn orders(&self) -> Result<usize> {
        let log = std::fs::read_to_string(&self.log)?;
        Ok(log
            .lines()
            .filter(|l| l.contains("POST /order-plz"))
            .count())
    }

    /// Makes every name resolve to `ip` from now on.
    pub fn set_ipv4(&self, ip: &str) -> Result<()> {
        check(
            Command::new("curl")
                .args(["-sS", "--max-time", "5", "-X", "POST", "--data"])
                .arg(format!("{{\"ip\":\"{ip}\"}}"))
                .arg(format!(
                    "http://127.0.0.1:{}/set-default-ipv4",
                    self.dns_mgmt
                ))
                .output()?,
            "set-default-ipv4",
        )?;
        Ok(())
    }
}

/// A `[[acme]]` entry pointed at `directory`, trusting the lab CA for its HTTPS.
pub fn acme_entry(lab: &Lab, name: &str, directory: &str, names: &[&str], extra: &str) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!(
        "[[acme]]\nname = \"{name}\"\ndirectory = \"{directory}\"\ndirectory_ca = \"{}\"\nnames = [{}]\nlisteners = [\"web\"]\nretry_min_ms = 300\nretry_max_ms = 2000\n{extra}\n",
        lab.p("ca/root.pem"),
        names.join(", ")
    )
}

/// A configuration with one listener `web` (the lab's localhost certificate, a software key,
/// so something is served before any ACME certificate), the state directory, the API socket,
/// metrics, and `more` (`[[acme]]` entries, `[acme_http01]`).
pub fn write_config(lab: &Lab, tag: &str, backend: &str, more: &str) -> Result<PathBuf> {
    let (key, chain) = if lab.path("certs/boot.pem").exists() {
        (lab.path("certs/boot.key"), lab.path("certs/boot.pem"))
    } else {
        lab.software_key_with_chain("EC", "boot")?
    };
    let config = lab.path(&format!("{tag}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"[pkcs11]
token = "lab"
pin = "file:{pin}"

[dataplane]
cores = [0]
io = "portable"

[state]
dir = "{state}"

[api]
socket = "{sock}"

[metrics]
listen = "127.0.0.1:0"

[[listener]]
name = "web"
bind = "127.0.0.1:0"
backend = "{backend}"

[[listener.certificate]]
chain = "{chain}"
key = "file:{key}"

{more}
"#,
            pin = lab.p("token/user.pin"),
            state = lab.p(&format!("state-{tag}")),
            sock = lab.p(&format!("{tag}.sock")),
            chain = chain.display(),
            key = key.display(),
        ),
    )?;
    Ok(config)
}

/// A running `tlsgate serve` whose log goes to a file.
pub struct Gate {
    pub guard: ChildGuard,
    /// The ready file's `name address` lines.
    pub ready: HashMap<String, String>,
    pub log: PathBuf,
    pub socket: String,
}

impl Gate {
    pub fn start(lab: &Lab, config: &Path) -> Result<Gate> {
        let ready_path = config.with_extension("ready");
        let _ = std::fs::remove_file(&ready_path);
        let log = config.with_extension("log");
        let file = File::options().create(true).append(true).open(&log)?;
        let mut cmd = tlsgate();
        lab.env(&mut cmd);
        let child = cmd
            .args(["serve", "--config"])
            .arg(config)
            .arg("--ready-file")
            .arg(&ready_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()?;
        let mut guard = ChildGuard {
            child,
            name: "tlsgate serve",
        };
        let lines = wait_ready(&ready_path, &mut guard, Duration::from_secs(30))?;
        let ready: HashMap<String, String> = lines
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect();
        let socket = ready.get("api-socket").context("api socket")?.clone();
        Ok(Gate {
            guard,
            ready,
            log,
            socket,
        })
    }

    pub fn port(&self, name: &str) -> Result<u16> {
        let addr = self
            .ready
            .get(name)
            .with_context(|| format!("{name} in {:?}", self.ready))?;
        Ok(addr.rsplit(':').next().context("port")?.parse()?)
    }

    /// `ctl acme status` as JSON: the entry `name`.
    pub fn status(&self, lab: &Lab, name: &str) -> Result<serde_json::Value> {
        let out = lab.run(&["ctl", "--socket", &self.socket, "--json", "acme", "status"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["items"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == name).cloned())
            .with_context(|| format!("no entry {name} in {v}"))
    }

    /// Waits until entry `name` serves a certificate other than `not_serial` (any when `None`).
    pub fn wait_issued(
        &self,
        lab: &Lab,
        name: &str,
        not_serial: Option<&str>,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        wait_for(timeout, &format!("an ACME certificate for {name}"), || {
            let s = self.status(lab, name)?;
            let serial = s["serial"].as_str();
            Ok((serial.is_some() && serial != not_serial).then_some(s))
        })
        .with_context(|| self.tail_log())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tail_log(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops the process at once (SIGKILL): nothing is cleaned up, as in a crash.
    pub fn kill(mut self) -> Result<()> {
        self.guard.child.kill()?;
        self.guard.child.wait()?;
        Ok(())
    }
}

/// The certificate chain `openssl s_client` gets for `sni` on `port` (its text output).
pub fn s_client_chain(port: u16, sni: &str) -> Result<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", sni, "-showcerts"])
        .stdin(Stdio::null())
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A TCP relay that holds the connections it accepts, unread, until told where to forward
/// them: pebble's validation can be made to wait while the test restarts something.
pub struct Stall {
    pub port: u16,
    target: std::sync::Arc<std::sync::Mutex<Option<u16>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Stall {
    pub fn start() -> Result<Stall> {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let target = std::sync::Arc::new(std::sync::Mutex::new(None::<u16>));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (t, a) = (target.clone(), accepted.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let t = t.clone();
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let to = loop {
                        if let Some(p) = t.lock().ok().and_then(|g| *g) {
                            break p;
                        }
                        if start.elapsed() > Duration::from_secs(120) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    };
                    let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                        return;
                    };
                    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
                        return;
                    };
                    let up = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut s2);
                        let _ = s2.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut c, mut s) = (client, server);
                    let _ = std::io::copy(&mut s, &mut c);
                    let _ = c.shutdown(std::net::Shutdown::Write);
                    let _ = up.join();
                });
            }
        });
        Ok(Stall {
            port,
            target,
            accepted,
        })
    }

    /// Connections accepted so far (held or forwarded).
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Forwards held and new connections to `port` on loopback.
    pub fn forward(&self, port: u16) {
        if let Ok(mut g) = self.target.lock() {
            *g = Some(port);
        }
    }
}
