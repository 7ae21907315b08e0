//! The file-descriptor budget. Each proxied connection holds two descriptors (client and
//! backend); the rest of the process (the PKCS#11 module, which may open token files per
//! session, the state directory and audit log, the API and metrics listeners and their clients,
//! each core's listening sockets, ring and eventfd) needs a reserve that accept must never eat.
//!
//! At start `tlsgate serve` raises its soft `RLIMIT_NOFILE` to the hard limit and checks that
//! `cores × (2 × max_connections_per_core + per-core sockets) + reserve` fits. A default
//! `max_connections_per_core` is lowered to fit (logged); a value the file sets is refused with
//! the numbers unless `[process] fit_connections_to_fd_limit = true`. Since accept pauses at
//! `max_connections_per_core`, the reserve stays free under any connection flood.

use anyhow::{bail, Context, Result};
use rustix::process::{getrlimit, setrlimit, Resource};
use tlsgate_dataplane::DataplaneConfig;

/// Descriptors kept for everything but the connections.
pub const RESERVE: u64 = 256;
/// Per core beyond its connections: the ring or epoll, eventfds, timers, slack.
pub const PER_CORE: u64 = 16;
/// Descriptors per proxied connection (client socket and backend socket).
pub const PER_CONNECTION: u64 = 2;

/// Raises the soft descriptor limit to the hard one; returns the soft limit now in force.
pub fn raise_soft_limit() -> Result<u64> {
    let mut lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum;
    if lim.current != hard {
        lim.current = hard;
        setrlimit(Resource::Nofile, lim).context("raising RLIMIT_NOFILE to its hard limit")?;
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

/// Descriptors `cfg` needs with `listeners` listeners, the reserve included.
pub fn needed(cfg: &DataplaneConfig, listeners: usize) -> u64 {
    let cores = cfg.cores.len() as u64;
    let per_core = PER_CONNECTION
        .saturating_mul(cfg.limits.max_connections_per_core as u64)
        .saturating_add(listeners as u64)
        .saturating_add(PER_CORE);
    cores.saturating_mul(per_core).saturating_add(RESERVE)
}

/// Makes `cfg` fit `limit` descriptors. `chosen`: the file sets `max_connections_per_core`;
/// `allow_lower`: `[process] fit_connections_to_fd_limit`. Returns what was lowered, to log.
pub fn fit(
    cfg: &mut DataplaneConfig,
    listeners: usize,
    limit: u64,
    chosen: bool,
    allow_lower: bool,
) -> Result<Option<String>> {
    let need = needed(cfg, listeners);
    if need <= limit {
        return Ok(None);
    }
    let cores = cfg.cores.len().max(1) as u64;
    let per_core_room = limit.saturating_sub(RESERVE) / cores;
    let fits = per_core_room.saturating_sub(listeners as u64 + PER_CORE) / PER_CONNECTION;
    let explain = format!(
        "{cores} core(s) × (2 × {} connections + {} sockets) + a reserve of {RESERVE} = {need} file \
         descriptors, but the process may open {limit}",
        cfg.limits.max_connections_per_core,
        listeners as u64 + PER_CORE,
    );
    if fits == 0 {
        bail!("{explain}: not even one connection per core fits; raise LimitNOFILE / ulimit -n");
    }
    if chosen && !allow_lower {
        bail!(
            "[dataplane.limits] max_connections_per_core: {explain}. Set it to {fits} or less, \
             raise the limit (LimitNOFILE, ulimit -n), or set [process] \
             fit_connections_to_fd_limit = true"
        );
    }
    let was = cfg.limits.max_connections_per_core;
    cfg.limits.max_connections_per_core = usize::try_from(fits).unwrap_or(usize::MAX);
    Ok(Some(format!(
        "max_connections_per_core lowered from {was} to {fits} to fit the file-descriptor limit: \
         {explain}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cores: usize, conns: usize) -> DataplaneConfig {
        let mut c = DataplaneConfig::new((0..cores).collect());
        c.limits.max_connections_per_core = conns;
        c
    }

    #[test]
    fn what_fits_is_left_alone() {
        let mut c = cfg(2, 100);
        let need = needed(&c, 1);
        assert_eq!(need, 2 * (200 + 1 + PER_CORE) + RESERVE);
        assert_eq!(fit(&mut c, 1, need, true, false).expect("fits"), None);
        assert_eq!(c.limits.max_connections_per_core, 100);
    }

    #[test]
    fn a_default_is_lowered_to_fit_and_then_fits() {
        let mut c = cfg(2, 10_000);
        let note = fit(&mut c, 1, 20_000, false, false).expect("lowered");
        assert!(note.is_some_and(|n| n.contains("lowered from 10000")));
        assert!(needed(&c, 1) <= 20_000);
        // One more connection per core would not fit: it is the largest that does.
        c.limits.max_connections_per_core += 1;
        assert!(needed(&c, 1) > 20_000);
    }

    #[test]
    fn a_chosen_value_is_refused_with_the_numbers_unless_allowed() {
        let mut c = cfg(2, 10_000);
        let err = fit(&mut c, 1, 20_000, true, false).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("40290") && msg.contains("20000"), "{msg}");
        assert_eq!(c.limits.max_connections_per_core, 10_000, "unchanged");
        assert!(fit(&mut c, 1, 20_000, true, true)
            .expect("allowed")
            .is_some());
        assert!(needed(&c, 1) <= 20_000);
    }

    #[test]
    fn a_limit_below_the_reserve_is_an_error() {
        let mut c = cfg(1, 10);
        assert!(fit(&mut c, 1, 100, false, true).is_err());
    }
}
