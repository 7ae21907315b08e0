//! systemd's readiness protocol for `Type=notify` units (`sd_notify(3)`, the `sd-notify` crate):
//! `READY=1` once the data plane listens and the management API is up, `RELOADING=1` /
//! `READY=1` around each reload, `STOPPING=1` when draining starts, and `WATCHDOG=1` only while
//! every data-plane core makes progress. Without `NOTIFY_SOCKET` (not started by systemd) every
//! call does nothing.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// The data plane listens and the management API answers.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// This process took the service over from the previous one (binary upgrade): it is the main
/// process from now on (`MAINPID=`, which needs `NotifyAccess=all`) and serves.
pub fn took_over() {
    send(&[
        NotifyState::MainPid(std::process::id()),
        NotifyState::Ready,
        NotifyState::Status("serving (upgraded)"),
    ]);
}

/// A reload starts (`MONOTONIC_USEC` lets systemd ≥ 253 match it to its own `ExecReload`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Draining starts: no new connections, open ones finish.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// The watchdog: pets systemd (`WATCHDOG=1`) at half its interval while every core's heartbeat
/// (a counter each core advances about once a second, `Dataplane::core_heartbeats`) moved within
/// the last [`Watchdog::stall_after`]; a core that stops making progress stops the petting, and
/// systemd restarts the service after `WatchdogSec`.
#[derive(Debug)]
pub struct Watchdog {
    every: Duration,
    stall_after: Duration,
    last_sent: Option<Instant>,
    /// Each core's last heartbeat value and when it last moved.
    cores: Vec<(u64, Instant)>,
    /// Whether the stall was logged already (once per stall).
    logged: bool,
}

impl Watchdog {
    /// From `WATCHDOG_USEC`/`WATCHDOG_PID` (set by systemd for `WatchdogSec=`); `None` when off.
    pub fn from_env() -> Option<Watchdog> {
        let mut usec = 0;
        if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
            return None;
        }
        Some(Watchdog::new(Duration::from_micros(usec)))
    }

    /// A watchdog with systemd's interval `interval`.
    pub fn new(interval: Duration) -> Watchdog {
        Watchdog {
            every: interval / 2,
            // Cores beat about once a second; allow three missed beats, but never more than the
            // interval itself (systemd would act first).
            stall_after: Duration::from_secs(3).min(interval),
            last_sent: None,
            cores: Vec::new(),
            logged: false,
        }
    }

    /// How long a core may go without a heartbeat before the petting stops.
    pub fn stall_after(&self) -> Duration {
        self.stall_after
    }

    /// Called about once a second with every core's heartbeat: pets systemd when due and every
    /// core is alive. Returns whether it sent `WATCHDOG=1`.
    pub fn tick(&mut self, heartbeats: &[u64], now: Instant) -> bool {
        match self.check(heartbeats, now) {
            Ok(()) => {
                self.logged = false;
                if self
                    .last_sent
                    .is_none_or(|t| now.duration_since(t) >= self.every)
                {
                    self.last_sent = Some(now);
                    send(&[NotifyState::Watchdog]);
                    return true;
                }
                false
            }
            Err((core, silent)) => {
                if !self.logged {
                    self.logged = true;
                    tracing::error!(
                        core,
                        silent_ms = silent.as_millis() as u64,
                        "data-plane core makes no progress; no longer petting the systemd watchdog (the service manager restarts the service)"
                    );
                }
                false
            }
        }
    }

    /// `Err((core, for how long))` for the first core whose heartbeat has not moved in
    /// `stall_after`.
    fn check(&mut self, heartbeats: &[u64], now: Instant) -> Result<(), (usize, Duration)> {
        if self.cores.len() != heartbeats.len() {
            self.cores = heartbeats.iter().map(|&b| (b, now)).collect();
        }
        let mut stalled = None;
        for (i, (&beat, (last, moved))) in heartbeats.iter().zip(self.cores.iter_mut()).enumerate()
        {
            if beat != *last {
                *last = beat;
                *moved = now;
            } else if stalled.is_none() && now.duration_since(*moved) > self.stall_after {
                stalled = Some((i, now.duration_since(*moved)));
            }
        }
        stalled.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pets_while_every_core_beats_and_stops_when_one_stalls() {
        let start = Instant::now();
        let mut w = Watchdog::new(Duration::from_secs(10));
        assert_eq!(w.stall_after(), Duration::from_secs(3));
        let s = |secs: u64| start + Duration::from_secs(secs);
        // First tick: due at once.
        assert!(w.tick(&[1, 1], s(0)));
        // Half the interval (5 s) between pets while both cores beat.
        assert!(!w.tick(&[2, 2], s(1)));
        assert!(!w.tick(&[3, 3], s(4)));
        assert!(w.tick(&[4, 4], s(5)));
        // Core 1 stops at beat 5 (last moved at 6 s); at 9 s it has been silent 3 s (not yet
        // more), at 10 s 4 s: no pet although one is due.
        assert!(!w.tick(&[5, 5], s(6)));
        assert!(!w.tick(&[6, 5], s(9)));
        assert!(!w.tick(&[7, 5], s(10)));
        assert!(!w.tick(&[8, 5], s(20)));
        // It comes back: petting resumes at once (overdue).
        assert!(w.tick(&[9, 6], s(21)));
    }

    #[test]
    fn a_short_interval_shortens_the_stall_limit() {
        let w = Watchdog::new(Duration::from_secs(2));
        assert_eq!(w.stall_after(), Duration::from_secs(2));
    }
}
