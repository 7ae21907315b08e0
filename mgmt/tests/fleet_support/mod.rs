//! Harness for the fleet tests: a 3-member etcd cluster on loopback (Debian `etcd-server`),
//! two appliances in one fleet, and waits on what they serve and report.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::api_support::file_fingerprint;
use crate::api_support::served_fingerprint;
use crate::common::acme_support::{free_port, wait_for, write_config, Gate};
use crate::common::{ChildGuard, Lab};

pub const PREFIX: &str = "/tlsgate-test";

/// A 3-member etcd cluster; each member is killed (by its pid) when dropped, or on its own with
/// [`Etcd::kill_member`], and started again on its data directory with [`Etcd::restart_member`].
pub struct Etcd {
    dir: PathBuf,
    peers: Vec<u16>,
    clients: Vec<u16>,
    members: Vec<Option<ChildGuard>>,
    endpoints: Vec<String>,
}

impl Etcd {
    /// Starts the cluster on ports of its own. A member that exits while the cluster forms (say,
    /// its port was taken between choosing and binding it) or a cluster not healthy within 60 s
    /// is tried again on other ports, three times in all; the error names each member's last
    /// log lines.
    pub fn start(dir: &Path) -> Result<Etcd> {
        let mut tries = Vec::new();
        for attempt in 1..=3 {
            let dir = dir.join(format!("etcd-try{attempt}"));
            std::fs::create_dir_all(&dir)?;
            let mut etcd = Etcd::on_new_ports(&dir)?;
            for i in 0..3 {
                etcd.restart_member(i)?;
            }
            match etcd.wait_formed() {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    eprintln!("etcd cluster, try {attempt} of 3: {e:#}");
                    tries.push(format!("try {attempt}: {e:#}"));
                }
            }
        }
        bail!(
            "no healthy etcd cluster in three tries:\n{}",
            tries.join("\n")
        )
    }

    fn on_new_ports(dir: &Path) -> Result<Etcd> {
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
        Ok(Etcd {
            dir: dir.to_owned(),
            endpoints: clients
                .iter()
                .map(|p| format!("http://127.0.0.1:{p}"))
                .collect(),
            peers,
            clients,
            members: vec![None, None, None],
        })
    }

    /// Waits until every member reports healthy; fails at once when a member exits.
    fn wait_formed(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            for (i, member) in self.members.iter_mut().enumerate() {
                if let Some(m) = member {
                    if let Some(status) = m.child.try_wait()? {
                        bail!("member m{i} exited ({status}): {}", self.log_tail(i));
                    }
                }
            }
            if self.ctl(&["endpoint", "health"])?.status.success() {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                let tails: Vec<String> = (0..3)
                    .map(|i| format!("m{i}: {}", self.log_tail(i)))
                    .collect();
                bail!("not healthy after 60 s; {}", tails.join("; "));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of member `i`'s log, for an error.
    fn log_tail(&self, i: usize) -> String {
        let log =
            std::fs::read_to_string(self.dir.join(format!("etcd-m{i}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    }

    /// Starts member `i` (again): a restarted member keeps its data directory and rejoins.
    pub fn restart_member(&mut self, i: usize) -> Result<()> {
        let cluster: Vec<String> = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("etcd-m{i}.log")))?;
        let (peer, client) = (self.peers[i], self.clients[i]);
        let child = Command::new("etcd")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.join(format!("etcd-m{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "tlsgate-test",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("etcd")?;
        self.members[i] = Some(ChildGuard {
            child,
            name: "etcd",
        });
        Ok(())
    }

    /// Kills member `i` (SIGKILL, by its pid).
    pub fn kill_member(&mut self, i: usize) {
        self.members[i] = None;
    }

    /// Waits until member `i` reports no leader (it has lost the quorum).
    pub fn wait_leaderless(&self, i: usize) -> Result<()> {
        let endpoint = self.endpoints[i].clone();
        wait_for(
            Duration::from_secs(30),
            "the member to lose its leader",
            || {
                let out = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args(["--endpoints", &endpoint, "endpoint", "status", "-w", "json"])
                    .output()?;
                let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
                    Ok(v) => v,
                    Err(_) => return Ok(None),
                };
                let status = &v[0]["Status"];
                // `leader` is left out of the JSON when it is 0.
                Ok(
                    (status.is_object() && status["leader"].as_u64().unwrap_or(0) == 0)
                        .then_some(()),
                )
            },
        )
    }

    pub fn wait_healthy(&self) -> Result<()> {
        wait_for(Duration::from_secs(60), "a healthy etcd cluster", || {
            let out = self.ctl(&["endpoint", "health"])?;
            Ok(out.status.success().then_some(()))
        })
    }

    pub fn ctl(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints.join(",")])
            .args(args)
            .output()?)
    }

    pub fn fleet_section(&self, name: &str) -> String {
        let endpoints: Vec<String> = self.endpoints.iter().map(|e| format!("{e:?}")).collect();
        format!(
            "[fleet]\nendpoints = [{}]\nprefix = \"{PREFIX}\"\nname = \"{name}\"\nlease_ttl_s = 4\n",
            endpoints.join(", ")
        )
    }
}

/// Appliances `a` and `b` in one fleet on `etcd`, `more` added to each one's configuration;
/// returns them and B's configuration file (to start it again).
pub fn start_pair(
    lab: &Lab,
    etcd: &Etcd,
    backend: &str,
    more: &str,
) -> Result<(Gate, Gate, PathBuf)> {
    let config_a = write_config(
        lab,
        "a",
        backend,
        &format!("{more}{}", etcd.fleet_section("a")),
    )?;
    let config_b = write_config(
        lab,
        "b",
        backend,
        &format!("{more}{}", etcd.fleet_section("b")),
    )?;
    Ok((
        Gate::start(lab, &config_a)?,
        Gate::start(lab, &config_b)?,
        config_b,
    ))
}

pub fn ctl_json(lab: &Lab, gate: &Gate, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ctl_at(lab, &gate.socket, &all)?;
    serde_json::from_str(&out).with_context(|| format!("ctl printed {out}"))
}

/// `ctl certs upload --id ID --key KEY --chain CHAIN` over `socket`, which must succeed.
pub fn upload_at(lab: &Lab, socket: &str, id: &str, key: &str, chain: &Path) -> Result<String> {
    let chain = chain.display().to_string();
    ctl_at(
        lab,
        socket,
        &[
            "certs", "upload", "--id", id, "--key", key, "--chain", &chain,
        ],
    )
}

/// `tlsgate ctl --socket SOCKET ARGS` (with `lab`'s token environment), which must succeed; its
/// stdout.
pub fn ctl_at(lab: &Lab, socket: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["ctl", "--socket", socket];
    all.extend_from_slice(args);
    lab.run(&all)
}

/// Waits until `port` serves the certificate whose fingerprint is `want`.
pub fn wait_served(port: u16, want: &str, what: &str) -> Result<Duration> {
    let start = Instant::now();
    wait_for(Duration::from_secs(30), what, || {
        Ok((served_fingerprint(port)? == want).then_some(()))
    })?;
    Ok(start.elapsed())
}

/// Waits until `ctl fleet status` on `gate` satisfies `f` for both members `a` and `b`.
pub fn wait_members(
    lab: &Lab,
    gate: &Gate,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let mut last = serde_json::Value::Null;
    wait_for(Duration::from_secs(30), what, || {
        // Not connected yet answers `fleet_unavailable`: asked again.
        let Ok(status) = ctl_json(lab, gate, &["fleet", "status"]) else {
            return Ok(None);
        };
        let members = status["members"].as_array().cloned().unwrap_or_default();
        let ok = ["a", "b"]
            .iter()
            .all(|n| members.iter().any(|m| m["name"] == *n && f(m)));
        last = status.clone();
        Ok(ok.then_some(status))
    })
    .with_context(|| format!("last fleet status: {last}"))
}

/// `ctl certs upload --id web --key web --chain <chain>` on `gate`.
pub fn upload(lab: &Lab, gate: &Gate, chain: &Path) -> Command {
    lab.cmd(&[
        "ctl",
        "--socket",
        &gate.socket,
        "certs",
        "upload",
        "--id",
        "web",
        "--key",
        "web",
        "--chain",
        &chain.display().to_string(),
    ])
}

/// A new chain for the token key `web` (a new serial, so a new fingerprint), kept as `name`.
pub fn new_chain(lab: &Lab, name: &str) -> Result<(PathBuf, String)> {
    let chain = lab.path(name);
    std::fs::copy(lab.localhost_chain("web")?, &chain)?;
    let fingerprint = file_fingerprint(&chain)?;
    Ok((chain, fingerprint))
}
