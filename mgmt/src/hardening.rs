//! Process hardening. Two steps:
//!
//! 1. [`apply`], first thing in `tlsgate serve`, before the PIN is read, any key reaches the
//!    process or any thread is started: not dumpable and no core file (a crash or a `gcore` by a
//!    process of the same uid cannot copy the PIN or an imported key out of it);
//!    `PR_SET_NO_NEW_PRIVS` (nothing it executes can gain a privilege); the capability bounding
//!    set emptied (only `CAP_NET_BIND_SERVICE` is left in it when `keep_net_bind_service`).
//!    Every thread started later inherits all three. A start as root without `[process] user`
//!    and without `allow_root` stops here.
//! 2. [`crate::privileges::drop_to`], once the listeners are bound, the state directory is
//!    locked and the audit log open, and the PKCS#11 module is loaded and logged in: the switch
//!    to `[process] user` / `group`.
//!
//! Between the two, the Landlock ruleset ([`crate::sandbox`]) is made before the first thread
//! starts; every thread restricts itself as it starts, the main thread after the switch.
//!
//! ```toml
//! [process]
//! user = "tlsgate"                  # drop to this user after start-up (needs a start as root)
//! group = "tlsgate"                 # default: the user's primary group
//! allow_root = false                # true: run on as root when no user is set
//! keep_net_bind_service = false     # true: keep CAP_NET_BIND_SERVICE after the drop
//! seccomp = true                    # syscall allowlist on the data plane's core threads
//! landlock = true                   # files and TCP binds limited to the configuration's
//!                                   # (false: off; "require": a start error without it)
//! landlock_paths = ["/var/lib/softhsm/tokens"]  # what the PKCS#11 module needs (read/write)
//! danger_allow_core_dumps = false   # true: dumpable, core size limit left as it is (debugging)
//! ```
//!
//! Secrets themselves live on pages that are out of core dumps and locked in memory
//! (`tlsgate_keystore::secret::SecretBuf`), so even a dump taken with this switch on, or by root,
//! holds no PIN or imported key.

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The environment variable that stands for `[process] allow_root = true` (for test harnesses
/// and containers that run everything as root with one shared configuration).
pub const ALLOW_ROOT_ENV: &str = "TLSGATE_ALLOW_ROOT";

/// `[process]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Leave the process dumpable and its core size limit as inherited. For debugging only: a
    /// core file holds everything in the process's memory that is not on a secret page.
    #[serde(default)]
    pub danger_allow_core_dumps: bool,
    /// When `[dataplane.limits] max_connections_per_core` (set in the file) needs more file
    /// descriptors than the process may open, lower it to fit with a warning instead of refusing
    /// to start (see [`crate::fdlimit`]). Default false.
    #[serde(default)]
    pub fit_connections_to_fd_limit: bool,
    /// The user (name or numeric uid) to run as after start-up. Needs a start as root (or as
    /// that user already, then nothing changes).
    #[serde(default)]
    pub user: Option<String>,
    /// The group (name or numeric gid); default the user's primary group. The supplementary
    /// groups are set to this one group alone.
    #[serde(default)]
    pub group: Option<String>,
    /// Run on as root when no `user` is set. Default false: a start as root without `user`
    /// is refused (`TLSGATE_ALLOW_ROOT=1` in the environment counts as true).
    #[serde(default)]
    pub allow_root: bool,
    /// Keep `CAP_NET_BIND_SERVICE` after the drop (permitted and effective on the thread that
    /// runs the management plane and the threads it starts later). Listeners bound at start-up
    /// need no capability after the drop. Default false: no capability at all.
    #[serde(default)]
    pub keep_net_bind_service: bool,
    /// The seccomp syscall allowlist on the data plane's core threads. Default true.
    #[serde(default = "yes")]
    pub seccomp: bool,
    /// Landlock after start-up (see [`crate::sandbox`]): `true` (default) enforces what the
    /// kernel supports and logs what it does not, `"require"` makes a kernel that cannot
    /// enforce all of it a start error, `false` turns it off.
    #[serde(default)]
    pub landlock: crate::sandbox::Mode,
    /// Files and directories the PKCS#11 module needs, read and write under Landlock.
    /// Default: for SoftHSM2, its configuration (`SOFTHSM2_CONF`) and its token directory.
    #[serde(default)]
    pub landlock_paths: Option<Vec<std::path::PathBuf>>,
}

fn yes() -> bool {
    true
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            danger_allow_core_dumps: false,
            fit_connections_to_fd_limit: false,
            user: None,
            group: None,
            allow_root: false,
            keep_net_bind_service: false,
            seccomp: true,
            landlock: crate::sandbox::Mode::BestEffort,
            landlock_paths: None,
        }
    }
}

impl ProcessConfig {
    /// Whether running on as root is allowed (the key, or the environment variable).
    pub fn root_allowed(&self) -> bool {
        self.allow_root
            || std::env::var(ALLOW_ROOT_ENV)
                .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
    }
}

/// Applies `[process]`'s first step (see the module docs).
pub fn apply(config: &ProcessConfig) -> Result<()> {
    use rustix::process::{setrlimit, DumpableBehavior, Resource, Rlimit};
    let euid = rustix::process::geteuid();
    if euid.is_root() && config.user.is_none() && !config.root_allowed() {
        bail!(
            "refusing to run as root: set [process] user = \"<an unprivileged user>\" (tlsgate \
             binds its listeners and opens the token as root, then switches to that user), or \
             [process] allow_root = true to run on as root"
        );
    }
    if let Some(user) = &config.user {
        // A start as that user already is fine (e.g. systemd's User=); anyone else cannot switch.
        let target = crate::privileges::resolve(user, config.group.as_deref())?;
        if !euid.is_root() && euid.as_raw() != target.uid {
            bail!(
                "[process] user = {user:?} (uid {}): switching needs a start as root; this process \
                 runs as uid {}",
                target.uid,
                euid.as_raw()
            );
        }
    }
    rustix::thread::set_no_new_privs(true).context("cannot set PR_SET_NO_NEW_PRIVS")?;
    crate::privileges::empty_bounding_set(config.keep_net_bind_service)?;
    if config.danger_allow_core_dumps {
        tracing::warn!("[process] danger_allow_core_dumps = true: this process can be dumped");
        return Ok(());
    }
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .context("cannot set RLIMIT_CORE to 0")?;
    rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .context("cannot make the process non-dumpable (PR_SET_DUMPABLE)")?;
    Ok(())
}

/// Whether the kernel would let this process be dumped (`PR_GET_DUMPABLE`).
pub fn dumpable() -> Result<bool> {
    Ok(rustix::process::dumpable_behavior()? != rustix::process::DumpableBehavior::NotDumpable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_makes_the_process_non_dumpable() -> Result<()> {
        let config = ProcessConfig {
            allow_root: true,
            ..ProcessConfig::default()
        };
        apply(&config)?;
        assert!(!dumpable()?);
        let limit = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!((limit.current, limit.maximum), (Some(0), Some(0)));
        assert!(rustix::thread::no_new_privs()?);
        Ok(())
    }

    #[test]
    fn documented_defaults() {
        let c: ProcessConfig = toml::from_str("").expect("empty [process]");
        assert!(c.seccomp && !c.allow_root && !c.keep_net_bind_service);
        assert!(c.user.is_none() && c.group.is_none());
        assert_eq!(c.landlock, crate::sandbox::Mode::BestEffort);
        assert!(c.landlock_paths.is_none());
    }
}
