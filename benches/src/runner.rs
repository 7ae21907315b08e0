//! Runs the slots (one blocking thread per concurrency slot) and gathers their results.
//!
//! Threads keep their own counters; the only shared state is the count bound (two atomics) and
//! the start barrier, so the generator spends its CPU on TLS, not on coordination.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use rustls::{ClientConfig, HandshakeKind};

use crate::cli::Mode;
use crate::conn::{open, Endpoint, ErrorKind, Failure, Tls};
use crate::procstat::{self, Sample};
use crate::stats::{micros, SlotStats};

/// Stack per slot thread: the TLS state lives on the heap, so a small stack lets thousands of
/// slots run.
const SLOT_STACK_BYTES: usize = 256 * 1024;

/// Everything a slot needs, fixed before the run starts.
#[derive(Debug)]
pub struct Plan {
    pub ep: Endpoint,
    pub mode: Mode,
    /// Count bound on connections.
    pub max_connections: Option<u64>,
    /// Count bound on requests (bulk mode).
    pub max_requests: Option<u64>,
    pub duration: Duration,
    pub request: Vec<u8>,
    pub expect_body: Option<u64>,
    /// Idle mode: how long to hold the open connections.
    pub hold: Duration,
    pub server_pids: Vec<u32>,
    /// full/resume: wait for the server's close before closing.
    pub server_closes: bool,
}

/// Raw results; `main` turns them into a report.
#[derive(Debug)]
pub struct Outcome {
    pub stats: SlotStats,
    pub elapsed: Duration,
    pub generator_cpu: Duration,
    pub server_before: Option<Sample>,
    /// At the end of the measured window (idle mode: with every connection still open).
    pub server_loaded: Option<Sample>,
    /// Idle mode: after the held connections were closed.
    pub server_after: Option<Sample>,
    pub idle_open: Option<u64>,
}

#[derive(Debug)]
struct Shared {
    connections: AtomicU64,
    requests: AtomicU64,
    start: Barrier,
}

impl Shared {
    fn take(counter: &AtomicU64, bound: Option<u64>) -> bool {
        bound.is_none_or(|max| counter.fetch_add(1, Ordering::Relaxed) < max)
    }
}

pub fn run(plan: Arc<Plan>, configs: Vec<Arc<ClientConfig>>) -> Result<Outcome> {
    let shared = Arc::new(Shared {
        connections: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        start: Barrier::new(configs.len() + 1),
    });
    let mut handles = Vec::with_capacity(configs.len());
    for (i, config) in configs.into_iter().enumerate() {
        let (plan, shared) = (plan.clone(), shared.clone());
        let handle = thread::Builder::new()
            .name(format!("slot-{i}"))
            .stack_size(SLOT_STACK_BYTES)
            .spawn(move || slot(&plan, &shared, &config))
            .with_context(|| format!("spawn slot thread {i}"))?;
        handles.push(handle);
    }

    let server_pids = &plan.server_pids;
    let sample_server = || -> Result<Option<Sample>> {
        if server_pids.is_empty() {
            Ok(None)
        } else {
            procstat::sample_all(server_pids).map(Some)
        }
    };
    // Every slot has primed (resume mode) and waits here, so priming stays out of the window.
    shared.start.wait();
    let server_before = sample_server()?;
    let self_before = procstat::own_cpu();
    let start = Instant::now();

    let mut stats = SlotStats::default();
    let mut held: Vec<Tls> = Vec::new();
    for h in handles {
        let (s, conns) = h.join().map_err(|_| anyhow!("a slot thread panicked"))?;
        stats.merge(s);
        held.extend(conns);
    }
    let elapsed = start.elapsed();
    let self_after = procstat::own_cpu();
    let server_loaded = sample_server()?;

    let (idle_open, server_after) = if plan.mode == Mode::Idle {
        let open = held.len() as u64;
        // Holding is the point of idle mode: the server keeps every connection's state meanwhile.
        thread::sleep(plan.hold);
        drop(held);
        (Some(open), sample_server()?)
    } else {
        (None, server_loaded)
    };

    Ok(Outcome {
        stats,
        elapsed,
        generator_cpu: self_after.saturating_sub(self_before),
        server_before,
        server_loaded,
        server_after,
        idle_open,
    })
}

fn slot(plan: &Plan, shared: &Shared, config: &Arc<ClientConfig>) -> (SlotStats, Vec<Tls>) {
    let mut stats = SlotStats::default();
    let mut scratch = Vec::with_capacity(16 * 1024);
    if plan.mode == Mode::Resume {
        prime(plan, config, &mut stats, &mut scratch);
    }
    shared.start.wait();
    let deadline = Instant::now() + plan.duration;
    let mut held = Vec::new();
    match plan.mode {
        Mode::Full | Mode::Resume => {
            handshakes(plan, shared, config, deadline, &mut stats, &mut scratch)
        }
        Mode::Bulk => bulk(plan, shared, config, deadline, &mut stats, &mut scratch),
        Mode::Idle => {
            while Instant::now() < deadline
                && Shared::take(&shared.connections, plan.max_connections)
            {
                let t0 = Instant::now();
                match open(&plan.ep, config) {
                    Ok(tls) => {
                        stats.handshake_us.push(micros(t0.elapsed()));
                        stats.latency_us.push(micros(t0.elapsed()));
                        note_handshake(&tls, &mut stats);
                        held.push(tls);
                    }
                    Err(failure) => stats.fail(failure),
                }
            }
        }
    }
    (stats, held)
}

