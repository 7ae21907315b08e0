//! `tlsgate upgrade`: starts the new binary with `serve --takeover` and waits until it serves
//! (exit 0) or fails (exit 1 with its error; the running process keeps serving).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The configuration file; the new process reads it again (listener names and addresses
    /// must stay those of the running process).
    #[arg(long, short)]
    pub config: PathBuf,
    /// The new binary (default: this `tlsgate`, e.g. the one a package upgrade just installed).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Passed to the new process as `serve --ready-file`.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Append the new process's output (its log) to this file instead of this command's
    /// stdout/stderr, which it would otherwise keep after this command exits.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// How long the new process may take to be ready (it logs in to the HSM and builds every
    /// listener); past it, it is killed and the running one keeps serving.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

/// How often readiness and the child's exit are looked at.
const POLL: Duration = Duration::from_millis(20);

pub fn run(args: UpgradeArgs) -> Result<()> {
    // A file that does not load is the new process's error to report (below), like any other.
    let socket = crate::config::Config::load(&args.config)
        .ok()
        .and_then(|c| super::socket_path(&c).ok());
    // Only looked at, not connected to: a connection is an upgrade attempt to the old process.
    if let Some(socket) = &socket {
        if !socket.exists() {
            bail!(
                "no handover socket at {}: no tlsgate serves this configuration",
                socket.display()
            );
        }
    }
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find this binary")?,
    };
    let (ready, temporary) = match &args.ready_file {
        Some(p) => (p.clone(), false),
        None => {
            let dir = socket
                .as_deref()
                .and_then(Path::parent)
                .map_or_else(std::env::temp_dir, Path::to_path_buf);
            (
                dir.join(format!(".upgrade-ready.{}", std::process::id())),
                true,
            )
        }
    };
    match std::fs::remove_file(&ready) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", ready.display())),
    }
    let mut cmd = Command::new(&binary);
    cmd.arg("serve")
        .arg("--config")
        .arg(&args.config)
        .arg("--takeover")
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        // Its own process group: a Ctrl-C at this command never reaches the new server.
        .process_group(0);
    if let Some(log) = &args.log_file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("--log-file: cannot open {}", log.display()))?;
        cmd.stdout(f.try_clone()?).stderr(f);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let started = Instant::now();
    let limit = Duration::from_secs(args.timeout_secs);
    loop {
        // `serve` creates the file empty before it switches user and fills it once it serves.
        if let Some(text) = std::fs::read_to_string(&ready)
            .ok()
            .filter(|t| !t.is_empty())
        {
            if temporary {
                let _ = std::fs::remove_file(&ready);
            }
            eprintln!(
                "tlsgate upgrade: {} (pid {}) serves; the previous process drains and exits",
                binary.display(),
                child.id()
            );
            // The new process's addresses, as its ready file has them.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the new process ({}) exited ({status}) before it was ready; the running one \
                 keeps serving{}",
                binary.display(),
                last_error(args.log_file.as_deref())
            );
        }
        if started.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the new process was not ready within {} s and was stopped; the running one \
                 keeps serving{}",
                args.timeout_secs,
                last_error(args.log_file.as_deref())
            );
        }
        std::thread::sleep(POLL);
    }
}

/// The last `error:` line of the new process's log file, as `": <line>"`.
fn last_error(log: Option<&Path>) -> String {
    let Some(path) = log else {
        return String::new();
    };
    let mut text = String::new();
    if std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_err()
    {
        return String::new();
    }
    text.lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .map(|l| format!(": {l}"))
        .unwrap_or_default()
}
