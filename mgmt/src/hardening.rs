//! Process hardening at start-up, before the token is opened: the serving process cannot be
//! dumped or traced by its own user and writes no core file, so a crash or a `gcore` by a
//! process of the same uid cannot copy the PIN or an imported key out of it.
//!
//! ```toml
//! [process]
//! danger_allow_core_dumps = false   # true: dumpable, core size limit left as it is (debugging)
//! ```
//!
//! Secrets themselves live on pages that are out of core dumps and locked in memory
//! (`tlsgate_keystore::secret::SecretBuf`), so even a dump taken with this switch on, or by root,
//! holds no PIN or imported key.

use anyhow::{Context, Result};
use serde::Deserialize;

/// `[process]`.
#[derive(Debug, Clone, Default, Deserialize)]
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
}

/// Applies `[process]`: by default `PR_SET_DUMPABLE 0` and `RLIMIT_CORE 0`.
pub fn apply(config: &ProcessConfig) -> Result<()> {
    use rustix::process::{setrlimit, DumpableBehavior, Resource, Rlimit};
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
        apply(&ProcessConfig::default())?;
        assert!(!dumpable()?);
        let limit = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!((limit.current, limit.maximum), (Some(0), Some(0)));
        Ok(())
    }
}
