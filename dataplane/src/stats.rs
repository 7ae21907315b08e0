//! Per-core counters: written only by their core (relaxed atomics, no contention), summed on
//! read by [`crate::Dataplane::stats`], and flushed as deltas to the `metrics` facade about once a
//! second by the core itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend_tls::BackendTlsCause;
use crate::metrics as m;
use crate::outcome::{CloseReason, HandshakeInfo};

/// Every close reason, in counter-array order.
pub(crate) const REASONS: [CloseReason; N_REASONS] = [
    CloseReason::Done,
    CloseReason::ClientHelloTooLarge,
    CloseReason::BadClientHello,
    CloseReason::NegotiationFailed,
    CloseReason::UnknownSni,
    CloseReason::TlsError,
    CloseReason::ClientCertRejected,
    CloseReason::ClientClosedEarly,
    CloseReason::HandshakeTimeout,
    CloseReason::KeyOpRejected,
    CloseReason::KeyOpTimeout,
    CloseReason::KeyOpFailed,
    CloseReason::IdleTimeout,
    CloseReason::BackendConnectFailed,
    CloseReason::BackendConnectTimeout,
    CloseReason::ClientIoError,
    CloseReason::BackendIoError,
    // Stands for every cause; the causes have their own counters.
    CloseReason::BackendTlsError(BackendTlsCause::ProtocolError),
    CloseReason::ListenerGone,
    CloseReason::Shutdown,
    CloseReason::NoHealthyBackend,
    CloseReason::NoApplicationProtocol,
];

const N_REASONS: usize = 22;
const N_CAUSES: usize = BackendTlsCause::ALL.len();

/// Who caused a connection to end in error (`None`: it ended normally): the `source` label of
/// [`m::ERRORS_TOTAL`].
pub(crate) fn error_source(r: CloseReason) -> Option<&'static str> {
    match r {
        CloseReason::Done | CloseReason::Shutdown | CloseReason::IdleTimeout => None,
        CloseReason::ClientHelloTooLarge
        | CloseReason::BadClientHello
        | CloseReason::NegotiationFailed
        | CloseReason::UnknownSni
        | CloseReason::NoApplicationProtocol
        | CloseReason::ClientCertRejected
        | CloseReason::TlsError
        | CloseReason::ClientClosedEarly
        | CloseReason::HandshakeTimeout
        | CloseReason::ClientIoError => Some("peer"),
        CloseReason::BackendConnectFailed
        | CloseReason::BackendConnectTimeout
        | CloseReason::BackendIoError
        | CloseReason::NoHealthyBackend
        | CloseReason::BackendTlsError(_) => Some("backend"),
        CloseReason::KeyOpRejected | CloseReason::KeyOpTimeout | CloseReason::KeyOpFailed => {
            Some("hsm")
        }
        CloseReason::ListenerGone => Some("internal"),
    }
}

