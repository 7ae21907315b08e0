//! Landlock: once started, the process reaches only the files and TCP ports its configuration
//! names (`[process] landlock`, on by default where the kernel has Landlock).
//!
//! Landlock restricts a thread and the threads it starts afterwards, never the threads that
//! already run (the kernel here, ABI 7, has no way to restrict them all at once). So the
//! ruleset is made once, early in `tlsgate serve` — after the state directory is locked and
//! before the management runtime, the token or the data plane start a thread — and published
//! here; then
//! - every thread tlsgate starts restricts itself first ([`enter_thread`]): the data plane's
//!   cores (at the end of their set-up, before their seccomp filter) and key-op workers
//!   (through [`tlsgate_dataplane::ThreadStart`]), the management runtime's blocking threads
//!   (`on_thread_start`), the degraded-start token opener, the ticket-key, health-check and
//!   signing-metrics threads. Threads those start inherit it (HSM recovery, health probes, a
//!   PKCS#11 module's own threads when the module is initialised again);
//! - the main thread (signals, API, metrics) restricts itself last, once start-up is over: it
//!   binds the data plane's listeners (a port-0 listener's other cores bind the port the
//!   kernel picked, which no rule made beforehand can name), the API's socket and writes the
//!   ready file first.
//!
//! Not covered: the short-lived thread that opens the token at start-up (and whatever threads
//! a PKCS#11 module starts inside that first `C_Initialize`; SoftHSM2 and p11-kit's client
//! start none).
//!
//! What is allowed (everything else of the file system is refused, `EACCES`, including
//! executing any program — there is no rule with the execute right):
//! - read: the directory of the configuration file and of every file it names (certificate
//!   chains, `file:` keys, CA bundles, CRLs, OCSP responses, PIN files, the PKCS#11 modules) —
//!   a directory rather than the file, because a file replaced by rename (an editor, a
//!   certificate renewal) is a new inode that a rule on the old one would not cover; the
//!   system's shared libraries (a PKCS#11 module that is loaded again loads its dependencies),
//!   the resolver's files and the system CA certificates (OCSP and backend names resolve on a
//!   blocking thread), `/dev/urandom`;
//! - read and write: the state directory (certificates, bindings, CRLs, the audit log by
//!   default) and `[process] landlock_paths` — by default, for SoftHSM2, its configuration
//!   (`SOFTHSM2_CONF` or `/etc/softhsm/softhsm2.conf`) and its token directory (it re-reads and
//!   locks the token's files on each signature); the audit log where it lies elsewhere;
//! - remove a file: the directory of the management socket (it is removed at exit);
//! - TCP bind: [`crate::config::Config::tcp_bind_ports`] (the listeners, metrics, the API's
//!   HTTPS). TCP connect is not restricted: backends, health checks, OCSP responders and
//!   network HSMs are reached by name and port from the configuration and the state. A socket
//!   already open (the listeners, the management socket and the connections it accepts) is
//!   not affected either.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use ::landlock::{
    make_bitflags, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, LandlockStatus,
    NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr,
    RulesetStatus, ABI,
};
use anyhow::{Context, Result};
use serde::Deserialize;

/// The newest Landlock ABI whose file-system rights are asked for (v5: device ioctls).
const FS_ABI: ABI = ABI::V5;

/// `[process] landlock`: `true` (default: enforce what the kernel supports, say what it does
/// not), `false`, or `"require"` (a kernel that cannot enforce all of it is a start error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    Off,
    #[default]
    BestEffort,
    Require,
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Mode::BestEffort),
            Raw::Bool(false) => Ok(Mode::Off),
            Raw::Word(w) if w == "require" => Ok(Mode::Require),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "landlock = {w:?}: use true (enforce what the kernel supports), false, or \"require\""
            ))),
        }
    }
}

/// What the ruleset allows (see the module docs); made from the configuration by
/// [`crate::config::landlock::plan`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Read beneath (directories) or read (files).
    pub read: BTreeSet<PathBuf>,
    /// Read and write beneath (directories) or read and write (files).
    pub write: BTreeSet<PathBuf>,
    /// Directories in which files may be removed.
    pub remove: BTreeSet<PathBuf>,
    /// TCP ports that may be bound.
    pub ports: BTreeSet<u16>,
}

