//! Per-slot counters and latencies, merged into the run's report.

use std::collections::BTreeMap;
use std::time::Duration;

use rustls::{CipherSuite, ClientConnection, NamedGroup, ProtocolVersion};
use serde::Serialize;

use crate::conn::{ErrorKind, Failure};

/// What one slot (thread) saw. Slots never share these, so the hot path takes no lock.
#[derive(Debug, Default)]
pub struct SlotStats {
    /// Connect → response complete (full/resume), or request → response (bulk), in µs.
    pub latency_us: Vec<u32>,
    /// Connect → handshake complete, in µs.
    pub handshake_us: Vec<u32>,
    pub full_handshakes: u64,
    pub resumed_handshakes: u64,
    pub requests: u64,
    pub body_bytes: u64,
    pub unclean_closes: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    /// The first failure's detail for each kind.
    pub error_examples: BTreeMap<ErrorKind, String>,
    /// Negotiated parameters → connections; a short list searched linearly, so the hot path
    /// neither allocates nor formats.
    pub negotiated: Vec<(Negotiated, u64)>,
}

/// What a connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub version: Option<ProtocolVersion>,
    pub suite: Option<CipherSuite>,
    pub group: Option<NamedGroup>,
}

impl Negotiated {
    pub fn describe(&self) -> String {
        let show = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        format!(
            "{} {} {}",
            show(self.version.map(|v| format!("{v:?}"))),
            show(self.suite.map(|v| format!("{v:?}"))),
            show(self.group.map(|v| format!("{v:?}")))
        )
    }
}

impl SlotStats {
    pub fn error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_default() += 1;
    }

    pub fn fail(&mut self, failure: Failure) {
        self.error(failure.kind);
        if !failure.detail.is_empty() {
            self.error_examples
                .entry(failure.kind)
                .or_insert(failure.detail);
        }
    }

    pub fn note_negotiated(&mut self, conn: &ClientConnection) {
        let key = Negotiated {
            version: conn.protocol_version(),
            suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
            group: conn.negotiated_key_exchange_group().map(|g| g.name()),
        };
        match self.negotiated.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => self.negotiated.push((key, 1)),
        }
    }

    pub fn merge(&mut self, other: SlotStats) {
        self.latency_us.extend(other.latency_us);
        self.handshake_us.extend(other.handshake_us);
        self.full_handshakes += other.full_handshakes;
        self.resumed_handshakes += other.resumed_handshakes;
        self.requests += other.requests;
        self.body_bytes += other.body_bytes;
        self.unclean_closes += other.unclean_closes;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.error_examples {
            self.error_examples.entry(k).or_insert(v);
        }
        for (k, v) in other.negotiated {
            match self.negotiated.iter_mut().find(|(key, _)| *key == k) {
                Some((_, n)) => *n += v,
                None => self.negotiated.push((k, v)),
            }
        }
    }
}

pub fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Latency summary in µs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: u32,
    pub p90: u32,
    pub p99: u32,
    pub max: u32,
}

impl Latency {
    pub fn of(samples: &mut [u32]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let pick = |q: f64| samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        let sum: u64 = samples.iter().map(|&s| u64::from(s)).sum();
        Latency {
            count: n as u64,
            mean: sum as f64 / n as f64,
            p50: pick(0.50),
            p90: pick(0.90),
            p99: pick(0.99),
            max: samples[n - 1],
        }
    }
}

/// CPU accounting of one side over the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub cpu_us: u64,
    /// CPU time / wall time: 1.0 means one core fully busy.
    pub cores_busy: f64,
    /// CPU µs per unit (handshake, or request in bulk mode).
    pub us_per_unit: Option<f64>,
}

