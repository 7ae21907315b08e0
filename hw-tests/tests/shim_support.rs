//! Shared set-up for the PKCS#11 fault-injection shim tests, included by each `shim_*.rs` test
//! file with `#[path]`. Compiled on its own it is an empty test binary.
//!
//! A PKCS#11 module is initialised once per process and the shim's faults are process-wide, so
//! each test file gets one token (the harness's [`TestToken`]), one control file and one log for
//! its whole process, and its tests take turns through [`Lab::lock`].
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use anyhow::{bail, Context as _, Result};
use tlsgate_hw_tests::softhsm;
use tlsgate_hw_tests::TestToken;

/// The shim's file name as cargo builds it.
const SHIM_FILE: &str = "libtlsgate_pkcs11_shim.so";

/// The shim cdylib from the same target directory and profile as this test binary.
pub fn shim_path() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test binary> → target/<profile>/
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not inside target/<profile>/deps")?;
    let shim = profile_dir.join(SHIM_FILE);
    if !shim.is_file() {
        bail!(
            "{} is missing: run `cargo build -p tlsgate-pkcs11-shim` (with the same profile) \
             before these tests",
            shim.display()
        );
    }
    Ok(shim)
}

/// A directory for this test process under the target directory (never the source tree). It
/// lives in a static and is never dropped, so those of processes that have exited are removed
/// first and runs do not pile them up.
pub fn process_dir(kind: &str) -> Result<tempfile::TempDir> {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let prefix = format!("{kind}-");
    if let Ok(entries) = fs::read_dir(root) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    tempfile::Builder::new()
        .prefix(&format!("{prefix}{}-", std::process::id()))
        .tempdir_in(root)
        .with_context(|| format!("creating a {kind} directory in {}", root.display()))
}

/// One SoftHSM2 token, one control file and one shim log for this test process.
#[derive(Debug)]
pub struct Lab {
    pub token: TestToken,
    /// Holds the control file and the log.
    pub dir: tempfile::TempDir,
    pub shim: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    /// The real module under the shim.
    pub softhsm: PathBuf,
}

/// What a test holds while it runs: the lab, and the turn. Dropping it clears the faults so a
/// failed test does not leave the next one hung or failing.
#[derive(Debug)]
pub struct Turn {
    pub lab: &'static Lab,
    _turn: MutexGuard<'static, ()>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let _ = self.lab.set_faults("");
    }
}

impl std::ops::Deref for Turn {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.lab
    }
}

impl Lab {
    /// The process's lab, created on first use with `env_faults` as `TLSGATE_SHIM_FAULTS`
    /// (every caller in one process must pass the same), and this test's turn; `None`, after
    /// saying why, where SoftHSM2 is not installed.
    pub fn lock(env_faults: &str) -> Result<Option<Turn>> {
        if let Some(why) = softhsm::unavailable() {
            tlsgate_hw_tests::skip::missing(why);
            return Ok(None);
        }
        static LAB: OnceLock<std::result::Result<Lab, String>> = OnceLock::new();
        static TURN: Mutex<()> = Mutex::new(());
        let lab = LAB
            .get_or_init(|| Lab::create(env_faults).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("shim lab set-up failed: {e}"))?;
        // A test that failed while holding the turn poisoned it; the Turn's drop already reset
        // the faults, so the next test may go on.
        let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        lab.set_faults("")?;
        Ok(Some(Turn { lab, _turn: turn }))
    }

    fn create(env_faults: &str) -> Result<Lab> {
        let shim = shim_path()?;
        // Sets SOFTHSM2_CONF for the process before anything initialises SoftHSM2.
        let token = TestToken::new()?;
        let softhsm = token.module_path();
        let dir = process_dir("shim-lab")?;
        let control = dir.path().join("faults");
        let log = dir.path().join("shim.log");
        // Before the shim's first call in this process: it reads these once.
        std::env::set_var("TLSGATE_SHIM_CONTROL", &control);
        std::env::set_var("TLSGATE_SHIM_LOG", &log);
        std::env::set_var("TLSGATE_SHIM_MODULE", &softhsm);
        if env_faults.is_empty() {
            std::env::remove_var("TLSGATE_SHIM_FAULTS");
        } else {
            std::env::set_var("TLSGATE_SHIM_FAULTS", env_faults);
        }
        Ok(Lab {
            token,
            dir,
            shim,
            control,
            log,
            softhsm,
        })
    }

    pub fn label(&self) -> &str {
        self.token.label()
    }

    pub fn pin(&self) -> &str {
        self.token.pin()
    }

    /// Replaces the control file in one rename, so the shim never reads half a file and always
    /// sees a new inode.
    pub fn set_faults(&self, text: &str) -> Result<()> {
        let staging = self.dir.path().join("faults.new");
        fs::write(&staging, text)?;
        fs::rename(&staging, &self.control)?;
        Ok(())
    }

    /// The log's length now: pass it to [`Lab::log_since`] to read what a step added.
    pub fn log_mark(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// The log lines appended after `mark`.
    pub fn log_since(&self, mark: u64) -> Vec<String> {
        let text = fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(mark).unwrap_or(usize::MAX).min(text.len());
        String::from_utf8_lossy(&text[start..])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}