/// Every `errno` label of [`m::ACCEPT_ERRORS_TOTAL`].
const ACCEPT_ERRNOS: [&str; 5] = ["EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "other"];

/// Creates at zero, on a core's first flush, every series whose label values are known up front
/// (errors by source, key operations by result, bytes by direction, this core's accept pauses
/// and accept errors by errno). A dashboard then shows 0 instead of "no data", and an alert over
/// `increase()` sees the first event, which it cannot when the series is born with it.
fn create_zero_series(core: &str) {
    for source in ["peer", "backend", "hsm", "internal"] {
        metrics::counter!(m::ERRORS_TOTAL, "source" => source).increment(0);
    }
    for result in [
        "queued",
        "ok",
        "rejected",
        "timed_out",
        "failed",
        "peer_refused",
        "late",
    ] {
        metrics::counter!(m::KEY_OPS_TOTAL, "result" => result).increment(0);
    }
    for direction in ["client_in", "client_out", "backend_in", "backend_out"] {
        metrics::counter!(m::TRANSFERRED_BYTES_TOTAL, "direction" => direction).increment(0);
    }
    metrics::counter!(m::ACCEPT_PAUSED_TOTAL, "core" => core.to_owned()).increment(0);
    for errno in ACCEPT_ERRNOS {
        metrics::counter!(m::ACCEPT_ERRORS_TOTAL, "core" => core.to_owned(), "errno" => errno)
            .increment(0);
    }
}

/// At most one log line per peer-caused close reason in this interval, process-wide.
const PEER_LOG_INTERVAL_MS: u64 = 10_000;

/// Logs a connection that ended in error, at debug. What a peer does wrong (a scanner's probes, a
/// client without a shared suite) is counted per reason in the close counters and logged at
/// most once per reason every 10 s with the number of lines left out, so a scan cannot flood
/// the log; WARN is kept for what an operator must act on.
pub(crate) fn log_closed(
    core: usize,
    listener: &str,
    peer: Option<std::net::SocketAddr>,
    reason: CloseReason,
) {
    use std::sync::OnceLock;
    // Process-wide by nature: they throttle lines of the process's one log.
    static START: OnceLock<Instant> = OnceLock::new();
    static LAST: [AtomicU64; N_REASONS] = [const { AtomicU64::new(0) }; N_REASONS];
    static LEFT_OUT: [AtomicU64; N_REASONS] = [const { AtomicU64::new(0) }; N_REASONS];
    if error_source(reason) != Some("peer") {
        tracing::debug!(
            core,
            listener,
            ?peer,
            reason = reason.as_str(),
            "connection closed"
        );
        return;
    }
    let i = reason_index(reason);
    let now_ms = u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let last = LAST[i].load(Relaxed);
    let due = last == 0 || now_ms.saturating_sub(last) >= PEER_LOG_INTERVAL_MS;
    if !due
        || LAST[i]
            .compare_exchange(last, now_ms, Relaxed, Relaxed)
            .is_err()
    {
        LEFT_OUT[i].fetch_add(1, Relaxed);
        return;
    }
    let left_out = LEFT_OUT[i].swap(0, Relaxed);
    tracing::debug!(
        core,
        listener,
        ?peer,
        reason = reason.as_str(),
        left_out,
        "connection closed by the peer's error (one line per reason every 10 s; all are counted)"
    );
}

fn reason_index(r: CloseReason) -> usize {
    let d = std::mem::discriminant(&r);
    REASONS
        .iter()
        .position(|x| std::mem::discriminant(x) == d)
        .unwrap_or(0)
}

fn cause_index(c: BackendTlsCause) -> usize {
    BackendTlsCause::ALL
        .iter()
        .position(|x| *x == c)
        .unwrap_or(0)
}

/// Counters of one core. Only the owning core writes them.
#[derive(Debug, Default)]
pub(crate) struct CoreStats {
    pub accepted: AtomicU64,
    pub closed: [AtomicU64; N_REASONS],
    pub backend_tls_errors: [AtomicU64; N_CAUSES],
    pub handshakes_in_flight: AtomicU64,
    pub handshakes_full: AtomicU64,
    pub handshakes_resumed: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub key_ops_queued: AtomicU64,
    pub key_ops_ok: AtomicU64,
    pub key_ops_rejected: AtomicU64,
    pub key_ops_timed_out: AtomicU64,
    pub key_ops_failed: AtomicU64,
    pub key_ops_peer_refused: AtomicU64,
    pub key_ops_late: AtomicU64,
    pub key_ops_in_flight: AtomicU64,
    pub client_in: AtomicU64,
    pub client_out: AtomicU64,
    pub backend_in: AtomicU64,
    pub backend_out: AtomicU64,
    pub accept_paused: AtomicU64,
    pub accept_errors: AtomicU64,
    /// Flushes so far: the core's heartbeat, advanced about once a second by its own loop, so a
    /// core stuck in one task or syscall stops it ([`crate::Dataplane::core_heartbeats`]).
    pub heartbeat: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    // Single writer: a load and store would do, but fetch_add keeps it obviously right.
    c.fetch_add(n, Relaxed);
}

/// Aggregated counters of all cores, as returned by [`crate::Dataplane::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections accepted.
    pub connections_accepted: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections closed, by reason (`CloseReason::as_str`); reasons never seen are absent.
    pub closed_by_reason: Vec<(&'static str, u64)>,
    /// Backend TLS failures by cause (`BackendTlsCause::as_str`); causes never seen are absent.
    pub backend_tls_errors: Vec<(&'static str, u64)>,
    /// Handshakes in flight now.
    pub handshakes_in_flight: u64,
    /// Full handshakes completed.
    pub handshakes_full: u64,
    /// Resumed handshakes completed.
    pub handshakes_resumed: u64,
    /// Handshakes failed (any reason before completion).
    pub handshakes_failed: u64,
    /// Key operations submitted to the pool.
    pub key_ops_queued: u64,
    /// Key operations that produced a connection.
    pub key_ops_ok: u64,
    /// Key operations refused because a queue bound was reached.
    pub key_ops_rejected: u64,
    /// Key operations past their deadline.
    pub key_ops_timed_out: u64,
    /// Key operations that failed in the token (a PKCS#11 call).
    pub key_ops_failed: u64,
    /// Key operations whose handshake the peer's hello failed (nothing in common, a bad hello):
    /// no token call failed.
    pub key_ops_peer_refused: u64,
    /// Results that arrived for connections already gone.
    pub key_ops_late: u64,
    /// Key operations in flight now.
    pub key_ops_in_flight: u64,
    /// Bytes read from clients (TLS).
    pub client_in_bytes: u64,
    /// Bytes written to clients (TLS).
    pub client_out_bytes: u64,
    /// Bytes read from backends.
    pub backend_in_bytes: u64,
    /// Bytes written to backends.
    pub backend_out_bytes: u64,
    /// Times accept paused on a per-core limit.
    pub accept_paused: u64,
    /// Accepts that failed in the kernel (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    pub accept_errors: u64,
}

impl StatsSnapshot {
    /// Closed connections for one reason.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed_by_reason
            .iter()
            .find(|(r, _)| *r == reason.as_str())
            .map_or(0, |(_, n)| *n)
    }

    /// Backend TLS failures for one cause.
    pub fn backend_tls_errors(&self, cause: BackendTlsCause) -> u64 {
        self.backend_tls_errors
            .iter()
            .find(|(r, _)| *r == cause.as_str())
            .map_or(0, |(_, n)| *n)
    }

    pub(crate) fn sum(cores: &[Arc<CoreStats>]) -> Self {
        let mut s = StatsSnapshot::default();
        let mut closed = [0u64; N_REASONS];
        let mut causes = [0u64; N_CAUSES];
        let mut total_closed = 0;
        for c in cores {
            s.connections_accepted += c.accepted.load(Relaxed);
            for (i, slot) in closed.iter_mut().enumerate() {
                let n = c.closed[i].load(Relaxed);
                *slot += n;
                total_closed += n;
            }
            for (i, slot) in causes.iter_mut().enumerate() {
                *slot += c.backend_tls_errors[i].load(Relaxed);
            }
            s.handshakes_in_flight += c.handshakes_in_flight.load(Relaxed);
            s.handshakes_full += c.handshakes_full.load(Relaxed);
            s.handshakes_resumed += c.handshakes_resumed.load(Relaxed);
            s.handshakes_failed += c.handshakes_failed.load(Relaxed);
            s.key_ops_queued += c.key_ops_queued.load(Relaxed);
            s.key_ops_ok += c.key_ops_ok.load(Relaxed);
            s.key_ops_rejected += c.key_ops_rejected.load(Relaxed);
            s.key_ops_timed_out += c.key_ops_timed_out.load(Relaxed);
            s.key_ops_failed += c.key_ops_failed.load(Relaxed);
            s.key_ops_peer_refused += c.key_ops_peer_refused.load(Relaxed);
            s.key_ops_late += c.key_ops_late.load(Relaxed);
            s.key_ops_in_flight += c.key_ops_in_flight.load(Relaxed);
            s.client_in_bytes += c.client_in.load(Relaxed);
            s.client_out_bytes += c.client_out.load(Relaxed);
            s.backend_in_bytes += c.backend_in.load(Relaxed);
            s.backend_out_bytes += c.backend_out.load(Relaxed);
            s.accept_paused += c.accept_paused.load(Relaxed);
            s.accept_errors += c.accept_errors.load(Relaxed);
        }
        s.connections_open = s.connections_accepted.saturating_sub(total_closed);
        s.closed_by_reason = REASONS
            .iter()
            .zip(closed)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.as_str(), n))
            .collect();
        s.backend_tls_errors = BackendTlsCause::ALL
            .iter()
            .zip(causes)
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| (c.as_str(), n))
            .collect();
        s
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HsKey {
    listener: String,
    version: &'static str,
    suite: &'static str,
    group: &'static str,
    kind: &'static str,
    result: &'static str,
}

