//! `tlsgate-load`: a TLS load generator for tlsgate and the servers it is compared with.
//!
//! Blocking sockets, one thread per concurrency slot, one rustls client configuration built
//! once. CPU per handshake is taken from /proc for both the generator and the server, so a
//! reader can see which side limited the rate.
#![forbid(unsafe_code)]

mod cli;
mod conn;
mod procstat;
mod runner;
mod stats;
mod tls;

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::cli::{Args, Mode, Output, TlsVersion};
use crate::conn::{build_request, Endpoint};
use crate::runner::{Outcome, Plan};
use crate::stats::{Cpu, Latency, Report, ServerSide};

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(cpu) = args.pin_cpu {
        procstat::pin_to_cpu(cpu)?;
    }
    if args.mode == Mode::Idle {
        procstat::raise_fd_limit()?;
    }
    let plan = Arc::new(plan(&args)?);
    let base = tls::client_config(&args)?;
    let configs = (0..args.concurrency)
        .map(|_| tls::for_slot(&base, &args))
        .collect();
    let outcome = runner::run(plan.clone(), configs)?;
    let report = report(&args, outcome);

    if let Some(server) = &report.server {
        // A server that did the handshakes cannot have used no CPU: the PID is a wrapper
        // (a shell, `timeout`) rather than the process that serves.
        if server.cpu.cpu_us == 0 && report.units >= 100 {
            eprintln!(
                "warning: the CPU time of --server-pid {:?} did not move during {} {}s; \
                 is it the process that serves (not a shell or wrapper around it)?",
                server.pids, report.units, report.unit
            );
        }
    }
    match args.output {
        Output::Human => report.print_human(),
        Output::Row => report.print_row(),
        Output::None => {}
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).context("serialise report")?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("write --json {}", path.display()))?;
    }
    if report.units == 0 {
        bail!("no connection or request succeeded");
    }
    Ok(())
}

fn micros_u64(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn seconds(what: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("{what} {v} is not a valid number of seconds"))
}

fn plan(args: &Args) -> Result<Plan> {
    let addr = args
        .target
        .to_socket_addrs()
        .with_context(|| format!("resolve --target {}", args.target))?
        .next()
        .with_context(|| format!("--target {} resolves to no address", args.target))?;
    let path = match (&args.path, args.response_bytes) {
        (Some(p), _) => p.clone(),
        (None, Some(n)) => format!("/bytes/{n}"),
        (None, None) => "/".to_owned(),
    };
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        bail!("--path {path:?} must start with '/' and hold no spaces or control characters");
    }
    if args.mode != Mode::Bulk && args.requests.is_some() {
        bail!(
            "--requests bounds bulk mode only; use --connections for {}",
            args.mode.name()
        );
    }
    Ok(Plan {
        ep: Endpoint {
            addr,
            server_name: tls::server_name(&args.sni)?,
            timeout: seconds("--timeout", args.timeout)?,
        },
        mode: args.mode,
        max_connections: args.connections,
        max_requests: args.requests,
        duration: seconds("--duration", args.duration)?,
        request: build_request(
            &args.sni,
            &path,
            args.mode == Mode::Bulk,
            args.request_bytes,
        ),
        expect_body: args.response_bytes,
        hold: seconds("--hold", args.hold)?,
        server_pids: args.server_pids.clone(),
        server_closes: args.server_closes,
    })
}

fn report(args: &Args, mut o: Outcome) -> Report {
    let secs = o.elapsed.as_secs_f64().max(1e-9);
    let connections_ok = match args.mode {
        Mode::Full | Mode::Resume | Mode::Idle => o.stats.latency_us.len() as u64,
        Mode::Bulk => o.stats.handshake_us.len() as u64,
    };
    let (unit, units) = match args.mode {
        Mode::Bulk => ("request", o.stats.requests),
        _ => ("handshake", connections_ok),
    };
    let server = match (o.server_before, o.server_loaded) {
        (Some(before), Some(loaded)) => {
            let after = o.server_after.unwrap_or(loaded);
            let idle = o.idle_open.filter(|&n| n > 0);
            Some(ServerSide {
                pids: args.server_pids.clone(),
                cpu: Cpu::new(loaded.cpu.saturating_sub(before.cpu), o.elapsed, units),
                system_cpu_us: micros_u64(loaded.system.saturating_sub(before.system)),
                system_us_per_unit: (units > 0).then(|| {
                    micros_u64(loaded.system.saturating_sub(before.system)) as f64 / units as f64
                }),
                rss_kib_before: before.rss_kib,
                rss_kib_after: after.rss_kib,
                rss_kib_loaded: idle.map(|_| loaded.rss_kib),
                rss_bytes_per_connection: idle
                    .map(|n| (loaded.rss_kib as f64 - before.rss_kib as f64) * 1024.0 / n as f64),
            })
        }
        _ => None,
    };
    let errors: std::collections::BTreeMap<&'static str, u64> =
        o.stats.errors.iter().map(|(k, v)| (k.name(), *v)).collect();
    let error_examples = o
        .stats
        .error_examples
        .iter()
        .map(|(k, v)| (k.name(), v.clone()))
        .collect();
    Report {
        mode: args.mode.name(),
        target: args.target.clone(),
        sni: args.sni.clone(),
        tls: match args.tls {
            Some(TlsVersion::V12) => "1.2",
            Some(TlsVersion::V13) => "1.3",
            None => "any",
        }
        .to_owned(),
        group: args.group.name(),
        concurrency: args.concurrency,
        elapsed_s: o.elapsed.as_secs_f64(),
        unit,
        units,
        connections_ok,
        full_handshakes: o.stats.full_handshakes,
        resumed_handshakes: o.stats.resumed_handshakes,
        requests: o.stats.requests,
        body_bytes: o.stats.body_bytes,
        unclean_closes: o.stats.unclean_closes,
        errors_total: errors.values().sum(),
        errors,
        error_examples,
        negotiated: o
            .stats
            .negotiated
            .iter()
            .map(|(k, v)| (k.describe(), *v))
            .collect(),
        handshakes_per_s: connections_ok as f64 / secs,
        requests_per_s: o.stats.requests as f64 / secs,
        body_bytes_per_s: o.stats.body_bytes as f64 / secs,
        latency_us: Latency::of(&mut o.stats.latency_us),
        handshake_latency_us: Latency::of(&mut o.stats.handshake_us),
        generator: Cpu::new(o.generator_cpu, o.elapsed, units),
        server,
        idle_open: o.idle_open,
    }
}
