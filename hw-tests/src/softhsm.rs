//! SoftHSM2 tokens for tests.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, in `C_Initialize`, and a module is initialised once per
//! process; tests in one binary share a process. So the first [`TestToken::new`] in a process
//! creates a process-wide token directory and configuration and sets `SOFTHSM2_CONF` before
//! anything loads the module; every token after that is a new token (unique label) in that
//! directory, deleted when its `TestToken` drops. Child processes that need a token of their own
//! use [`TestToken::new_isolated`], whose directory and configuration are private to it.
//!
//! In-process tokens are initialised through PKCS#11 (`C_InitToken` on the free slot, then
//! `C_InitPIN`), not with `softhsm2-util`: a SoftHSM2 that is already initialised in this process
//! does not see tokens another process adds to its directory. Isolated tokens, which only child
//! processes open, are made with `softhsm2-util`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, ensure, Context as _, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use std::sync::Mutex;
use tlsgate_keystore::{PinSource, Token, TokenSelector};

/// Debian's SoftHSM2 module; `TLSGATE_TEST_SOFTHSM2_MODULE` overrides it.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const SO_PIN: &str = "so-pin-1234";

/// The SoftHSM2 module path used by the harness.
pub fn module_path() -> PathBuf {
    std::env::var_os("TLSGATE_TEST_SOFTHSM2_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE))
}

/// Why SoftHSM2 tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !module_path().is_file() {
        return Some(format!(
            "SoftHSM2 module {} not found",
            module_path().display()
        ));
    }
    if Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("softhsm2-util not found on PATH".into());
    }
    None
}

struct ProcessDir {
    _dir: tempfile::TempDir,
    root: PathBuf,
    conf: PathBuf,
    tokens: PathBuf,
}

fn write_conf(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).with_context(|| format!("creating {}", tokens.display()))?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
             slots.removable = false\n",
            tokens.display()
        ),
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    Ok((conf, tokens))
}

fn process_dir() -> Result<&'static ProcessDir> {
    static DIR: OnceLock<std::result::Result<ProcessDir, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let make = || -> Result<ProcessDir> {
            remove_stale_process_dirs();
            let dir = tempfile::Builder::new()
                .prefix(&format!("{PROCESS_DIR_PREFIX}{}-", std::process::id()))
                .tempdir()
                .context("creating the SoftHSM2 token directory")?;
            let (conf, tokens) = write_conf(dir.path())?;
            // Must happen before any C_Initialize of SoftHSM2 in this process; this OnceLock
            // runs before the first token exists, and tokens are the only way tests get one.
            std::env::set_var("SOFTHSM2_CONF", &conf);
            let root = dir.path().to_owned();
            Ok(ProcessDir {
                _dir: dir,
                root,
                conf,
                tokens,
            })
        };
        make().map_err(|e| format!("{e:#}"))
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

const PROCESS_DIR_PREFIX: &str = "tlsgate-softhsm-";

/// The process-wide directory lives in a static and is never dropped; remove those left by
/// test processes that have exited, so runs do not accumulate directories.
fn remove_stale_process_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PROCESS_DIR_PREFIX))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// This process's SoftHSM2 context, for token initialisation.
fn context() -> Result<&'static Pkcs11> {
    static CTX: OnceLock<std::result::Result<Pkcs11, String>> = OnceLock::new();
    CTX.get_or_init(|| {
        let ctx = Pkcs11::new(module_path()).map_err(|e| e.to_string())?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
            Err(e) => Err(e.to_string()),
        }
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("loading SoftHSM2: {e}"))
}

/// Initialises a token on the free slot, in this process.
fn init_in_process(label: &str, pin: &str) -> Result<()> {
    // Two tests must not initialise the same free slot.
    static INIT: Mutex<()> = Mutex::new(());
    let _turn = INIT.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = context()?;
    let mut free = None;
    for slot in ctx.get_slots_with_token()? {
        if let Ok(info) = ctx.get_token_info(slot) {
            if !info.token_initialized() {
                free = Some(slot);
                break;
            }
        }
    }
    let slot = free.context("SoftHSM2 offers no free slot")?;
    let so_pin = AuthPin::from(SO_PIN);
    ctx.init_token(slot, &so_pin, label)
        .context("C_InitToken")?;
    let session = ctx.open_rw_session(slot).context("C_OpenSession")?;
    session
        .login(UserType::So, Some(&so_pin))
        .context("C_Login (SO)")?;
    session.init_pin(&AuthPin::from(pin)).context("C_InitPIN")?;
    session.logout().context("C_Logout")?;
    Ok(())
}