impl Cpu {
    pub fn new(cpu: Duration, elapsed: Duration, units: u64) -> Cpu {
        let cpu_us = u64::try_from(cpu.as_micros()).unwrap_or(u64::MAX);
        Cpu {
            cpu_us,
            cores_busy: cpu.as_secs_f64() / elapsed.as_secs_f64().max(1e-9),
            us_per_unit: (units > 0).then(|| cpu_us as f64 / units as f64),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerSide {
    pub pids: Vec<u32>,
    #[serde(flatten)]
    pub cpu: Cpu,
    /// The kernel's part of `cpu_us` (system time: TCP, syscalls), and per unit.
    pub system_cpu_us: u64,
    pub system_us_per_unit: Option<f64>,
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
    /// Idle mode: resident memory measured while all connections were open, and the growth per
    /// open connection.
    pub rss_kib_loaded: Option<u64>,
    pub rss_bytes_per_connection: Option<f64>,
}

/// The run's result, printed as a table and written as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub target: String,
    pub sni: String,
    pub tls: String,
    pub group: &'static str,
    pub concurrency: u32,
    pub elapsed_s: f64,
    /// What the CPU figures are divided by: "handshake" or "request".
    pub unit: &'static str,
    pub units: u64,
    pub connections_ok: u64,
    pub full_handshakes: u64,
    pub resumed_handshakes: u64,
    pub requests: u64,
    pub body_bytes: u64,
    pub unclean_closes: u64,
    pub errors_total: u64,
    pub errors: BTreeMap<&'static str, u64>,
    /// What the first failure of each kind said.
    pub error_examples: BTreeMap<&'static str, String>,
    pub negotiated: BTreeMap<String, u64>,
    pub handshakes_per_s: f64,
    pub requests_per_s: f64,
    pub body_bytes_per_s: f64,
    pub latency_us: Latency,
    pub handshake_latency_us: Latency,
    pub generator: Cpu,
    pub server: Option<ServerSide>,
    /// Idle mode: connections held open at the same time.
    pub idle_open: Option<u64>,
}

impl Report {
    /// The side that was busier, so a reader knows whether the rate shows the server or the
    /// generator.
    pub fn limit(&self) -> &'static str {
        match &self.server {
            Some(s) if s.cpu.cores_busy >= self.generator.cores_busy => "server",
            Some(_) => "generator",
            None => "unknown",
        }
    }

    pub fn print_human(&self) {
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        println!(
            "tlsgate-load  mode={} target={} sni={}",
            self.mode, self.target, self.sni
        );
        println!(
            "  offered      tls={} group={} concurrency={}",
            self.tls, self.group, self.concurrency
        );
        for (what, n) in &self.negotiated {
            println!("  negotiated   {what}: {n}");
        }
        println!("  elapsed      {:.3} s", self.elapsed_s);
        println!(
            "  connections  ok={} full={} resumed={} errors={}",
            self.connections_ok, self.full_handshakes, self.resumed_handshakes, self.errors_total
        );
        for (kind, n) in &self.errors {
            match self.error_examples.get(kind) {
                Some(example) => println!("    error      {kind}: {n} (first: {example})"),
                None => println!("    error      {kind}: {n}"),
            }
        }
        println!(
            "  rates        {:.1} handshakes/s  {:.1} requests/s  {:.2} MB/s body",
            self.handshakes_per_s,
            self.requests_per_s,
            self.body_bytes_per_s / 1e6
        );
        let l = &self.latency_us;
        println!(
            "  latency µs   p50={} p90={} p99={} max={} (n={})",
            l.p50, l.p90, l.p99, l.max, l.count
        );
        let h = &self.handshake_latency_us;
        println!(
            "  handshake µs p50={} p90={} p99={} max={}",
            h.p50, h.p90, h.p99, h.max
        );
        println!(
            "  generator    cpu={} µs/{}  busy={:.2} cores",
            opt(self.generator.us_per_unit),
            self.unit,
            self.generator.cores_busy
        );
        if let Some(s) = &self.server {
            println!(
                "  server       cpu={} µs/{} (kernel {})  busy={:.2} cores  rss={} → {} KiB",
                opt(s.cpu.us_per_unit),
                self.unit,
                opt(s.system_us_per_unit),
                s.cpu.cores_busy,
                s.rss_kib_before,
                s.rss_kib_after
            );
            if let (Some(loaded), Some(per)) = (s.rss_kib_loaded, s.rss_bytes_per_connection) {
                println!(
                    "  server idle  rss={loaded} KiB with all open, {per:.0} bytes/connection"
                );
            }
        }
        println!("  limit        {} (the busier side)", self.limit());
    }

    /// One line; the columns are named in `scripts/bench-tlsgate.sh`. Error details go to
    /// standard error so the line stays one line.
    pub fn print_row(&self) {
        for (kind, example) in &self.error_examples {
            eprintln!("first {kind} error: {example}");
        }
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        let (srv_us, srv_busy) = match &self.server {
            Some(s) => (opt(s.cpu.us_per_unit), format!("{:.2}", s.cpu.cores_busy)),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let rate = if self.unit == "request" {
            self.requests_per_s
        } else {
            self.handshakes_per_s
        };
        println!(
            "{:<7} {:<4} {:<15} {:>4} {:>8} {:>6} {:>10.1} {:>7} {:>7} {:>8} {:>9} {:>9} {:>6.2} {:>6} {:>8.1} {:<9}",
            self.mode,
            self.tls,
            self.group,
            self.concurrency,
            self.connections_ok,
            self.errors_total,
            rate,
            self.latency_us.p50,
            self.latency_us.p99,
            self.latency_us.max,
            opt(self.generator.us_per_unit),
            srv_us,
            self.generator.cores_busy,
            srv_busy,
            self.body_bytes_per_s / 1e6,
            self.limit(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_rank() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        let l = Latency::of(&mut v);
        assert_eq!(
            (l.p50, l.p90, l.p99, l.max, l.count),
            (50, 90, 99, 100, 100)
        );
        assert_eq!(Latency::of(&mut []).count, 0);
    }
}