/// The slot's first connection: a full handshake that fills the slot's session store.
fn prime(plan: &Plan, config: &Arc<ClientConfig>, stats: &mut SlotStats, scratch: &mut Vec<u8>) {
    let ok = open(&plan.ep, config).and_then(|mut tls| {
        let r = tls.exchange(&plan.request, plan.expect_body, scratch);
        tls.close();
        r
    });
    if let Err(failure) = ok {
        stats.fail(Failure::new(
            ErrorKind::Primer,
            format!("{}: {}", failure.kind.name(), failure.detail),
        ));
    }
}

fn handshakes(
    plan: &Plan,
    shared: &Shared,
    config: &Arc<ClientConfig>,
    deadline: Instant,
    stats: &mut SlotStats,
    scratch: &mut Vec<u8>,
) {
    while Instant::now() < deadline && Shared::take(&shared.connections, plan.max_connections) {
        let t0 = Instant::now();
        let mut tls = match open(&plan.ep, config) {
            Ok(tls) => tls,
            Err(failure) => {
                stats.fail(failure);
                continue;
            }
        };
        let handshake = t0.elapsed();
        let kind = note_handshake(&tls, stats);
        let expected = match plan.mode {
            Mode::Resume => matches!(kind, Some(HandshakeKind::Resumed)),
            _ => matches!(
                kind,
                Some(HandshakeKind::Full | HandshakeKind::FullWithHelloRetryRequest)
            ),
        };
        // The exchange runs even on an unexpected handshake kind, so the server's work per
        // connection stays the same whatever the error count.
        let mut result = tls.exchange(&plan.request, plan.expect_body, scratch);
        if plan.server_closes && result.is_ok() {
            if let Err(failure) = tls.wait_server_close() {
                result = Err(failure);
            }
        }
        tls.close();
        match result {
            Err(failure) => stats.fail(failure),
            Ok(_) if !expected => stats.error(if plan.mode == Mode::Resume {
                ErrorKind::NotResumed
            } else {
                ErrorKind::NotFull
            }),
            Ok(resp) => {
                stats.latency_us.push(micros(t0.elapsed()));
                stats.handshake_us.push(micros(handshake));
                stats.requests += 1;
                stats.body_bytes += resp.body_bytes;
                stats.unclean_closes += u64::from(resp.unclean_close);
            }
        }
    }
}

fn bulk(
    plan: &Plan,
    shared: &Shared,
    config: &Arc<ClientConfig>,
    deadline: Instant,
    stats: &mut SlotStats,
    scratch: &mut Vec<u8>,
) {
    let mut live: Option<Tls> = None;
    while Instant::now() < deadline {
        let mut tls = match live.take() {
            Some(tls) => tls,
            None => {
                if !Shared::take(&shared.connections, plan.max_connections) {
                    break;
                }
                let t0 = Instant::now();
                match open(&plan.ep, config) {
                    Ok(tls) => {
                        stats.handshake_us.push(micros(t0.elapsed()));
                        note_handshake(&tls, stats);
                        tls
                    }
                    Err(failure) => {
                        stats.fail(failure);
                        continue;
                    }
                }
            }
        };
        if !Shared::take(&shared.requests, plan.max_requests) {
            tls.close();
            break;
        }
        let t0 = Instant::now();
        match tls.exchange(&plan.request, plan.expect_body, scratch) {
            Ok(resp) => {
                stats.latency_us.push(micros(t0.elapsed()));
                stats.requests += 1;
                stats.body_bytes += resp.body_bytes;
                stats.unclean_closes += u64::from(resp.unclean_close);
                if resp.keep_alive {
                    live = Some(tls);
                } else {
                    tls.close();
                }
            }
            Err(failure) => stats.fail(failure),
        }
    }
    if let Some(tls) = live {
        tls.close();
    }
}

/// Counts the handshake kind and what was negotiated; returns the kind.
fn note_handshake(tls: &Tls, stats: &mut SlotStats) -> Option<HandshakeKind> {
    let kind = tls.handshake_kind();
    match kind {
        Some(HandshakeKind::Resumed) => stats.resumed_handshakes += 1,
        Some(_) => stats.full_handshakes += 1,
        None => {}
    }
    stats.note_negotiated(&tls.conn);
    kind
}
