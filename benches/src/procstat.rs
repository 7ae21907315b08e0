//! CPU time and memory of processes, read from /proc, and CPU pinning.
//!
//! Both sides are measured the same way (utime+stime from /proc/PID/stat, clock ticks), so the
//! generator's and the server's CPU per handshake compare directly.

use std::fs;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// One reading of a process's CPU time and resident memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu: Duration,
    /// The system (kernel) part of `cpu`: syscalls, TCP, interrupts charged to the process.
    pub system: Duration,
    pub rss_kib: u64,
}

/// CPU time (user + system, all threads) and VmRSS of `pid`; `None` reads this process.
pub fn sample(pid: Option<u32>) -> Result<Sample> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}"),
        None => "/proc/self".to_owned(),
    };
    let stat =
        fs::read_to_string(format!("{dir}/stat")).with_context(|| format!("read {dir}/stat"))?;
    let status = fs::read_to_string(format!("{dir}/status"))
        .with_context(|| format!("read {dir}/status"))?;
    let (user, system) = cpu_from_stat(&stat, rustix::param::clock_ticks_per_second())
        .with_context(|| format!("parse {dir}/stat"))?;
    Ok(Sample {
        cpu: user + system,
        system,
        rss_kib: rss_from_status(&status).unwrap_or(0),
    })
}

/// CPU time (user + system) of this whole process, every thread (finished ones included), from
/// the kernel's process CPU clock: nanosecond resolution, where /proc/PID/stat counts 10 ms ticks.
pub fn own_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Sums samples of several processes (a master and its workers).
pub fn sample_all(pids: &[u32]) -> Result<Sample> {
    let mut total = Sample::default();
    for pid in pids {
        let s = sample(Some(*pid))?;
        total.cpu += s.cpu;
        total.system += s.system;
        total.rss_kib += s.rss_kib;
    }
    Ok(total)
}

/// User and system CPU time from a /proc/PID/stat line.
fn cpu_from_stat(stat: &str, ticks_per_second: u64) -> Result<(Duration, Duration)> {
    // The command name (field 2) may hold spaces and parentheses: fields start after the last ')'.
    let Some(close) = stat.rfind(')') else {
        bail!("no ')' in stat line");
    };
    let fields: Vec<&str> = stat[close + 1..].split_ascii_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15 (1-based, proc(5)).
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .context("stat line too short")?
            .parse::<u64>()
            .context("non-numeric stat field")
    };
    if ticks_per_second == 0 {
        bail!("clock tick rate is 0");
    }
    let time = |ticks: u64| Duration::from_micros(ticks * 1_000_000 / ticks_per_second);
    Ok((time(field(14)?), time(field(15)?)))
}

fn rss_from_status(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Pins the calling thread (and so every thread it spawns later) to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    if cpu >= rustix::thread::CpuSet::MAX_CPU {
        bail!("--pin-cpu {cpu} is beyond the largest CPU number supported");
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).with_context(|| format!("pin to CPU {cpu}"))
}

/// Raises the open-file limit to its hard maximum; idle mode holds one socket per connection.
pub fn raise_fd_limit() -> Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim).context("raise RLIMIT_NOFILE")?;
    }
    Ok(lim.current.unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let line = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0 0";
        assert_eq!(
            cpu_from_stat(line, 100).expect("valid"),
            (Duration::from_millis(2500), Duration::from_millis(500))
        );
    }

    #[test]
    fn this_process_is_readable() {
        let s = sample(None).expect("own /proc entry");
        assert!(s.rss_kib > 0);
    }

    #[test]
    fn own_cpu_moves_with_work() {
        let before = own_cpu();
        let mut x = 0u64;
        while own_cpu() - before < Duration::from_millis(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(own_cpu() > before);
    }

    #[test]
    fn status_rss() {
        assert_eq!(rss_from_status("Name:\tx\nVmRSS:\t  1234 kB\n"), Some(1234));
    }
}
