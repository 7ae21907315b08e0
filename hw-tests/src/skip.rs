//! One rule for tests that need a component of the machine (the SoftHSM2 module, `openssl`,
//! `gnutls-cli`, a scanner, io_uring, ...).
//!
//! - Under `CI=true` a missing component **fails** the test, naming the component: CI's green
//!   must mean that every test ran.
//! - Elsewhere the test is skipped: [`missing`] writes `SKIPPED: <test>: <reason>` straight to
//!   the process's stderr (past the test harness's output capture, so it shows in a passing
//!   run) and, when `TLSGATE_SKIP_LOG` names a file, appends the same line there.
//!   `scripts/test.sh` sets that variable and ends with the number of skips.
//!
//! `scripts/test.sh` installs every component these tests ask for, so on a machine it set up the
//! count is zero.
//!
//! ```no_run
//! # fn t() {
//! if let Some(why) = tlsgate_hw_tests::skip::tool_missing("gnutls-cli", "gnutls-bin") {
//!     tlsgate_hw_tests::skip::missing(why);
//!     return;
//! }
//! # }
//! ```

use std::fmt::Display;
use std::io::Write as _;
use std::path::Path;

/// The environment variable naming the file that collects skip lines.
pub const SKIP_LOG_ENV: &str = "TLSGATE_SKIP_LOG";

/// Whether this run is CI's (`CI=true`, or `CI=1`), where nothing may be skipped.
pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("true") | Ok("1")
    )
}

/// Records that the calling test cannot run for `reason`: panics (fails the test) under CI,
/// otherwise prints and logs `SKIPPED: <test>: <reason>`. The caller returns right after.
#[track_caller]
pub fn missing(reason: impl Display) {
    let test = test_name();
    if in_ci() {
        panic!("{test}: a component this test needs is missing (CI=true, no skips): {reason}");
    }
    let line = format!("SKIPPED: {test}: {reason}\n");
    // Straight to the file descriptor: `eprintln!` is captured by the test harness and shown
    // only for failing tests.
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// [`missing`] with the reason when `why` is `Some`; returns whether the test may go on.
#[track_caller]
pub fn unless(why: Option<String>) -> bool {
    match why {
        Some(why) => {
            missing(why);
            false
        }
        None => true,
    }
}

/// Why `program` cannot run here, if it cannot: not found on `PATH`. `package` names the
/// Debian package that ships it.
pub fn tool_missing(program: &str, package: &str) -> Option<String> {
    if on_path(program) {
        None
    } else {
        Some(format!(
            "`{program}` is not installed (Debian package {package}; scripts/test.sh installs it)"
        ))
    }
}

/// Whether an executable file named `program` is in a directory of `PATH` (or `program` is a
/// path to one).
pub fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return is_executable(Path::new(program));
    }
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(program)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Why io_uring cannot be used by this process, if it cannot: the kernel's
/// `kernel.io_uring_disabled` sysctl. (The data plane's own probe gives the finer reasons, such as
/// a seccomp filter; tests that start a data plane report those through [`missing`] too.)
pub fn io_uring_sysctl_off() -> Option<String> {
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(v) if v.trim() != "0" => Some(format!(
            "io_uring is off here (kernel.io_uring_disabled = {})",
            v.trim()
        )),
        _ => None,
    }
}

/// The running test's name: libtest names each test's thread after the test.
fn test_name() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(str::to_owned)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_program_that_exists_and_not_one_that_does_not() {
        assert!(on_path("sh"));
        assert!(tool_missing("sh", "dash").is_none());
        let why = tool_missing("tlsgate-no-such-program", "none").expect("missing");
        assert!(why.contains("tlsgate-no-such-program"), "{why}");
    }

    #[test]
    fn names_the_running_test() {
        assert_eq!(
            test_name(),
            "skip::tests::names_the_running_test",
            "libtest names the thread after the test"
        );
    }
}
