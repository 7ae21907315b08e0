//! The switch to `[process] user` / `group` after start-up (see [`crate::hardening`] for the
//! order of things).
//!
//! The switch goes through the C library's `setgroups`/`setgid`/`setuid`, which change the
//! credentials of **every thread** of the process (glibc signals each thread to make the
//! syscall itself; the kernel keeps credentials per thread). The data plane's threads, the
//! key-op pool and any thread the PKCS#11 module started all exist by then. Afterwards every
//! task in `/proc/self/task` is checked: a thread left with another uid is a start error.
//!
//! When all of a thread's uids leave 0 the kernel clears its permitted and effective
//! capabilities; with `keep_net_bind_service` the calling thread keeps its permitted set across
//! the switch (`PR_SET_KEEPCAPS`) and then narrows it to `CAP_NET_BIND_SERVICE`.
//!
//! Ownership: what the process writes after the switch must belong to the user. The state
//! directory must be the user's: a missing one is created for them; one owned by anyone else
//! is a start error that says how to fix it (`chown -R`), since a wrong `user` must not take a
//! directory away from its owner. What tlsgate itself makes inside it as root before the switch
//! (the lock file, subdirectories, a default audit log) it then gives to the user. An audit log
//! elsewhere is opened before the switch and appended to through that descriptor. Files read
//! later (the configuration and certificate
//! files on SIGHUP, CRL files, the PIN file when the token is reopened, the PKCS#11 module's
//! token files, e.g. SoftHSM2's `directories.tokendir`) must be readable by the user.

use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::unistd::{Gid, Group, Uid, User};
use rustix::thread::{CapabilitySet, CapabilitySets};

/// The user and group to switch to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Looks `user` and `group` up (names, or numeric ids).
pub fn resolve(user: &str, group: Option<&str>) -> Result<Target> {
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    }
    .with_context(|| format!("[process] user: cannot look up {user:?}"))?;
    let (uid, primary) = match (found, user.parse::<u32>()) {
        (Some(u), _) => (u.uid.as_raw(), Some(u.gid.as_raw())),
        (None, Ok(uid)) => (uid, None),
        (None, Err(_)) => bail!("[process] user: no user named {user:?}"),
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .with_context(|| format!("[process] group: cannot look up {g:?}"))?
                .with_context(|| format!("[process] group: no group named {g:?}"))?
                .gid
                .as_raw(),
        },
        None => primary.with_context(|| {
            format!("[process] user = {user:?} has no passwd entry: set [process] group too")
        })?,
    };
    if uid == 0 {
        bail!("[process] user = {user:?} is root: name an unprivileged user");
    }
    if gid == 0 {
        bail!("[process] group is root's (gid 0): name an unprivileged group");
    }
    Ok(Target {
        name: user.to_owned(),
        uid,
        gid,
    })
}

/// Empties the capability bounding set (keeping `CAP_NET_BIND_SERVICE` when `keep_bind`),
/// when this process may (it holds `CAP_SETPCAP`); otherwise there is nothing it could gain.
pub fn empty_bounding_set(keep_bind: bool) -> Result<()> {
    let effective = rustix::thread::capabilities(None)
        .context("capget")?
        .effective;
    if !effective.contains(CapabilitySet::SETPCAP) {
        return Ok(());
    }
    for cap in CapabilitySet::all().iter() {
        if keep_bind && cap == CapabilitySet::NET_BIND_SERVICE {
            continue;
        }
        if rustix::thread::capability_is_in_bounding_set(cap).unwrap_or(false) {
            rustix::thread::remove_capability_from_bounding_set(cap)
                .with_context(|| format!("cannot drop {cap:?} from the bounding set"))?;
        }
    }
    Ok(())
}