/// The published ruleset; each thread restricts itself with a copy.
#[derive(Debug)]
pub struct Sandbox {
    ruleset: RulesetCreated,
}

// Process-wide by nature: one Landlock ruleset, which every thread of the process applies.
static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

// Per thread by nature: whether this thread has restricted itself.
thread_local! {
    static ENTERED: Cell<bool> = const { Cell::new(false) };
}

/// Makes the ruleset of `plan` and tries it on a thread of its own (which ends), so that what
/// the kernel enforces is known, and logged in one line, before any thread depends on it.
/// `Mode::Require` fails unless the kernel enforces all of it. `None` when `mode` is off.
pub fn build(plan: &Plan, mode: Mode) -> Result<Option<Sandbox>> {
    if mode == Mode::Off {
        tracing::warn!("[process] landlock = false: file access and TCP binds are not restricted");
        return Ok(None);
    }
    let level = match mode {
        Mode::Require => CompatLevel::HardRequirement,
        _ => CompatLevel::BestEffort,
    };
    let require = |e: ::landlock::RulesetError| {
        anyhow::anyhow!(
            "[process] landlock = \"require\": {e} (this kernel cannot enforce the ruleset; \
             use landlock = true to run with what it supports)"
        )
    };
    let read = make_bitflags!(AccessFs::{ReadFile | ReadDir});
    let write = AccessFs::from_all(FS_ABI)
        & !make_bitflags!(AccessFs::{Execute | MakeChar | MakeBlock | MakeFifo | MakeSym | MakeSock | IoctlDev});
    let remove = make_bitflags!(AccessFs::{RemoveFile});
    let mut ruleset = Ruleset::default()
        .set_compatibility(level)
        .handle_access(AccessFs::from_all(FS_ABI))
        .and_then(|r| r.handle_access(AccessNet::BindTcp))
        .and_then(|r| r.create())
        .map_err(require)?;
    let groups: [(&BTreeSet<PathBuf>, BitFlags<AccessFs>); 3] = [
        (&plan.read, read),
        (&plan.write, write),
        (&plan.remove, remove),
    ];
    for (paths, access) in groups {
        for path in paths {
            let Ok(meta) = std::fs::metadata(path) else {
                tracing::debug!(path = %path.display(), "landlock: no such path; no rule");
                continue;
            };
            let access = if meta.is_dir() {
                access
            } else {
                access & AccessFs::from_file(FS_ABI)
            };
            if access.is_empty() {
                continue;
            }
            let fd = PathFd::new(path)
                .with_context(|| format!("landlock: cannot open {}", path.display()))?;
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(require)?;
        }
    }
    for &port in &plan.ports {
        ruleset = ruleset
            .add_rule(NetPort::new(port, AccessNet::BindTcp))
            .map_err(require)?;
    }
    let trial = ruleset
        .try_clone()
        .context("landlock: cannot copy the ruleset")?;
    let status = std::thread::scope(|s| {
        s.spawn(move || trial.restrict_self())
            .join()
            .map_err(|_| anyhow::anyhow!("landlock: the trial thread panicked"))
    })?
    .map_err(require)?;
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => Some(effective_abi as i32),
        _ => None,
    };
    let ports: Vec<u16> = plan.ports.iter().copied().collect();
    let enforced = status.ruleset != RulesetStatus::NotEnforced;
    match (status.ruleset, abi) {
        (RulesetStatus::FullyEnforced, _) => tracing::info!(
            abi, read = plan.read.len(), read_write = plan.write.len(), tcp_bind = ?ports,
            "Landlock enforced on every thread tlsgate starts and, after start-up, on the main thread: files outside the configuration's paths, program execution and TCP binds to other ports are refused"
        ),
        (RulesetStatus::PartiallyEnforced, Some(abi)) => tracing::warn!(
            abi, not_enforced = %missing(abi),
            "Landlock PARTIALLY enforced: this kernel's Landlock is older than tlsgate's ruleset"
        ),
        _ => tracing::warn!(
            "Landlock NOT enforced: the kernel has no Landlock (or it is off; see /sys/kernel/security/lsm): file access and TCP binds are not restricted ([process] landlock = \"require\" makes this a start error)"
        ),
    }
    if !enforced {
        return Ok(None);
    }
    Ok(Some(Sandbox { ruleset }))
}

