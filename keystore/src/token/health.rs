//! The token's health: a state machine that takes a module out of service on a device-level
//! error, and a background thread that brings it back.
//!
//! ```text
//!   healthy ──device-level error──► unhealthy ──first attempt──► recovering ──attempt ok──► healthy
//!      ▲                               (work fails fast:              │  ▲
//!      │                                TokenUnavailable)             └──┘ attempt failed:
//!      └────────────────────────────────────────────────────────────────  back-off, try again
//! ```
//!
//! Each attempt drops every session, finds the slot again by label/serial, opens a session and
//! logs in, and looks every key in use up again (handles change). An attempt that fails that way
//! re-initialises the module (`C_Finalize` + `C_Initialize`) and tries once more. Back-off
//! doubles from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`], so a device that is back is in service again
//! within about a second plus one attempt.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use super::{lock, Token};

/// Wait before the first recovery attempt after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two recovery attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Failed recovery attempts are summed into one log line per this interval.
const ATTEMPT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Failed signatures are summed into one log line per this interval.
pub(super) const SIGN_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Where a token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsmState {
    /// In service.
    Healthy,
    /// Out of service after a device-level error; recovery is about to start.
    Unhealthy,
    /// Out of service; the background thread is trying to bring it back.
    Recovering,
}

impl HsmState {
    pub fn as_str(self) -> &'static str {
        match self {
            HsmState::Healthy => "healthy",
            HsmState::Unhealthy => "unhealthy",
            HsmState::Recovering => "recovering",
        }
    }

    fn from_u8(v: u8) -> HsmState {
        match v {
            0 => HsmState::Healthy,
            1 => HsmState::Unhealthy,
            _ => HsmState::Recovering,
        }
    }
}

/// Counters and state of one token, read by the metrics exporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub state: HsmState,
    /// PKCS#11 calls on the token now (management and signing).
    pub inflight: u64,
    /// Signatures the token made.
    pub sign_ok: u64,
    /// Signatures the token refused or failed.
    pub sign_error: u64,
    /// Signatures refused at once because the token was out of service.
    pub sign_unavailable: u64,
    /// Times the token came back after being out of service.
    pub recoveries: u64,
    /// Times the module was re-initialised (`C_Finalize` + `C_Initialize`).
    pub reinitialisations: u64,
    /// The CKR name that took the token out of service most recently.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct Health {
    state: AtomicU8,
    pub(super) inflight: AtomicU64,
    pub(super) sign_ok: AtomicU64,
    pub(super) sign_error: AtomicU64,
    pub(super) sign_unavailable: AtomicU64,
    recoveries: AtomicU64,
    pub(super) reinitialisations: AtomicU64,
    cause: Mutex<Option<(String, Instant)>>,
    /// When the last failed-signature line was written, and failures counted since.
    sign_log: Mutex<(Option<Instant>, u64)>,
}

impl Health {
    pub(super) fn state(&self) -> HsmState {
        HsmState::from_u8(self.state.load(Relaxed))
    }

    /// The CKR name and how long ago it took the token out, while it is out.
    pub(super) fn cause(&self) -> Option<(String, Duration)> {
        lock(&self.cause)
            .as_ref()
            .map(|(rv, since)| (rv.clone(), since.elapsed()))
    }

    /// Takes the token out of service. Returns true for the caller that made the change, which
    /// then starts recovery; later failures while it is out change nothing.
    pub(super) fn fail(&self, token: &str, function: &str, rv: &str) -> bool {
        if self.state.compare_exchange(0, 1, Relaxed, Relaxed).is_err() {
            return false;
        }
        *lock(&self.cause) = Some((rv.to_owned(), Instant::now()));
        tracing::warn!(
            token,
            function,
            error = rv,
            from = "healthy",
            to = "unhealthy",
            "HSM out of service; new work on it fails at once until it is back"
        );
        true
    }

    /// Counts a failed signature; returns how many failed since the last line (this one
    /// included) when a line is due, at most once per [`SIGN_LOG_INTERVAL`].
    pub(super) fn sign_failure_line(&self) -> Option<u64> {
        let mut log = lock(&self.sign_log);
        log.1 += 1;
        let now = Instant::now();
        if log
            .0
            .is_none_or(|t| now.duration_since(t) >= SIGN_LOG_INTERVAL)
        {
            let n = log.1;
            *log = (Some(now), 0);
            Some(n)
        } else {
            None
        }
    }

    pub(super) fn snapshot(&self) -> HealthSnapshot {
        HealthSnapshot {
            state: self.state(),
            inflight: self.inflight.load(Relaxed),
            sign_ok: self.sign_ok.load(Relaxed),
            sign_error: self.sign_error.load(Relaxed),
            sign_unavailable: self.sign_unavailable.load(Relaxed),
            recoveries: self.recoveries.load(Relaxed),
            reinitialisations: self.reinitialisations.load(Relaxed),
            last_error: lock(&self.cause).as_ref().map(|(rv, _)| rv.clone()),
        }
    }
}

/// Starts the recovery thread for `token` (called once per outage, by the caller that took the
/// token out of service).
pub(super) fn spawn_recovery(token: Weak<Token>, label: String) {
    let spawned = std::thread::Builder::new()
        .name(format!("tlsgate-hsm-recovery-{label}"))
        .spawn(move || recover(&token));
    if let Err(e) = spawned {
        // Without a thread nothing brings the token back; say so loudly, never panic.
        tracing::error!(token = %label, error = %e, "cannot start the HSM recovery thread");
    }
}

fn recover(token: &Weak<Token>) {
    let mut backoff = FIRST_BACKOFF;
    let mut attempts: u64 = 0;
    let mut failed_since_log: u64 = 0;
    let mut last_log = Instant::now();
    loop {
        std::thread::sleep(backoff);
        // The token was dropped (process ending, or a test done with it): nothing to recover.
        let Some(t) = token.upgrade() else { return };
        let health = &t.health;
        if attempts == 0 {
            health.state.store(2, Relaxed);
            let cause = health.cause().map(|(rv, _)| rv).unwrap_or_default();
            tracing::info!(
                token = %t.label, error = %cause, from = "unhealthy", to = "recovering",
                "HSM recovery started"
            );
        }
        attempts += 1;
        match t.try_recover() {
            Ok(keys) => {
                let (cause, down) = health.cause().unwrap_or_default();
                *lock(&health.cause) = None;
                health.recoveries.fetch_add(1, Relaxed);
                health.state.store(0, Relaxed);
                tracing::info!(
                    token = %t.label, error = %cause, from = "recovering", to = "healthy",
                    attempts, keys, down_ms = down.as_millis() as u64,
                    "HSM back in service"
                );
                return;
            }
            Err(e @ (crate::Error::PinIncorrect { .. } | crate::Error::PinLocked { .. })) => {
                // Trying again could lock the PIN: stay out of service and say why.
                tracing::error!(
                    token = %t.label, error = %e,
                    "HSM recovery stopped: the token refuses the PIN; restart with the right one"
                );
                return;
            }
            Err(e) => {
                failed_since_log += 1;
                if last_log.elapsed() >= ATTEMPT_LOG_INTERVAL || attempts == 1 {
                    tracing::warn!(
                        token = %t.label, attempts = failed_since_log, last_error = %e,
                        "HSM still out of service"
                    );
                    failed_since_log = 0;
                    last_log = Instant::now();
                }
            }
        }
        drop(t);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
