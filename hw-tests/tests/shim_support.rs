//! Shared set-up for the PKCS#11 fault-injection shim tests, included by each `shim_*.rs` test
//! file with `#[path]`. Compiled on its own it is an empty test binary.
//!
//! A PKCS#11 module is initialised once per process and the shim's faults are process-wide, so
//! each test file gets one token, one control file and one log for its whole process, and its
//! tests take turns through [`Lab::lock`].
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use anyhow::{bail, ensure, Context as _, Result};

/// The token every shim test process creates.
pub const LABEL: &str = "shim";
pub const USER_PIN: &str = "5678";
const SO_PIN: &str = "1234";

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

/// One SoftHSM2 token, one control file and one shim log for this test process.
#[derive(Debug)]
pub struct Lab {
    /// Holds the token directory, the SoftHSM2 configuration, the control file and the log.
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
    /// (every caller in one process must pass the same), and this test's turn.
    pub fn lock(env_faults: &str) -> Result<Turn> {
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
        Ok(Turn { lab, _turn: turn })
    }

    fn create(env_faults: &str) -> Result<Lab> {
        let shim = shim_path()?;
        let softhsm = PathBuf::from(
            std::env::var("TLSGATE_SHIM_MODULE")
                .unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".to_owned()),
        );
        ensure!(
            softhsm.is_file(),
            "SoftHSM2 module {} is missing",
            softhsm.display()
        );
        // Under the target directory (never the source tree); one per process.
        let dir = tempfile::Builder::new()
            .prefix("shim-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .context("creating the lab directory")?;
        let tokens = dir.path().join("tokens");
        fs::create_dir(&tokens)?;
        let conf = dir.path().join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )?;
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", LABEL])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .output()
            .context("running softhsm2-util (Debian package softhsm2)")?;
        ensure!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let control = dir.path().join("faults");
        let log = dir.path().join("shim.log");
        // Before any C_Initialize in this process: SoftHSM2 and the shim read these once.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var("TLSGATE_SHIM_CONTROL", &control);
        std::env::set_var("TLSGATE_SHIM_LOG", &log);
        std::env::set_var("TLSGATE_SHIM_MODULE", &softhsm);
        if env_faults.is_empty() {
            std::env::remove_var("TLSGATE_SHIM_FAULTS");
        } else {
            std::env::set_var("TLSGATE_SHIM_FAULTS", env_faults);
        }
        Ok(Lab {
            dir,
            shim,
            control,
            log,
            softhsm,
        })
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
