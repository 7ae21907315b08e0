//! The appliance in front of a slow or failing HSM: the real `tlsgate` binary on a SoftHSM2 token
//! reached through the fault-injecting PKCS#11 shim (`tlsgate-pkcs11-shim`), which adds latency
//! to `C_Sign` or fails it with chosen CKR codes, changed at run time through a control file.

mod common;
mod hsm_faults_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::{drivers, metric};

use hsm_faults_support::*;

#[test]
fn a_slow_hsm_does_not_stall_established_connections() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let delay = format!("delay C_Sign {SIGN_DELAY}\n");
    for io in drivers() {
        // One appliance, offloading, under one continuous load: SoftHSM2 as it is (the baseline
        // this machine gives today) and the same token 20 ms slower per signature, switched
        // through the shim's live control file in alternating one-second segments, four rounds,
        // so both phases share whatever else the machine is doing.
        let app = start(io, false, "")?;
        let runs = measure(&app, &["", &delay], 4, Duration::from_secs(1))?;
        let (base, off) = (&runs[0], &runs[1]);
        let text = scrape(&app.metrics)?;
        let signed = metric(&text, "tlsgate_key_ops_total", &["result=\"ok\""]);
        drop(app);

        let app = start(io, true, &delay)?;
        let runs = measure(&app, &[&delay], 1, Duration::from_secs(2))?;
        let inl = &runs[0];
        for (what, r) in [
            ("offloaded, SoftHSM2 as is (baseline)", base),
            ("offloaded, C_Sign +20 ms", off),
            ("danger_inline_key_ops, C_Sign +20 ms", inl),
        ] {
            println!(
                "{io} {what}: probe p99 {:?} over {} round trips, {:.0} full handshakes/s with {IN_FLIGHT} in flight",
                r.p99, r.probes, r.rate
            );
        }
        ensure!(signed > 0.0, "{io}: no key operation counted:\n{text}");
        // Every bound is a relation between runs of this test on this machine. Offloaded, a
        // 20 ms HSM costs the established connection about nothing: p99 within 3x of the
        // baseline's under the same load (1 ms granted for scheduling noise on a quiet run).
        ensure!(
            off.p99 <= 3 * base.p99.max(Duration::from_millis(1)),
            "{io}: offloaded probe p99 {:?} vs baseline {:?}",
            off.p99,
            base.p99
        );
        // Inline signing stalls the core for every signature: the probe waits behind them and
        // one core cannot sustain more than 1 / 20 ms = 50 handshakes/s.
        ensure!(
            inl.p99 >= 2 * off.p99,
            "{io}: inline probe p99 {:?} should show the stall (offloaded {:?})",
            inl.p99,
            off.p99
        );
        ensure!(
            inl.rate * 3.0 < off.rate,
            "{io}: inline {:.0}/s vs offloaded {:.0}/s",
            inl.rate,
            off.rate
        );
    }
    Ok(())
}

fn one_handshake(app: &Appliance) -> Result<()> {
    let config = client_config(&app.lab)?;
    let mut t = connect(app.serve.port, &config)?;
    handshake(&mut t)?;
    get(&mut t)
}