/// Most samples a core keeps between flushes; beyond it, samples are dropped (the counters stay
/// exact, only the histograms thin out).
const MAX_SAMPLES_PER_FLUSH: usize = 8192;
/// How often a core flushes to the metrics facade.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A core's recording front: owned by that core's thread, never shared.
#[derive(Debug)]
pub(crate) struct CoreRecorder {
    core: String,
    pub stats: Arc<CoreStats>,
    handshakes: HashMap<HsKey, u64>,
    /// Backend TLS failures by (listener, cause) since the last flush.
    backend_tls_errors: HashMap<(String, &'static str), u64>,
    hs_samples: Vec<(String, &'static str, f64)>,
    key_op_samples: Vec<f64>,
    flushed: Flushed,
    accept_errors: HashMap<&'static str, u64>,
    accept_errors_unlogged: u64,
    accept_error_logged: Option<Instant>,
    /// Whether the series with fixed label values exist yet ([`create_zero_series`]).
    zero_series_created: bool,
}

/// At most one log line per core this often about failing accepts; it carries the count.
const ACCEPT_ERROR_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Default)]
struct Flushed {
    accepted: u64,
    closed: [u64; N_REASONS],
    key_ops: [u64; 7],
    bytes: [u64; 4],
    accept_paused: u64,
}

