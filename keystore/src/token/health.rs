//! The token's health: a circuit breaker that takes a token out of service after `K`
//! consecutive device-level errors (at once for a failed probe or a structural failure), and a
//! background thread that brings it back.
//!
//! ```text
//!   healthy ──K device errors──► unhealthy ──back-off──► recovering ──attempt ok──► healthy
//!   (closed)  in a row           (open: work fails fast,  (half-open:        │
//!      ▲      (a success          TokenUnavailable)  ▲     one attempt)      │
//!      │       resets the count)                     └── attempt failed ─────┘
//!      └──────────────────────────────────────────────── (back-off ×2, ≤ 1 s)
//! ```
//!
//! Each attempt drops every session, finds the slot again by label/serial, opens a session and
//! logs in, and looks every key in use up again (handles change). An attempt that fails that way
//! re-initialises the module (`C_Finalize` + `C_Initialize`) and tries once more. Back-off
//! doubles from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`], so a device that is back is in service again
//! within about a second plus one attempt.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Weak;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Token;

/// Wait before the first recovery attempt after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two recovery attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Failed recovery attempts are summed into one log line per this interval.
const ATTEMPT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Failed signatures are summed into one log line per this interval.
pub(super) const SIGN_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Default number of consecutive device-level errors that open the breaker (take the token out
/// of service). A success in between starts the count again.
pub const DEFAULT_BREAKER_ERRORS: u32 = 5;

/// Where a token stands. In breaker terms: `Healthy` is closed, `Unhealthy` open (between
/// recovery attempts), `Recovering` half-open (an attempt is running).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsmState {
    /// In service (breaker closed).
    Healthy,
    /// Out of service after device-level errors, waiting for the next recovery attempt
    /// (breaker open).
    Unhealthy,
    /// Out of service; a recovery attempt is running (breaker half-open).
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

    /// The breaker state as a number: 0 closed, 1 half-open, 2 open.
    pub fn breaker(self) -> u8 {
        match self {
            HsmState::Healthy => 0,
            HsmState::Recovering => 1,
            HsmState::Unhealthy => 2,
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
    /// Signatures refused at once because every token in service was at its in-flight budget
    /// for longer than the wait allowed (counted on the primary token).
    pub sign_shed: u64,
    /// Signatures on the token now (bounded by its in-flight budget).
    pub signing: u64,
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
    pub(super) sign_shed: AtomicU64,
    /// Signatures holding a permit of the in-flight budget now.
    pub(super) signing: AtomicU64,
    /// Device-level errors since the last success (the breaker opens at `breaker_errors`).
    consecutive: AtomicU32,
    /// K: consecutive device-level errors that open the breaker; 0 means the default.
    pub(super) breaker_errors: AtomicU32,
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
        self.cause
            .lock()
            .as_ref()
            .map(|(rv, since)| (rv.clone(), since.elapsed()))
    }

    /// A call on the token succeeded: the breaker's count of errors in a row starts again.
    pub(super) fn success(&self) {
        if self.consecutive.load(Relaxed) != 0 {
            self.consecutive.store(0, Relaxed);
        }
    }

    /// Counts a device-level error; the one that makes `breaker_errors` in a row opens the
    /// breaker (returns true like [`Health::fail`]).
    pub(super) fn device_error(&self, token: &str, function: &str, rv: &str) -> bool {
        let k = match self.breaker_errors.load(Relaxed) {
            0 => DEFAULT_BREAKER_ERRORS,
            k => k,
        };
        // A call that started before the breaker opened and failed after: it belongs to the
        // outage already counted, not to the next run of errors.
        if self.state() != HsmState::Healthy {
            return false;
        }
        let n = self.consecutive.fetch_add(1, Relaxed).saturating_add(1);
        if n < k {
            tracing::debug!(
                token,
                function,
                error = rv,
                in_a_row = n,
                breaker_errors = k,
                "device-level error; the breaker stays closed"
            );
            return false;
        }
        self.fail(
            token,
            function,
            &format!("{rv} ({n} device errors in a row)"),
        )
    }

    /// Takes the token out of service (opens the breaker). Returns true for the caller that
    /// made the change, which then starts recovery; later failures while it is out change
    /// nothing.
    pub(super) fn fail(&self, token: &str, function: &str, rv: &str) -> bool {
        if self.state.compare_exchange(0, 1, Relaxed, Relaxed).is_err() {
            return false;
        }
        self.consecutive.store(0, Relaxed);
        *self.cause.lock() = Some((rv.to_owned(), Instant::now()));
        tracing::warn!(
            token,
            function,
            error = rv,
            from = "healthy",
            to = "unhealthy",
            breaker = "open",
            "HSM out of service; new work on it fails at once until it is back"
        );
        true
    }

    /// Counts a failed signature; returns how many failed since the last line (this one
    /// included) when a line is due, at most once per [`SIGN_LOG_INTERVAL`].
    pub(super) fn sign_failure_line(&self) -> Option<u64> {
        let mut log = self.sign_log.lock();
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
            sign_shed: self.sign_shed.load(Relaxed),
            signing: self.signing.load(Relaxed),
            recoveries: self.recoveries.load(Relaxed),
            reinitialisations: self.reinitialisations.load(Relaxed),
            last_error: self.cause.lock().as_ref().map(|(rv, _)| rv.clone()),
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
        // Half-open for the attempt; open again (below) while the next back-off runs.
        health.state.store(2, Relaxed);
        if attempts == 0 {
            let cause = health.cause().map(|(rv, _)| rv).unwrap_or_default();
            tracing::info!(
                token = %t.label, error = %cause, from = "unhealthy", to = "recovering",
                breaker = "half-open",
                "HSM recovery started (later attempts go open → half-open without a line each)"
            );
        }
        attempts += 1;
        match t.try_recover() {
            Ok(keys) => {
                let (cause, down) = health.cause().unwrap_or_default();
                *health.cause.lock() = None;
                health.recoveries.fetch_add(1, Relaxed);
                health.state.store(0, Relaxed);
                tracing::info!(
                    token = %t.label, error = %cause, from = "recovering", to = "healthy",
                    breaker = "closed", attempts, keys, down_ms = down.as_millis() as u64,
                    "HSM back in service"
                );
                return;
            }
            Err(e @ (crate::Error::PinIncorrect { .. } | crate::Error::PinLocked { .. })) => {
                health.state.store(1, Relaxed);
                // Trying again could lock the PIN: stay out of service and say why.
                tracing::error!(
                    token = %t.label, error = %e,
                    "HSM recovery stopped: the token refuses the PIN; restart with the right one"
                );
                return;
            }
            Err(e) => {
                health.state.store(1, Relaxed);
                failed_since_log += 1;
                if last_log.elapsed() >= ATTEMPT_LOG_INTERVAL || attempts == 1 {
                    tracing::warn!(
                        token = %t.label, attempts = failed_since_log, last_error = %e,
                        from = "recovering", to = "unhealthy", breaker = "open",
                        "HSM still out of service (half-open attempt failed; one line per 10 s)"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_at_k_errors_in_a_row_and_a_success_starts_again() {
        let h = Health::default();
        h.breaker_errors.store(3, Relaxed);
        assert!(!h.device_error("t", "C_Sign", "CKR_DEVICE_ERROR"));
        assert!(!h.device_error("t", "C_Sign", "CKR_DEVICE_ERROR"));
        h.success();
        assert!(!h.device_error("t", "C_Sign", "CKR_DEVICE_ERROR"));
        assert!(!h.device_error("t", "C_Sign", "CKR_DEVICE_ERROR"));
        assert_eq!(h.state(), HsmState::Healthy);
        assert!(h.device_error("t", "C_Sign", "CKR_DEVICE_ERROR"));
        assert_eq!(h.state(), HsmState::Unhealthy);
        assert_eq!(h.state().breaker(), 2);
        // Errors of calls already under way when it opened count for nothing.
        assert!(!h.device_error("t", "C_Sign", "CKR_DEVICE_ERROR"));
        assert_eq!(h.consecutive.load(Relaxed), 0);
    }

    #[test]
    fn the_default_breaker_needs_five() {
        let h = Health::default();
        for _ in 1..DEFAULT_BREAKER_ERRORS {
            assert!(!h.device_error("t", "C_Sign", "CKR_DEVICE_ERROR"));
        }
        assert!(h.device_error("t", "C_Sign", "CKR_DEVICE_ERROR"));
    }
}