/// What an older Landlock ABI leaves out of the ruleset.
fn missing(abi: i32) -> String {
    let gaps = [
        (2, "renames and links across directories (refused outright)"),
        (3, "truncation"),
        (4, "TCP binds"),
        (5, "ioctl on devices"),
    ];
    let list: Vec<&str> = gaps
        .iter()
        .filter(|(since, _)| abi < *since)
        .map(|(_, what)| *what)
        .collect();
    list.join(", ")
}

/// Makes `sandbox` the one every later [`enter_thread`] applies.
pub fn publish(sandbox: Sandbox) {
    let _ = SANDBOX.set(sandbox);
}

/// Restricts the calling thread with the published ruleset, once (nothing when none is
/// published). A thread that cannot restrict itself never runs unrestricted: the error is the
/// answer, and [`enter_thread`] ends the process on it.
pub fn try_enter_thread(thread: &str) -> Result<()> {
    if ENTERED.with(Cell::get) {
        return Ok(());
    }
    if let Some(sandbox) = SANDBOX.get() {
        let copy = sandbox
            .ruleset
            .try_clone()
            .with_context(|| format!("landlock: {thread}: cannot copy the ruleset"))?;
        copy.restrict_self()
            .with_context(|| format!("landlock: {thread}: cannot restrict itself"))?;
    }
    ENTERED.with(|e| e.set(true));
    #[cfg(debug_assertions)]
    test_probe(thread);
    Ok(())
}

/// [`try_enter_thread`] for threads that cannot hand an error back: the process ends.
pub fn enter_thread(thread: &str) {
    if let Err(e) = try_enter_thread(thread) {
        tracing::error!(error = %format!("{e:#}"), "a thread could not restrict itself with Landlock; stopping");
        std::process::abort();
    }
}

/// The data plane's hook: its threads restrict themselves with the published ruleset.
pub fn dataplane_hook() -> tlsgate_dataplane::ThreadStart {
    tlsgate_dataplane::ThreadStart(std::sync::Arc::new(|thread: &str| {
        try_enter_thread(thread).map_err(|e| format!("{e:#}"))
    }))
}

/// Debug builds only: with `TLSGATE_TEST_LANDLOCK_PROBE=PORT:PATH`, each thread that enters
/// tries to open PATH and to bind 127.0.0.1:PORT right after, and logs what happened.
#[cfg(debug_assertions)]
fn test_probe(thread: &str) {
    let Ok(spec) = std::env::var("TLSGATE_TEST_LANDLOCK_PROBE") else {
        return;
    };
    let Some((port, path)) = spec.split_once(':') else {
        return;
    };
    let outcome = |r: std::io::Result<()>| match r {
        Ok(()) => "allowed".to_owned(),
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => "denied (EACCES)".to_owned(),
        Err(e) => format!("failed ({e})"),
    };
    let open = outcome(std::fs::File::open(path).map(|_| ()));
    let bind =
        outcome(std::net::TcpListener::bind(("127.0.0.1", port.parse().unwrap_or(0))).map(|_| ()));
    tracing::info!(
        "landlock test probe: thread {thread}: open {path}: {open}; bind 127.0.0.1:{port}: {bind}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_reads_true_false_and_require() {
        #[derive(Deserialize)]
        struct P {
            landlock: Mode,
        }
        let m = |s: &str| toml::from_str::<P>(s).map(|p| p.landlock);
        assert_eq!(m("landlock = true").ok(), Some(Mode::BestEffort));
        assert_eq!(m("landlock = false").ok(), Some(Mode::Off));
        assert_eq!(m("landlock = \"require\"").ok(), Some(Mode::Require));
        assert!(m("landlock = \"yes\"").is_err());
    }

    #[test]
    fn older_abis_name_what_they_leave_out() {
        assert_eq!(missing(5), "");
        assert_eq!(missing(3), "TCP binds, ioctl on devices");
    }
}
