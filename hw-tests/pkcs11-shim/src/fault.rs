//! The live fault configuration: directives from the environment and from the control file, the
//! decision for each call, and the log that tests read.
//!
//! Everything here is process-wide because a PKCS#11 module is: every session of every thread
//! goes through the same function list.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::Duration;

use cryptoki_sys::CK_RV;

use crate::directive::{self, Action, Directive};
use crate::rv;

/// Names the control file, re-read whenever it changes.
pub const CONTROL_ENV: &str = "TLSGATE_SHIM_CONTROL";
/// Holds directives read once at start-up.
pub const FAULTS_ENV: &str = "TLSGATE_SHIM_FAULTS";
/// Names a file the shim appends its messages to.
pub const LOG_ENV: &str = "TLSGATE_SHIM_LOG";
/// When `1`, every call is written to the log with its running count.
pub const LOG_CALLS_ENV: &str = "TLSGATE_SHIM_LOG_CALLS";

/// How often a hung call looks again at the control file. Short enough that a test clearing a
/// hang sees the call finish at once, long enough to cost nothing while it waits.
const HANG_POLL: Duration = Duration::from_millis(10);

/// What a control file looked like when it was last read. A rename over it changes the inode, an
/// in-place rewrite the size or mtime; comparing all of them makes a missed change unlikely even
/// when two writes land within one mtime tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

#[derive(Debug)]
struct State {
    from_env: Vec<Directive>,
    from_file: Vec<Directive>,
    /// `None` while the file is absent (or no file is configured): no file directives.
    file_seen: Option<Fingerprint>,
    /// Messages already reported, so a bad line is reported once, not on every call.
    reported: HashSet<String>,
}

/// The process-wide fault configuration.
#[derive(Debug)]
pub struct Faults {
    /// The function names a directive may use (the forwarding layer's list).
    lookup: Lookup,
    control: Option<PathBuf>,
    log: Option<PathBuf>,
    log_calls: bool,
    state: Mutex<State>,
}

/// What to do with one call, decided before forwarding it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Decision {
    delay: Duration,
    fail: Option<CK_RV>,
}

/// Maps a function name in a directive to its `'static` spelling, if the shim forwards it.
pub type Lookup = fn(&str) -> Option<&'static str>;