fn unique_label() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Labels are at most 32 bytes; pid + counter keeps parallel test binaries apart.
    format!(
        "t{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn random_pin() -> Result<String> {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| anyhow::anyhow!("random generator failed"))?;
    Ok(hex::encode(bytes))
}

fn softhsm2_util(conf: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("softhsm2-util")
        .args(args)
        .env("SOFTHSM2_CONF", conf)
        .output()
        .context("running softhsm2-util")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "softhsm2-util {} failed: {}{}",
        args.first().copied().unwrap_or_default(),
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// A fresh SoftHSM2 token, deleted on drop.
#[derive(Debug)]
pub struct TestToken {
    label: String,
    pin: String,
    conf: PathBuf,
    /// Holds the PIN file (and, for isolated tokens, the whole token directory).
    dir: tempfile::TempDir,
    isolated: bool,
}

impl TestToken {
    /// A new token in this process's SoftHSM2 directory.
    pub fn new() -> Result<TestToken> {
        if let Some(why) = unavailable() {
            bail!("{why}");
        }
        let shared = process_dir()?;
        // Inside the process directory, so a token held by a static (never dropped) is still
        // cleaned up with that directory by a later run.
        let dir = tempfile::Builder::new()
            .prefix("token-")
            .tempdir_in(&shared.root)?;
        TestToken::init(shared.conf.clone(), dir, false)
    }

    /// A new token in a directory and configuration of its own, for child processes (pass
    /// [`TestToken::env`] to them). Do not open it from this process: this process's SoftHSM2
    /// reads only the process-wide configuration.
    pub fn new_isolated() -> Result<TestToken> {
        if let Some(why) = unavailable() {
            bail!("{why}");
        }
        let dir = tempfile::Builder::new()
            .prefix("tlsgate-softhsm-iso-")
            .tempdir()?;
        let (conf, _) = write_conf(dir.path())?;
        TestToken::init(conf, dir, true)
    }

    fn init(conf: PathBuf, dir: tempfile::TempDir, isolated: bool) -> Result<TestToken> {
        let label = unique_label();
        let pin = random_pin()?;
        if isolated {
            softhsm2_util(
                &conf,
                &[
                    "--init-token",
                    "--free",
                    "--label",
                    &label,
                    "--so-pin",
                    SO_PIN,
                    "--pin",
                    &pin,
                ],
            )?;
        } else {
            init_in_process(&label, &pin)?;
        }
        let token = TestToken {
            label,
            pin,
            conf,
            dir,
            isolated,
        };
        let pin_file = token.pin_file();
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&pin_file)
                .with_context(|| format!("writing {}", pin_file.display()))?;
            writeln!(f, "{}", token.pin)?;
        }
        Ok(token)
    }

    pub fn module_path(&self) -> PathBuf {
        module_path()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The user PIN (tests of wrong PINs and child processes need it in clear).
    pub fn pin(&self) -> &str {
        &self.pin
    }

    fn pin_file(&self) -> PathBuf {
        self.dir.path().join("user.pin")
    }

    /// A `file:` PIN source: a 0600 file in this token's temporary directory.
    pub fn pin_source(&self) -> PinSource {
        PinSource::File(self.pin_file())
    }

    /// The SoftHSM2 configuration this token lives under.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// Environment for a child process that should see this token.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".into(), self.conf.display().to_string())]
    }

    /// Opens the token through the keystore (logged in).
    pub fn open(&self) -> Result<Arc<Token>> {
        ensure!(
            !self.isolated,
            "an isolated token is for child processes only"
        );
        Ok(Token::open(
            &self.module_path(),
            TokenSelector::Label(self.label.clone()),
            &self.pin_source(),
        )?)
    }
}

impl Drop for TestToken {
    fn drop(&mut self) {
        if self.isolated {
            return; // the whole directory goes with `dir`
        }
        if let Err(e) = softhsm2_util(&self.conf, &["--delete-token", "--token", &self.label]) {
            eprintln!("warning: could not delete test token {}: {e:#}", self.label);
        }
    }
}

/// The process-wide token directory (for tests that inspect what SoftHSM2 wrote).
pub fn process_token_dir() -> Result<PathBuf> {
    Ok(process_dir()?.tokens.clone())
}