/// The state directory before the switch: created for `target` when missing; refused, with
/// the fix in the message, when it exists and belongs to someone else.
pub fn prepare_state_dir(dir: &Path, target: &Target) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("[state] dir: cannot create {}", dir.display()))?;
        std::os::unix::fs::chown(dir, Some(target.uid), Some(target.gid)).with_context(|| {
            format!(
                "[state] dir: cannot give {} to uid {}",
                dir.display(),
                target.uid
            )
        })?;
    }
    let owner = std::fs::metadata(dir)
        .with_context(|| format!("[state] dir: cannot inspect {}", dir.display()))?
        .uid();
    if owner != target.uid {
        bail!(
            "[process] user = {:?} (uid {}) must own the state directory {}, which belongs to \
             uid {owner}: run `chown -R {}:{} {}` (tlsgate does not take a directory from \
             another owner)",
            target.name,
            target.uid,
            dir.display(),
            target.uid,
            target.gid,
            dir.display()
        );
    }
    Ok(())
}

/// Gives everything under the state directory (the user's, see [`prepare_state_dir`]) to
/// `target`: the lock file, subdirectories and the audit log tlsgate made there as root.
pub fn chown_tree(dir: &Path, target: &Target) -> Result<()> {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(path) = todo.pop() {
        std::os::unix::fs::lchown(&path, Some(target.uid), Some(target.gid))
            .with_context(|| format!("cannot give {} to uid {}", path.display(), target.uid))?;
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot inspect {}", path.display()))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)
                .with_context(|| format!("cannot list {}", path.display()))?
            {
                todo.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Switches every thread to `target`, keeping no capability (or only `CAP_NET_BIND_SERVICE` on
/// this thread when `keep_bind`), and checks the result.
pub fn drop_to(target: &Target, keep_bind: bool) -> Result<()> {
    if rustix::process::geteuid().as_raw() == target.uid
        && rustix::process::getuid().as_raw() == target.uid
    {
        tracing::info!(user = %target.name, uid = target.uid, "already running as [process] user");
        return Ok(());
    }
    if keep_bind {
        rustix::thread::set_keep_capabilities(true).context("PR_SET_KEEPCAPS")?;
    }
    let gid = Gid::from_raw(target.gid);
    nix::unistd::setgroups(&[gid]).context("setgroups")?;
    nix::unistd::setgid(gid).context("setgid")?;
    nix::unistd::setuid(Uid::from_raw(target.uid)).context("setuid")?;
    if keep_bind {
        rustix::thread::set_keep_capabilities(false).context("PR_SET_KEEPCAPS")?;
        let bind = CapabilitySet::NET_BIND_SERVICE;
        rustix::thread::set_capabilities(
            None,
            CapabilitySets {
                effective: bind,
                permitted: bind,
                inheritable: CapabilitySet::empty(),
            },
        )
        .context("cannot keep CAP_NET_BIND_SERVICE")?;
    }
    // No way back: root's uid must be out of reach now. Asked of this thread alone (the raw
    // call): glibc's `setuid` would have every thread try, and the cores' seccomp filter ends
    // the process on any credential call but their share of the switch above. The other
    // threads' credentials are checked below.
    if rustix::thread::set_thread_uid(rustix::process::Uid::ROOT).is_ok() {
        bail!(
            "after the switch to uid {} setuid(0) still succeeds",
            target.uid
        );
    }
    verify_all_threads(target)
}

/// Every task of the process runs with `target`'s uid and gid (real, effective, saved, fs).
fn verify_all_threads(target: &Target) -> Result<()> {
    let tasks = std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")?;
    for task in tasks {
        let path = task?.path().join("status");
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue; // the thread ended meanwhile
        };
        for (key, want) in [("Uid:", target.uid), ("Gid:", target.gid)] {
            let ids: Vec<u32> = status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            if ids.len() != 4 || ids.iter().any(|&id| id != want) {
                bail!(
                    "after the switch to {}:{} the thread {} still has {key} {ids:?}",
                    target.uid,
                    target.gid,
                    path.display()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve_and_root_is_refused() {
        let nobody = resolve("nobody", None).expect("Debian's base system has nobody");
        assert_eq!(nobody.uid, 65534);
        assert_eq!(resolve("65534", Some("65534")).expect("numeric").uid, 65534);
        assert!(resolve("root", None).is_err());
        assert!(resolve("nobody", Some("root")).is_err());
        assert!(resolve("no-such-user-here", None).is_err());
    }
}