impl CoreRecorder {
    pub(crate) fn new(core: usize, stats: Arc<CoreStats>) -> Self {
        Self {
            core: core.to_string(),
            stats,
            handshakes: HashMap::new(),
            backend_tls_errors: HashMap::new(),
            hs_samples: Vec::new(),
            key_op_samples: Vec::new(),
            flushed: Flushed::default(),
            accept_errors: HashMap::new(),
            accept_errors_unlogged: 0,
            accept_error_logged: None,
            zero_series_created: false,
        }
    }

    /// An accept failed in the kernel with `errno` (the caller backs off before accepting again).
    /// Counted by errno; logged at most once per [`ACCEPT_ERROR_LOG_INTERVAL`] with the count, so
    /// a flood of connections at the fd limit is one line, not hundreds a second.
    pub(crate) fn accept_error(&mut self, errno: Option<i32>, now: Instant) {
        let name = match errno {
            Some(libc::EMFILE) => "EMFILE",
            Some(libc::ENFILE) => "ENFILE",
            Some(libc::ENOBUFS) => "ENOBUFS",
            Some(libc::ENOMEM) => "ENOMEM",
            _ => "other",
        };
        add(&self.stats.accept_errors, 1);
        *self.accept_errors.entry(name).or_default() += 1;
        self.accept_errors_unlogged += 1;
        let due = self
            .accept_error_logged
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_ERROR_LOG_INTERVAL);
        if due {
            tracing::warn!(
                core = %self.core,
                errno = name,
                failures = self.accept_errors_unlogged,
                "accept failing (out of file descriptors or memory?): backing off; the count \
                 covers the failures since the last such line"
            );
            self.accept_errors_unlogged = 0;
            self.accept_error_logged = Some(now);
        }
    }

    pub(crate) fn accepted(&self) {
        add(&self.stats.accepted, 1);
        add(&self.stats.handshakes_in_flight, 1);
    }

    pub(crate) fn accept_paused(&self) {
        add(&self.stats.accept_paused, 1);
    }

    pub(crate) fn handshake_ok(&mut self, listener: &str, info: &HandshakeInfo) {
        self.stats.handshakes_in_flight.fetch_sub(1, Relaxed);
        let kind = if info.resumed { "resumed" } else { "full" };
        if info.resumed {
            add(&self.stats.handshakes_resumed, 1);
        } else {
            add(&self.stats.handshakes_full, 1);
        }
        *self
            .handshakes
            .entry(HsKey {
                listener: listener.to_owned(),
                version: info.version,
                suite: info.suite,
                group: info.group,
                kind,
                result: "ok",
            })
            .or_default() += 1;
        if self.hs_samples.len() < MAX_SAMPLES_PER_FLUSH {
            self.hs_samples
                .push((listener.to_owned(), kind, info.duration.as_secs_f64()));
        }
    }

    /// A connection ended; `handshaking` says whether it ended before its handshake completed.
    pub(crate) fn closed(&mut self, listener: &str, reason: CloseReason, handshaking: bool) {
        add(&self.stats.closed[reason_index(reason)], 1);
        if let CloseReason::BackendTlsError(cause) = reason {
            add(&self.stats.backend_tls_errors[cause_index(cause)], 1);
            *self
                .backend_tls_errors
                .entry((listener.to_owned(), cause.as_str()))
                .or_default() += 1;
        }
        if handshaking {
            self.stats.handshakes_in_flight.fetch_sub(1, Relaxed);
            add(&self.stats.handshakes_failed, 1);
            *self
                .handshakes
                .entry(HsKey {
                    listener: listener.to_owned(),
                    version: "",
                    suite: "",
                    group: "",
                    kind: "",
                    result: reason.as_str(),
                })
                .or_default() += 1;
        }
    }

    pub(crate) fn key_op_queued(&self) {
        add(&self.stats.key_ops_queued, 1);
        add(&self.stats.key_ops_in_flight, 1);
    }

    pub(crate) fn key_op_rejected(&self) {
        add(&self.stats.key_ops_rejected, 1);
    }

    /// A result came back (`ok`/`failed`/`timed_out`) after `elapsed`; `late` when its connection
    /// was already gone.
    pub(crate) fn key_op_done(&mut self, outcome: KeyOpOutcome, elapsed: Duration) {
        self.stats.key_ops_in_flight.fetch_sub(1, Relaxed);
        let c = match outcome {
            KeyOpOutcome::Ok => &self.stats.key_ops_ok,
            KeyOpOutcome::Failed => &self.stats.key_ops_failed,
            KeyOpOutcome::PeerRefused => &self.stats.key_ops_peer_refused,
            KeyOpOutcome::TimedOut => &self.stats.key_ops_timed_out,
            KeyOpOutcome::Late => &self.stats.key_ops_late,
        };
        add(c, 1);
        if self.key_op_samples.len() < MAX_SAMPLES_PER_FLUSH {
            self.key_op_samples.push(elapsed.as_secs_f64());
        }
    }

    pub(crate) fn client_in(&self, n: usize) {
        add(&self.stats.client_in, n as u64);
    }
    pub(crate) fn client_out(&self, n: usize) {
        add(&self.stats.client_out, n as u64);
    }
    pub(crate) fn backend_in(&self, n: usize) {
        add(&self.stats.backend_in, n as u64);
    }
    pub(crate) fn backend_out(&self, n: usize) {
        add(&self.stats.backend_out, n as u64);
    }

    /// Flushes to the metrics facade and advances the heartbeat. Each driver calls it once per
    /// [`FLUSH_INTERVAL`] on its own clock, and once more at the end.
    pub(crate) fn flush(&mut self) {
        add(&self.stats.heartbeat, 1);
        if !self.zero_series_created {
            create_zero_series(&self.core);
            self.zero_series_created = true;
        }
        let s = &self.stats;
        let core = self.core.clone();
        let delta = |cur: u64, prev: &mut u64| {
            let d = cur.saturating_sub(*prev);
            *prev = cur;
            d
        };
        let d = delta(s.accepted.load(Relaxed), &mut self.flushed.accepted);
        metrics::counter!(m::CONNECTIONS_ACCEPTED_TOTAL, "core" => core.clone()).increment(d);
        for (i, r) in REASONS.iter().enumerate() {
            let d = delta(s.closed[i].load(Relaxed), &mut self.flushed.closed[i]);
            if d > 0 {
                metrics::counter!(m::CONNECTIONS_CLOSED_TOTAL, "core" => core.clone(), "reason" => r.as_str())
                    .increment(d);
                if let Some(source) = error_source(*r) {
                    metrics::counter!(m::ERRORS_TOTAL, "source" => source).increment(d);
                }
            }
        }
        let open = s
            .accepted
            .load(Relaxed)
            .saturating_sub(s.closed.iter().map(|c| c.load(Relaxed)).sum::<u64>());
        metrics::gauge!(m::CONNECTIONS_OPEN, "core" => core.clone()).set(open as f64);
        metrics::gauge!(m::HANDSHAKES_IN_FLIGHT, "core" => core.clone())
            .set(s.handshakes_in_flight.load(Relaxed) as f64);
        let key_ops = [
            ("queued", &s.key_ops_queued),
            ("ok", &s.key_ops_ok),
            ("rejected", &s.key_ops_rejected),
            ("timed_out", &s.key_ops_timed_out),
            ("failed", &s.key_ops_failed),
            ("peer_refused", &s.key_ops_peer_refused),
            ("late", &s.key_ops_late),
        ];
        for (i, (label, c)) in key_ops.iter().enumerate() {
            let d = delta(c.load(Relaxed), &mut self.flushed.key_ops[i]);
            if d > 0 {
                metrics::counter!(m::KEY_OPS_TOTAL, "result" => *label).increment(d);
            }
        }
        let bytes = [
            ("client_in", &s.client_in),
            ("client_out", &s.client_out),
            ("backend_in", &s.backend_in),
            ("backend_out", &s.backend_out),
        ];
        for (i, (label, c)) in bytes.iter().enumerate() {
            let d = delta(c.load(Relaxed), &mut self.flushed.bytes[i]);
            if d > 0 {
                metrics::counter!(m::TRANSFERRED_BYTES_TOTAL, "direction" => *label).increment(d);
            }
        }
        let d = delta(
            s.accept_paused.load(Relaxed),
            &mut self.flushed.accept_paused,
        );
        if d > 0 {
            metrics::counter!(m::ACCEPT_PAUSED_TOTAL, "core" => core).increment(d);
        }
        for (k, n) in self.handshakes.drain() {
            metrics::counter!(m::HANDSHAKES_TOTAL,
                "listener" => k.listener, "version" => k.version, "suite" => k.suite,
                "group" => k.group, "kind" => k.kind, "result" => k.result)
            .increment(n);
        }
        for (errno, n) in self.accept_errors.drain() {
            metrics::counter!(m::ACCEPT_ERRORS_TOTAL, "core" => self.core.clone(), "errno" => errno)
                .increment(n);
        }
        for ((listener, reason), n) in self.backend_tls_errors.drain() {
            metrics::counter!(m::BACKEND_TLS_ERRORS_TOTAL, "listener" => listener, "reason" => reason)
                .increment(n);
        }
        for (listener, kind, secs) in self.hs_samples.drain(..) {
            metrics::histogram!(m::HANDSHAKE_DURATION_SECONDS, "listener" => listener, "kind" => kind)
                .record(secs);
        }
        let h = metrics::histogram!(m::KEY_OP_DURATION_SECONDS);
        for secs in self.key_op_samples.drain(..) {
            h.record(secs);
        }
    }
}

/// How a key operation ended, seen from the home core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyOpOutcome {
    Ok,
    /// The token failed (a PKCS#11 call), or the pool refused the job.
    Failed,
    /// The peer's hello failed the handshake on the worker; the token was not at fault.
    PeerRefused,
    TimedOut,
    Late,
}
