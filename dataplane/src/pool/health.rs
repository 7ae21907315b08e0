//! What is known of one backend server, shared by every core and the health checker.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

use super::Ejection;

/// The operator's say on a server (`tlsgate ctl backends set-state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// Takes new connections when healthy.
    Ready,
    /// No new connections; those open finish.
    Drain,
    /// Out of service for maintenance: no new connections (open ones still finish).
    Maint,
}

impl AdminState {
    /// The name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    /// Parses [`AdminState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ready" => Some(AdminState::Ready),
            "drain" => Some(AdminState::Drain),
            "maint" => Some(AdminState::Maint),
            _ => None,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }
}

/// A pool's active health check: plain data the data plane carries for whoever runs the checks
/// (`tlsgate serve` runs them off the io threads and reports through
/// [`ServerState::set_up`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What a check does.
    pub probe: Probe,
    /// Time between checks of a server.
    pub interval: std::time::Duration,
    /// A check that takes longer fails.
    pub timeout: std::time::Duration,
    /// Passes in a row that bring a server back.
    pub rise: u32,
    /// Failures in a row that take it out.
    pub fall: u32,
}

/// What one health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connect.
    Tcp,
    /// A TLS handshake with the pool's backend TLS settings.
    Tls,
    /// `GET path` over HTTP/1.1 (in TLS when the pool speaks TLS), answered with this status.
    Http {
        /// The path, starting with `/`.
        path: String,
        /// The status that passes.
        expect_status: u16,
    },
}

/// Milliseconds since a process-wide anchor (never 0), for deadlines kept in atomics.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// Health, administrative state and counters of one server. Relaxed atomics: each value stands
/// alone, and a core that reads a state a moment old only sends one connection the old way.
#[derive(Debug)]
pub struct ServerState {
    admin: AtomicU8,
    /// The active check's verdict (true until a check says otherwise).
    up: AtomicBool,
    /// Connect failures in a row (reset by a successful connect).
    consecutive_failures: AtomicU32,
    /// Left out by passive ejection until this [`now_ms`] (0: not ejected).
    ejected_until: AtomicU64,
    /// Connections open through this server now.
    pub active: AtomicU64,
    /// Connections ever made to this server (successful or not).
    pub total: AtomicU64,
    /// Connect attempts that were refused or failed.
    pub connect_refused: AtomicU64,
    /// Connect attempts past their deadline.
    pub connect_timeouts: AtomicU64,
    /// Times this server was ejected by passive checks.
    pub ejections: AtomicU64,
    /// The latest connect latencies in microseconds, a ring written by the cores and read by
    /// the metrics publisher ([`ServerState::latencies_since`]).
    latency_us: [AtomicU32; LATENCY_RING],
    latency_written: AtomicU64,
}

/// Connect latencies kept between two reads of the publisher; more in between thin out the
/// histogram (the counters stay exact).
const LATENCY_RING: usize = 1024;

impl Default for ServerState {
    fn default() -> Self {
        Self {
            admin: AtomicU8::new(0),
            up: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_refused: AtomicU64::new(0),
            connect_timeouts: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            latency_us: [const { AtomicU32::new(0) }; LATENCY_RING],
            latency_written: AtomicU64::new(0),
        }
    }
}

impl ServerState {
    /// The operator's state.
    pub fn admin(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Relaxed))
    }

    /// Sets the operator's state.
    pub fn set_admin(&self, s: AdminState) {
        self.admin.store(s as u8, Relaxed);
    }

    /// The active check's verdict.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Records the active check's verdict (the checker applies rise and fall first).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed);
        if up {
            // A server the check finds healthy again is tried at once.
            self.consecutive_failures.store(0, Relaxed);
            self.ejected_until.store(0, Relaxed);
        }
    }

    /// Whether passive ejection leaves this server out at `now_ms`.
    pub fn ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until.load(Relaxed)
    }

    /// Whether new connections may go here at `now_ms`.
    pub fn accepts_new(&self, now_ms: u64) -> bool {
        self.admin() == AdminState::Ready && self.is_up() && !self.ejected(now_ms)
    }

    /// A connect succeeded.
    pub fn connect_ok(&self) {
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
    }

    /// Records a successful connect's latency.
    pub fn connect_latency(&self, d: std::time::Duration) {
        let us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let n = self.latency_written.fetch_add(1, Relaxed);
        self.latency_us[(n % LATENCY_RING as u64) as usize].store(us, Relaxed);
    }

    /// The latencies (seconds) recorded since the reader's position `*read`, which moves on;
    /// at most the ring's size.
    pub fn latencies_since(&self, read: &mut u64) -> Vec<f64> {
        let written = self.latency_written.load(Relaxed);
        let from = (*read).max(written.saturating_sub(LATENCY_RING as u64));
        *read = written;
        (from..written)
            .map(|n| {
                let us = self.latency_us[(n % LATENCY_RING as u64) as usize].load(Relaxed);
                f64::from(us) / 1e6
            })
            .collect()
    }

    /// A connect failed: counted; ejects after `ejection.after` in a row. Returns the failures
    /// in a row when this one ejected the server.
    pub fn connect_failed(&self, timed_out: bool, ejection: Ejection) -> Option<u32> {
        if timed_out {
            self.connect_timeouts.fetch_add(1, Relaxed);
        } else {
            self.connect_refused.fetch_add(1, Relaxed);
        }
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if ejection.after != 0 && n >= ejection.after {
            let backoff = u64::try_from(ejection.backoff.as_millis()).unwrap_or(u64::MAX);
            let until = now_ms().saturating_add(backoff);
            if self.ejected_until.swap(until, Relaxed) < now_ms() {
                self.ejections.fetch_add(1, Relaxed);
                return Some(n);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ejection_after_n_failures_in_a_row_and_back_after_the_backoff() {
        let s = ServerState::default();
        let ej = Ejection {
            after: 3,
            backoff: Duration::from_millis(50),
        };
        s.connect_failed(false, ej);
        s.connect_failed(true, ej);
        s.connect_ok();
        s.connect_failed(false, ej);
        s.connect_failed(false, ej);
        assert!(
            s.accepts_new(now_ms()),
            "a success in between resets the count"
        );
        s.connect_failed(false, ej);
        assert!(!s.accepts_new(now_ms()));
        assert_eq!(s.ejections.load(Relaxed), 1);
        assert!(
            s.accepts_new(now_ms() + 60),
            "tried again after the back-off"
        );
        assert_eq!(s.connect_timeouts.load(Relaxed), 1);
        assert_eq!(s.connect_refused.load(Relaxed), 4);
    }

    #[test]
    fn admin_states_and_the_check_gate_new_connections() {
        let s = ServerState::default();
        assert!(s.accepts_new(now_ms()));
        s.set_admin(AdminState::Drain);
        assert!(!s.accepts_new(now_ms()));
        s.set_admin(AdminState::Ready);
        s.set_up(false);
        assert!(!s.accepts_new(now_ms()));
        s.set_up(true);
        assert!(s.accepts_new(now_ms()));
        assert_eq!(AdminState::parse("maint"), Some(AdminState::Maint));
        assert_eq!(AdminState::parse("x"), None);
    }
}