#[test]
fn hsm_errors_fail_those_handshakes_and_clear_without_a_restart() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let io = "portable";
    let app = start(io, false, "")?;
    one_handshake(&app).context("healthy HSM")?;
    for code in [
        "CKR_DEVICE_ERROR",
        "CKR_SESSION_HANDLE_INVALID",
        "CKR_TOKEN_NOT_PRESENT",
    ] {
        let before = scrape(&app.metrics)?;
        let failed_before = metric(&before, "tlsgate_key_ops_total", &["result=\"failed\""]);
        set_faults(&app.control, &format!("fail C_Sign {code}\n"))?;
        for _ in 0..3 {
            ensure!(
                one_handshake(&app).is_err(),
                "{code}: a handshake succeeded while C_Sign fails"
            );
        }
        // Counters are flushed about once a second.
        let start = Instant::now();
        loop {
            let text = scrape(&app.metrics)?;
            let failed = metric(&text, "tlsgate_key_ops_total", &["result=\"failed\""]);
            if failed >= failed_before + 3.0 {
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("{code}: failed key ops went {failed_before} -> {failed}:\n{text}");
            }
            thread::sleep(Duration::from_millis(100));
        }
        set_faults(&app.control, "")?;
        // A device-level code takes the token out of service until the background recovery
        // has found it healthy again: within 5 s of the fault clearing, never a restart.
        let cleared = Instant::now();
        loop {
            match one_handshake(&app) {
                Ok(()) => break,
                Err(e) if cleared.elapsed() > Duration::from_secs(5) => {
                    return Err(e.context(format!("5 s after clearing {code}")))
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    Ok(())
}

/// The serve process's resident memory, from /proc.
fn rss_bytes(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// Closed-loop full-handshake clients for `run_for`; (attempts, successes).
fn overload(app: &Appliance, clients: usize, run_for: Duration) -> Result<(u64, u64)> {
    let config = client_config(&app.lab)?;
    let port = app.serve.port;
    let stop = Arc::new(AtomicBool::new(false));
    let (attempts, ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, attempts, ok, config) =
                (stop.clone(), attempts.clone(), ok.clone(), config.clone());
            thread::spawn(move || {
                pin_client_thread();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut t) = connect(port, &config) {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        if handshake(&mut t).is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    thread::sleep(run_for);
    stop.store(true, Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    Ok((attempts.load(Ordering::Relaxed), ok.load(Ordering::Relaxed)))
}

/// `tlsgate_hsm_ops_total` by outcome, once the pool is empty and two scrapes a flush apart agree.
fn settled_ops(app: &Appliance) -> Result<(String, [f64; 6])> {
    let read = |text: &str| {
        ["ok", "error", "unavailable", "timeout", "late", "shed"].map(|o| {
            metric(
                text,
                "tlsgate_hsm_ops_total",
                &[&format!("outcome=\"{o}\"")],
            )
        })
    };
    let start = Instant::now();
    let mut last = None;
    loop {
        let text = scrape(&app.metrics)?;
        let now = read(&text);
        let idle = metric(&text, "tlsgate_key_op_queue_depth", &[]) == 0.0;
        if idle && last == Some(now) {
            return Ok((text, now));
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "counters never settled:\n{text}"
        );
        last = Some(now);
        thread::sleep(Duration::from_millis(1500));
    }
}

#[test]
fn a_slow_hsm_at_its_budget_sheds_and_counts_without_collapse() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A 50 ms HSM with a budget of 4 signatures at once and 8 more waiting: 32 clients offer far
    // more than its 80 signatures a second.
    let app = start_with(
        "portable",
        false,
        "delay C_Sign 50ms\n",
        "workers = 4\nqueue_depth = 8\nmax_in_flight_per_core = 12\ndeadline_ms = 5000",
    )?;
    let config = client_config(&app.lab)?;
    let mut probe = connect(app.serve.port, &config)?;
    handshake(&mut probe)?;
    let mut base = Vec::new();
    for _ in 0..50 {
        let t0 = Instant::now();
        get(&mut probe)?;
        base.push(t0.elapsed());
    }

    let (attempts1, ok1) = overload(&app, 32, Duration::from_secs(3))?;
    let rss1 = rss_bytes(app.serve.pid())?;
    // A second, identical overload with the established connection in use throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        thread::spawn(move || -> Result<Vec<Duration>> {
            let mut rtts = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                get(&mut probe)?;
                rtts.push(t0.elapsed());
            }
            Ok(rtts)
        })
    };
    let (attempts2, ok2) = overload(&app, 32, Duration::from_secs(3))?;
    stop.store(true, Ordering::Relaxed);
    let loaded = prober
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
        .context("the established connection failed during the overload")?;
    let rss2 = rss_bytes(app.serve.pid())?;

    let (text, [ok, error, unavailable, timeout, late, shed]) = settled_ops(&app)?;
    let p99 = |mut v: Vec<Duration>| {
        v.sort();
        v[(v.len() * 99 / 100).min(v.len() - 1)]
    };
    let (base99, loaded99) = (p99(base), p99(loaded.clone()));
    let attempts = attempts1 + attempts2 + 1;
    println!(
        "attempts {attempts} (ok {}), hsm ok {ok} error {error} unavailable {unavailable} timeout {timeout} late {late} shed {shed}; probe p99 {base99:?} -> {loaded99:?} over {} round trips; rss {rss1} -> {rss2}",
        ok1 + ok2 + 1,
        loaded.len()
    );
    ensure!(shed > 0.0, "nothing shed at the budget:\n{text}");
    ensure!(ok1 + ok2 > 0, "no full handshake completed under overload");
    // Every full handshake offered went exactly one way; a late signature is also an ok one.
    ensure!(
        ok + error + unavailable + timeout + shed == attempts as f64,
        "counters do not add up to the {attempts} handshakes offered:\n{text}"
    );
    ensure!(
        ok == (ok1 + ok2 + 1) as f64 + late,
        "the HSM signed {ok}, the clients completed {} (+ {late} late):\n{text}",
        ok1 + ok2 + 1
    );
    ensure!(
        loaded99 <= 3 * base99.max(Duration::from_millis(1)),
        "established connection p99 {loaded99:?} under overload vs {base99:?} before"
    );
    // Shedding instead of queueing: a second overload leaves memory where the first did.
    ensure!(
        rss2 <= rss1 + rss1 / 4,
        "memory grew from {rss1} to {rss2} bytes over a second overload"
    );
    Ok(())
}

#[test]
fn isolated_device_errors_below_the_breaker_threshold_keep_the_token_in_service() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Every 5th signature answers CKR_DEVICE_ERROR: never 5 in a row, so with the default
    // breaker (5 device errors in a row) those handshakes fail and the token stays in service.
    let mut app = start_with(
        "portable",
        false,
        "fail C_Sign CKR_DEVICE_ERROR every 5\n",
        "workers = 4\nqueue_depth = 64\nmax_in_flight_per_core = 64\ndeadline_ms = 5000",
    )?;
    let (attempts, client_ok) = overload(&app, 8, Duration::from_secs(3))?;
    set_faults(&app.control, "")?;
    let (text, [ok, error, unavailable, timeout, late, shed]) = settled_ops(&app)?;
    let recoveries = metric(&text, "tlsgate_hsm_recoveries_total", &[]);
    println!(
        "attempts {attempts} (ok {client_ok}); hsm ok {ok} error {error} unavailable {unavailable} timeout {timeout} late {late} shed {shed}; recoveries {recoveries}"
    );
    ensure!(
        app.serve.guard.child.try_wait()?.is_none(),
        "serve died under intermittent device errors"
    );
    ensure!(
        error >= 2.0,
        "device errors did not reach signatures:\n{text}"
    );
    ensure!(
        unavailable == 0.0 && recoveries == 0.0,
        "isolated device errors took the token out of service:\n{text}"
    );
    ensure!(
        metric(&text, "tlsgate_hsm_breaker_state", &[]) == 0.0,
        "breaker not closed:\n{text}"
    );
    ensure!(client_ok > 0, "no handshake completed");
    ensure!(
        ok + error + unavailable + timeout + shed == attempts as f64,
        "counters do not add up to the {attempts} handshakes offered:\n{text}"
    );
    ensure!(
        ok == client_ok as f64 + late,
        "the HSM signed {ok}, the clients completed {client_ok} (+ {late} late):\n{text}"
    );
    one_handshake(&app)?;
    Ok(())
}

/// Samples `name{token="…"}` for each token from the metrics endpoint every 200 ms until
/// `stop`; the largest value seen per token.
fn sample_max(
    addr: String,
    name: &'static str,
    tokens: &'static [&'static str],
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<f64>> {
    thread::spawn(move || {
        let mut max = vec![0.0f64; tokens.len()];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(text) = scrape(&addr) {
                for (i, t) in tokens.iter().enumerate() {
                    let v = metric(&text, name, &[&format!("token=\"{t}\"")]);
                    max[i] = max[i].max(v);
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        max
    })
}

#[test]
fn the_breaker_opens_after_k_device_errors_in_a_row_fails_fast_and_closes() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const K: f64 = 3.0;
    // Every signature fails: each outage lets exactly K device errors through, then handshakes
    // fail at once (unavailable) until a half-open attempt closes the breaker again.
    let mut app = start_full(
        "portable",
        false,
        "fail C_Sign CKR_DEVICE_ERROR\n",
        "workers = 4\nqueue_depth = 64\nmax_in_flight_per_core = 64\ndeadline_ms = 5000",
        "breaker_errors = 3\nprobe_interval_ms = 0",
        None,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let breaker = sample_max(
        app.metrics.clone(),
        "tlsgate_hsm_breaker_state",
        &["lab"],
        stop.clone(),
    );
    let (attempts, client_ok) = overload(&app, 4, Duration::from_secs(3))?;
    // One more second of sampling: the gauge is published once a second.
    thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::Relaxed);
    let breaker_max = breaker
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?[0];
    set_faults(&app.control, "")?;
    // Closed again once the faults stop.
    let start = Instant::now();
    loop {
        let text = scrape(&app.metrics)?;
        if metric(&text, "tlsgate_hsm_up", &[]) == 1.0
            && metric(&text, "tlsgate_hsm_breaker_state", &[]) == 0.0
        {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the breaker stayed open after the faults stopped:\n{text}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    one_handshake(&app)?;
    let (text, [ok, error, unavailable, timeout, late, shed]) = settled_ops(&app)?;
    let recoveries = metric(&text, "tlsgate_hsm_recoveries_total", &[]);
    println!(
        "attempts {attempts} (ok {client_ok}); hsm ok {ok} error {error} unavailable {unavailable} timeout {timeout} late {late} shed {shed}; recoveries {recoveries}; breaker max {breaker_max}"
    );
    ensure!(
        app.serve.guard.child.try_wait()?.is_none(),
        "serve died under device errors"
    );
    ensure!(
        client_ok == 0,
        "a handshake succeeded while every C_Sign failed"
    );
    ensure!(
        breaker_max >= 1.0,
        "the breaker was never seen open or half-open"
    );
    ensure!(recoveries >= 1.0, "the breaker never closed again:\n{text}");
    // K errors in a row open it, and only they (plus signatures already under way on the other
    // workers) reach the token per outage: the rest fail fast.
    ensure!(
        error >= K * recoveries && error <= (K + 3.0) * recoveries,
        "{error} device errors for {recoveries} outages with breaker_errors = {K}:\n{text}"
    );
    ensure!(
        unavailable > error,
        "handshakes did not fail fast while the breaker was open:\n{text}"
    );
    ensure!(
        timeout == 0.0,
        "handshakes waited for the deadline:\n{text}"
    );
    // The one handshake after the faults stopped is ok.
    ensure!(
        ok + error + unavailable + timeout + shed == (attempts + 1) as f64,
        "counters do not add up to the {attempts} + 1 handshakes offered:\n{text}"
    );
    Ok(())
}

#[test]
fn each_token_keeps_to_its_in_flight_budget_and_the_rest_is_shed() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The second token and the shared key need these (SKIPPED, or a failure under CI=true).
    if !common::require("softhsm2-util", "softhsm2") || !common::require("openssl", "openssl") {
        return Ok(());
    }
    const BUDGET: f64 = 2.0;
    // Two 50 ms tokens with a budget of 2 each, 8 workers: without a budget per token up to 8
    // signatures would sit on them at once. 32 clients offer more than the 80/s they sign.
    let app = start_full(
        "portable",
        false,
        "delay C_Sign 50ms\n",
        "workers = 8\nqueue_depth = 8\nmax_in_flight_per_core = 16\ndeadline_ms = 5000",
        "max_inflight = 2\nprobe_interval_ms = 0",
        Some("max_inflight = 2"),
    )?;
    let config = client_config(&app.lab)?;
    let mut probe = connect(app.serve.port, &config)?;
    handshake(&mut probe)?;
    let mut base = Vec::new();
    for _ in 0..30 {
        let t0 = Instant::now();
        get(&mut probe)?;
        base.push(t0.elapsed());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let inflight = sample_max(
        app.metrics.clone(),
        "tlsgate_hsm_inflight",
        &["lab", "lab-b"],
        stop.clone(),
    );
    let prober = {
        let stop = stop.clone();
        thread::spawn(move || -> Result<Vec<Duration>> {
            let mut rtts = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                get(&mut probe)?;
                rtts.push(t0.elapsed());
            }
            Ok(rtts)
        })
    };
    let (attempts, client_ok) = overload(&app, 32, Duration::from_secs(4))?;
    stop.store(true, Ordering::Relaxed);
    let max = inflight
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    let loaded = prober
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
        .context("the established connection failed during the overload")?;
    let (text, [ok, error, unavailable, timeout, late, shed]) = settled_ops(&app)?;
    let p99 = |mut v: Vec<Duration>| {
        v.sort();
        v[(v.len() * 99 / 100).min(v.len() - 1)]
    };
    let (base99, loaded99) = (p99(base), p99(loaded));
    let attempts = attempts + 1;
    println!(
        "attempts {attempts} (ok {}); hsm ok {ok} error {error} unavailable {unavailable} timeout {timeout} late {late} shed {shed}; inflight max {max:?}; probe p99 {base99:?} -> {loaded99:?}",
        client_ok + 1
    );
    for (t, m) in ["lab", "lab-b"].iter().zip(&max) {
        ensure!(
            *m <= BUDGET,
            "token {t} had {m} calls in flight, budget {BUDGET}"
        );
        ensure!(*m >= 1.0, "token {t} never signed under load:\n{text}");
    }
    ensure!(
        shed > 0.0,
        "nothing shed with every token at its budget:\n{text}"
    );
    ensure!(timeout == 0.0, "handshakes piled up into timeouts:\n{text}");
    ensure!(
        ok + error + unavailable + timeout + shed == attempts as f64,
        "counters do not add up to the {attempts} handshakes offered:\n{text}"
    );
    ensure!(
        loaded99 <= 3 * base99.max(Duration::from_millis(5)),
        "established connection p99 {loaded99:?} under overload vs {base99:?} before"
    );
    Ok(())
}