impl Faults {
    /// The configuration of this process, read from the environment on first use; `lookup`
    /// names the functions directives may use (the same for every caller).
    pub fn get(lookup: Lookup) -> &'static Faults {
        static FAULTS: OnceLock<Faults> = OnceLock::new();
        FAULTS.get_or_init(|| Faults::from_env(lookup))
    }

    fn from_env(lookup: Lookup) -> Faults {
        let path = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let faults = Faults {
            lookup,
            control: path(CONTROL_ENV),
            log: path(LOG_ENV),
            log_calls: std::env::var(LOG_CALLS_ENV).is_ok_and(|v| v == "1"),
            state: Mutex::new(State {
                from_env: Vec::new(),
                from_file: Vec::new(),
                file_seen: None,
                reported: HashSet::new(),
            }),
        };
        if let Ok(text) = std::env::var(FAULTS_ENV) {
            let (directives, errors) = directive::parse(&text, lookup);
            let mut state = faults.lock();
            for error in errors {
                faults.report_once(
                    &mut state,
                    &format!("ignored directive in {FAULTS_ENV}: {error}"),
                );
            }
            state.from_env = directives;
        }
        faults
    }

    /// Runs one PKCS#11 call under the configured faults: counts it, hangs it, delays it, or fails
    /// it (calling `on_fail` first, so that the wrapper can end an operation the real module
    /// still holds open) instead of calling `forward`.
    ///
    /// `counted` is false for the size-query half of a two-call function: such a call may fail but
    /// is never delayed, so that one signature costs one delay.
    pub fn run(
        &self,
        function: &'static str,
        calls: &AtomicU64,
        counted: bool,
        forward: impl FnOnce() -> CK_RV,
        on_fail: impl FnOnce(),
    ) -> CK_RV {
        let call = calls.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if self.log_calls {
            self.log(&format!("{function} call {call}"));
        }
        // One look at the control file for the common case (no hang): a stat and a lock.
        let settled = {
            let mut state = self.refreshed();
            if hang_fires(&mut state, function, counted) {
                None
            } else {
                Some(decide(&mut state, function, counted))
            }
        };
        let decision = match settled {
            Some(decision) => decision,
            None => {
                self.log(&format!("{function} hung"));
                while self.still_hung(function) {
                    thread::sleep(HANG_POLL);
                }
                self.log(&format!("{function} released"));
                decide(&mut self.refreshed(), function, counted)
            }
        };
        if !decision.delay.is_zero() {
            thread::sleep(decision.delay);
            self.log(&format!(
                "{function} delayed {}",
                directive::format_duration(decision.delay)
            ));
        }
        match decision.fail {
            Some(code) => {
                on_fail();
                self.log(&format!("{function} failed {}", rv::name(code)));
                code
            }
            None => forward(),
        }
    }

    fn still_hung(&self, function: &'static str) -> bool {
        let mut state = self.refreshed();
        let hung = matching(&mut state, function).any(|d| d.action == Action::Hang);
        hung
    }

    /// The state, after taking in any change to the control file.
    fn refreshed(&self) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        let Some(path) = &self.control else {
            return state;
        };
        let now = fs::metadata(path).ok().map(|m| Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        });
        if now == state.file_seen {
            return state;
        }
        state.file_seen = now;
        // A file that vanished, or cannot be read, holds no faults: deleting it clears them.
        let text = now
            .and_then(|_| fs::read_to_string(path).ok())
            .unwrap_or_default();
        let (directives, errors) = directive::parse(&text, self.lookup);
        for error in errors {
            let message = format!("ignored directive in {}: {error}", path.display());
            self.report_once(&mut state, &message);
        }
        state.from_file = directives;
        state
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked (every update is one assignment),
        // and a poisoned lock must not turn into a panic across the FFI boundary.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn report_once(&self, state: &mut State, message: &str) {
        if state.reported.insert(message.to_owned()) {
            self.report(message);
        }
    }

    /// A message for people (stderr) and for tests (the log file).
    pub fn report(&self, message: &str) {
        eprintln!("tlsgate-pkcs11-shim: {message}");
        self.log(message);
    }

    fn log(&self, line: &str) {
        let Some(path) = &self.log else {
            return;
        };
        // One write per line on an O_APPEND file keeps lines from several threads whole. A log
        // that cannot be written is not worth failing a PKCS#11 call over.
        if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(path) {
            let _ = file.write_all(format!("{line}\n").as_bytes());
        }
    }
}

fn matching<'a>(
    state: &'a mut State,
    function: &'static str,
) -> impl Iterator<Item = &'a mut Directive> {
    state
        .from_env
        .iter_mut()
        .chain(state.from_file.iter_mut())
        .filter(move |d| d.function == function)
}

/// Whether a hang directive acts on this call. Every hang directive sees the call, so that each
/// keeps its own count.
fn hang_fires(state: &mut State, function: &'static str, counted: bool) -> bool {
    let mut hang = false;
    for d in matching(state, function) {
        if d.action == Action::Hang && d.fires(counted) {
            hang = true;
        }
    }
    hang
}

/// The delay and failure for a call, from every delay and fail directive that names it.
fn decide(state: &mut State, function: &'static str, counted: bool) -> Decision {
    let mut decision = Decision::default();
    for d in matching(state, function) {
        match d.action {
            Action::Delay(amount) => {
                if counted && d.fires(true) {
                    decision.delay = decision.delay.saturating_add(amount);
                }
            }
            Action::Fail(code) => {
                if d.fires(counted) {
                    decision.fail.get_or_insert(code);
                }
            }
            Action::Hang => {}
        }
    }
    decision
}
