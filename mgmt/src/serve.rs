//! `tlsgate serve`: load the configuration, open the token, start the data plane, and handle
//! signals (SIGTERM/SIGINT drain and exit; SIGHUP reloads certificates for new handshakes).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use tlsgate_dataplane::Snapshot;
use tlsgate_keystore::token::{Token, TokenSelector};

use crate::config::Config;
use crate::snapshot::{Builder, Scope};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The TOML configuration file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Once start-up is over, write `name addr` lines here, for scripts and tests that bind
    /// port 0. The file is created empty before the switch to `[process] user` (so it may lie
    /// where only root can write) and filled in one write once the process serves as it will:
    /// wait for it to be non-empty.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Take the listening sockets, state lock and ticket keys over from the running process of
    /// this configuration (through `<state dir>/handover.sock`), then tell it to drain and exit.
    /// `tlsgate upgrade` starts the new binary with this.
    #[arg(long)]
    pub takeover: bool,
}

/// How the signal loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Exit {
    /// SIGTERM or SIGINT: drain and exit; the API socket file goes.
    Stop,
    /// A new process took over (binary upgrade): drain and exit, leaving it every path.
    HandedOver,
}

/// Runs the appliance until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    // Before the PIN is read or any key reaches this process.
    crate::hardening::apply(&config.process)?;
    // Looked up now, while the user database can be read; the state directory must be theirs.
    let switch_to = match &config.process.user {
        Some(user) => Some(crate::privileges::resolve(
            user,
            config.process.group.as_deref(),
        )?),
        None => None,
    };
    if let (Some(target), Some(dir)) = (&switch_to, crate::api::state_dir(&config)) {
        crate::privileges::prepare_state_dir(&dir, target)?;
    }
    // A binary upgrade takes the running process's sockets, lock and ticket keys first; its
    // failure (no process to take over from) stops here with nothing changed.
    let mut inherited = if args.takeover {
        Some(crate::upgrade::take(&config)?)
    } else {
        None
    };
    // First of all: a second process on the same state directory stops here, before it binds
    // or changes anything. Held until this function returns (the process ends). A takeover
    // holds the same lock (the same open file) as the process it replaces.
    let state_lock = match inherited.as_mut().and_then(|i| i.lock.take()) {
        Some(fd) => Some(crate::state::StateLock::inherited(fd)?),
        None => crate::api::state_dir(&config)
            .map(|dir| crate::state::lock(&dir))
            .transpose()?,
    };
    // Before the token opens: a PKCS#11 module may open files per session.
    let fd_limit = crate::fdlimit::raise_soft_limit()?;
    // The Landlock ruleset, before any thread starts: each thread tlsgate starts from here on
    // restricts itself first; this one does once start-up is over (see `crate::sandbox`).
    let plan = crate::config::landlock::plan(&config)?;
    if let Some(sandbox) = crate::sandbox::build(&plan, config.process.landlock)? {
        crate::sandbox::publish(sandbox);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(|| crate::sandbox::enter_thread("tokio-blocking"))
        .build()
        .context("cannot start the management runtime")?;
    // The socket a later upgrade connects to: the one the replaced process had, or a new one.
    let handover = match (
        inherited.as_mut().and_then(|i| i.handover.take()),
        &state_lock,
    ) {
        (Some(l), _) => Some(crate::upgrade::unix_on(&rt, l)?),
        (None, Some(_)) => Some(
            rt.block_on(async { crate::upgrade::bind(&crate::upgrade::socket_path(&config)?) })?,
        ),
        (None, None) => None,
    };
    // The recorder must be in place before the data plane's cores first flush their counters.
    let metrics = match &config.metrics {
        Some(m) => {
            let handle = crate::metrics_http::install()?;
            let (listener, addr) = match inherited.as_mut().and_then(|i| i.metrics.take()) {
                Some(l) => crate::upgrade::tcp_on(&rt, l)?,
                None => rt.block_on(crate::metrics_http::bind(m.listen))?,
            };
            Some((handle, listener, addr, m.max_connections))
        }
        None => None,
    };
    // With `start_degraded`, a token that cannot be opened now is opened in the background and
    // arrives on `token_rx`; until then its certificates refuse full handshakes at once.
    let degraded_refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (token, token_rx) = match open_token(&config) {
        Ok(token) => (token, None),
        Err(e) if config.pkcs11.as_ref().is_some_and(|p| p.start_degraded) => {
            tracing::warn!(
                error = %format!("{e:#}"),
                "starting DEGRADED ([pkcs11] start_degraded = true): software-key certificates serve; token-key certificates refuse full handshakes until the HSM is reached (tried in the background)"
            );
            (None, Some(spawn_token_opener(&args.config)?))
        }
        Err(e) => return Err(e),
    };
    // The one snapshot builder and the OCSP stapler for the life of the process.
    let stapler = crate::tls::stapler::Stapler::new(config.ocsp.timeout());
    // This appliance's state beyond any one snapshot, with the ticket keys of an upgrade.
    let appliance = crate::appliance::Appliance::new();
    if let Some(i) = inherited.as_mut() {
        appliance.sessions.inherit(std::mem::take(&mut i.tickets));
    }
    let builder = Arc::new(Builder::new(
        appliance.clone(),
        token.clone(),
        stapler.clone(),
        token_rx.is_some().then(|| degraded_refused.clone()),
    ));
    // ACME: the challenges the data plane answers are part of the first snapshot already.
    let acme = crate::acme::Acme::new(&config);
    if let Some(acme) = &acme {
        builder.set_acme_tls_alpn(acme.challenges().data_plane()?);
    }
    // Staples from responders are fetched once before the first snapshot goes live (each fetch
    // within `[ocsp] timeout_ms`, all at once); later ones come from the stapler's own task.
    let prefetch = || !rt.block_on(stapler.refresh_due()).is_empty();
    let (manager, publish_rx, snapshot) = if crate::api::state_dir(&config).is_some() {
        // The management plane owns the authoritative state; it publishes through the signal
        // loop, which owns the data plane.
        let (tx, rx) = tokio::sync::mpsc::channel::<Published>(1);
        let publisher: crate::api::Publisher = Box::new(move |snapshot| {
            let (ack, done) = tokio::sync::oneshot::channel();
            if tx.blocking_send((snapshot, ack)).is_ok() {
                let _ = done.blocking_recv();
            }
        });
        let (manager, snapshot) = crate::api::start_manager(
            Config::load(&args.config)?,
            builder.clone(),
            publisher,
            &prefetch,
        )?;
        (Some(Arc::new(manager)), Some(rx), snapshot)
    } else {
        let mut snapshot = builder.build_committed(&config, Scope::All)?;
        if prefetch() {
            snapshot = builder.build_committed(&config, Scope::All)?;
        }
        (None, None, snapshot)
    };
    let mut dp_config = config.dataplane();
    dp_config.seccomp = config.process.seccomp;
    dp_config.thread_start = Some(crate::sandbox::dataplane_hook());
    dp_config.switch_to = switch_to.as_ref().map(|t| (t.uid, t.gid));
    if let Some(note) = crate::fdlimit::fit(
        &mut dp_config,
        config.listeners.len(),
        fd_limit,
        config.max_connections_set,
        config.process.fit_connections_to_fd_limit,
    )? {
        if config.max_connections_set {
            tracing::warn!("{note}");
        } else {
            tracing::info!("{note}");
        }
    }
    let drain = dp_config.limits.drain_timeout();
    // Threads the cores would otherwise start on first use, before their filter is on.
    crate::mgmt_metrics::start_sign_metrics_flusher();
    let dataplane = match inherited.as_mut() {
        Some(i) => {
            let names: Vec<String> = snapshot.listeners.iter().map(|l| l.name.clone()).collect();
            let sockets = i.listeners_for(&names)?;
            tlsgate_dataplane::start_inherited(dp_config, Arc::new(snapshot), sockets)
        }
        None => tlsgate_dataplane::start(dp_config, Arc::new(snapshot)),
    }
    .context("cannot start the data plane")?;
    // What a later upgrade hands over besides the data plane's sockets.
    let mut kit = match (&state_lock, &handover) {
        (Some(lock), Some(h)) => Some(crate::upgrade::Kit {
            lock: lock.duplicate()?,
            handover: h.as_fd().try_clone_to_owned()?,
            metrics: None,
            api_socket: None,
            api_https: None,
            acme_http01: None,
        }),
        _ => None,
    };
    appliance.pools.refresh(&dataplane);

    let addrs = dataplane.local_addrs();
    if let Some(m) = &manager {
        m.set_bound(&addrs);
    }
    for (name, addr) in &addrs {
        tracing::info!(listener = %name, %addr, driver = dataplane.driver().as_str(), "listening");
    }
    let mut ready: String = addrs.iter().map(|(n, a)| format!("{n} {a}\n")).collect();
    if let Some((handle, listener, addr, max)) = metrics {
        tracing::info!(%addr, "metrics endpoint: GET /metrics");
        ready.push_str(&format!("metrics {addr}\n"));
        if let Some(k) = kit.as_mut() {
            k.metrics = Some(listener.as_fd().try_clone_to_owned()?);
        }
        rt.spawn(crate::metrics_http::serve(listener, handle, max));
    }
    if let (Some(api), Some(manager)) = (&config.api, &manager) {
        let app = crate::api::routes::router(manager.clone());
        if let Some(path) = &api.socket {
            let path = config.resolve(path);
            let taken = inherited
                .as_mut()
                .and_then(|i| i.api_socket.take())
                .filter(|(p, _)| *p == path);
            let listener = match taken {
                Some((_, l)) => crate::upgrade::unix_on(&rt, l)?,
                None => rt.block_on(async { crate::api::bind_unix(&path, api.socket_mode) })?,
            };
            if let Some(k) = kit.as_mut() {
                k.api_socket = Some((path.clone(), listener.as_fd().try_clone_to_owned()?));
            }
            tracing::info!(socket = %path.display(), mode = format!("{:#o}", api.socket_mode), "management API on the unix socket");
            ready.push_str(&format!("api-socket {}\n", path.display()));
            let allow = crate::api::PeerAllowlist::from_config(api);
            tracing::info!(uids = ?allow.uids, gids = ?allow.gids, "management socket peers allowed");
            rt.spawn(crate::api::server::serve_unix(
                listener,
                app.clone(),
                allow,
                api.max_connections,
            ));
        }
        if let Some(listen) = api.listen {
            let tls = crate::api::server::tls_config(api, &config, token.as_ref())?;
            let listener = match inherited.as_mut().and_then(|i| i.api_https.take()) {
                Some(l) => crate::upgrade::tcp_on(&rt, l)?.0,
                None => rt
                    .block_on(tokio::net::TcpListener::bind(listen))
                    .with_context(|| format!("[api] listen: cannot listen on {listen}"))?,
            };
            if let Some(k) = kit.as_mut() {
                k.api_https = Some(listener.as_fd().try_clone_to_owned()?);
            }
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "management API on HTTPS (client certificates required)");
            ready.push_str(&format!("api {addr}\n"));
            rt.spawn(crate::api::server::serve_https(
                listener,
                tls,
                app,
                api.max_connections,
            ));
        }
    }
    // Opened now, while the process may still create it where the user could not; filled
    // once the switch and Landlock are in place (an empty file reads as "not ready yet").
    let ready_out = match &args.ready_file {
        Some(path) => Some(crate::files::create_truncated(path, 0o644)?),
        None => None,
    };
    if let Some(acme) = &acme {
        if let Some(h) = &config.acme_http01 {
            let (listener, addr) = match inherited.as_mut().and_then(|i| i.acme_http01.take()) {
                Some(l) => crate::upgrade::tcp_on(&rt, l)?,
                None => rt.block_on(crate::acme::http01::bind(h.listen))?,
            };
            if let Some(k) = kit.as_mut() {
                k.acme_http01 = Some(listener.as_fd().try_clone_to_owned()?);
            }
            tracing::info!(%addr, redirect_https = h.redirect_https, "ACME http-01 listener");
            ready.push_str(&format!("acme-http01 {addr}\n"));
            rt.spawn(crate::acme::http01::serve(
                listener,
                acme.challenges().clone(),
                h.redirect_https,
            ));
        }
    }
    // Everything that needs root is done: listeners bound, state directory locked, audit log
    // open, the PKCS#11 module loaded and logged in.
    match &switch_to {
        Some(target) => {
            if let Some(dir) = crate::api::state_dir(&config) {
                crate::privileges::chown_tree(&dir, target)?;
            }
            crate::privileges::drop_to(target, config.process.keep_net_bind_service)?;
            tracing::info!(
                user = %target.name,
                uid = target.uid,
                gid = target.gid,
                capabilities = if config.process.keep_net_bind_service { "CAP_NET_BIND_SERVICE" } else { "none" },
                "switched to the [process] user; no_new_privs set"
            );
        }
        None if rustix::process::geteuid().is_root() => {
            tracing::info!("running as root ([process] allow_root = true or TLSGATE_ALLOW_ROOT=1)");
        }
        None => {}
    }
    crate::sandbox::try_enter_thread("main")?;
    if let Some(i) = inherited.take() {
        // systemd first: the old process may drain and exit at once after READY, and systemd
        // must know the new main pid before the old one's exit looks like the service's.
        crate::systemd::took_over();
        // The old process stops accepting once it has this; both accepted until now.
        match i.ready() {
            Ok(old) => {
                tracing::info!(
                    old_pid = old,
                    "upgrade: serving; the previous process drains and exits"
                )
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "upgrade: the previous process did not acknowledge; serving beside it")
            }
        }
        if let Some(lock) = &state_lock {
            lock.claim()?;
        }
    }
    if let (Some(mut file), Some(path)) = (ready_out, &args.ready_file) {
        use std::io::Write as _;
        file.write_all(ready.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }

    // Fleet mode: the state cached in the state directory serves until etcd answers.
    let mut fleet = None;
    if let (Some(cfg), Some(manager), Some(dir)) =
        (&config.fleet, &manager, crate::api::state_dir(&config))
    {
        let f = crate::fleet::Fleet::new(cfg)?;
        manager.set_fleet(f.clone());
        f.start(manager.clone(), &dir);
        fleet = Some(f);
    }
    // The ACME tasks start once the process runs as its user: what they write to the state
    // directory is the user's.
    if let (Some(acme), Some(manager), Some(token), Some(dir)) =
        (&acme, &manager, &token, crate::api::state_dir(&config))
    {
        manager.set_acme(acme.clone());
        let _guard = rt.enter();
        acme.start(manager.clone(), token.clone(), &dir, fleet.clone())?;
    }
    // A new staple rebuilds the listeners that serve it: through the management plane when
    // there is one, else by a reload from the file on the signal loop.
    let (restaple_tx, restaple_rx) = tokio::sync::mpsc::unbounded_channel();
    rt.spawn(stapler.clone().run(move |listeners| {
        let _ = restaple_tx.send(listeners);
    }));
    let probe_every = config.pkcs11.as_ref().map_or(0, |p| p.probe_interval_ms);
    let pending = token_rx.map(|rx| Pending {
        rx,
        label: config
            .pkcs11
            .as_ref()
            .map(|p| p.token.clone())
            .unwrap_or_default(),
        since: std::time::Instant::now(),
    });
    let exit = rt.block_on(wait_for_signals(
        &args.config,
        &dataplane,
        token,
        Signals {
            builder,
            manager,
            restaple: restaple_rx,
            handover: handover.zip(kit.map(Arc::new)),
        },
        publish_rx,
        std::time::Duration::from_millis(probe_every),
        pending,
        degraded_refused,
    ))?;
    // After a handover the socket path is the new process's.
    if exit == Exit::Stop {
        if let Some(path) = config.api.as_ref().and_then(|a| a.socket.as_ref()) {
            let _ = std::fs::remove_file(config.resolve(path));
        }
    }
    tracing::info!(drain_secs = drain.as_secs_f64(), "draining");
    dataplane.shutdown(drain).context("shutdown")?;
    // A management call stuck on a frozen HSM holds a blocking thread that may never return;
    // dropping the runtime would wait for it. State writes are atomic (temp, fsync, rename), so
    // leaving one behind after a grace period loses nothing half-written.
    rt.shutdown_timeout(EXIT_GRACE);
    tracing::info!("stopped");
    Ok(())
}

/// How long exit waits for management calls still running (on the HSM) before leaving them.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A snapshot from the management plane and the sender to tell it the snapshot is live.
type Published = (Arc<Snapshot>, tokio::sync::oneshot::Sender<()>);

/// A token not opened yet (degraded start): where it will arrive, and what was refused meanwhile.
struct Pending {
    rx: tokio::sync::mpsc::Receiver<Arc<Token>>,
    label: String,
    since: std::time::Instant,
}

/// Opens the tokens of `[pkcs11]` in a thread of its own until that succeeds, then sends them.
/// Each attempt waits for the HSM as long as it takes (a frozen HSM holds one attempt, never
/// more); a failed attempt is retried with back-off from 100 ms to 1 s, one log line per 10 s.
/// The configuration is read again at each attempt.
fn spawn_token_opener(config_path: &Path) -> Result<tokio::sync::mpsc::Receiver<Arc<Token>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let path = config_path.to_owned();
    std::thread::Builder::new()
        .name("tlsgate-token-open-bg".into())
        .spawn(move || {
            crate::sandbox::enter_thread("tlsgate-token-open-bg");
            let mut backoff = tlsgate_keystore::token::FIRST_BACKOFF;
            let mut last_log: Option<std::time::Instant> = None;
            let mut failed: u64 = 0;
            loop {
                let opened = Config::load(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|c| open_token_with(&c, None));
                match opened {
                    Ok(Some(token)) => {
                        let _ = tx.blocking_send(token);
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        failed += 1;
                        if last_log.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10)) {
                            tracing::warn!(error = %format!("{e:#}"), attempts = failed, "still DEGRADED: the HSM cannot be opened yet (one line per 10 s)");
                            last_log = Some(std::time::Instant::now());
                            failed = 0;
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(tlsgate_keystore::token::MAX_BACKOFF);
            }
        })
        .context("cannot start the background token opener")?;
    Ok(rx)
}

/// What the signal loop rebuilds with: the snapshot builder, the management plane (when there
/// is one), and the listeners the OCSP stapler has new staples for.
struct Signals {
    builder: Arc<Builder>,
    manager: Option<Arc<crate::api::Manager>>,
    restaple: tokio::sync::mpsc::UnboundedReceiver<std::collections::BTreeSet<String>>,
    /// The handover socket and what a binary upgrade hands over through it.
    handover: Option<(tokio::net::UnixListener, Arc<crate::upgrade::Kit>)>,
}

#[allow(clippy::too_many_arguments)]
async fn wait_for_signals(
    config_path: &Path,
    dataplane: &tlsgate_dataplane::Dataplane,
    mut token: Option<Arc<Token>>,
    mut signals: Signals,
    mut published: Option<tokio::sync::mpsc::Receiver<Published>>,
    probe_every: std::time::Duration,
    mut pending: Option<Pending>,
    degraded_refused: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Exit> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Signals are handled from here on: a service manager may reload us now.
    crate::systemd::ready("serving");
    let mut watchdog = crate::systemd::Watchdog::from_env();
    // The HSM's state and the key-op pool's counters reach the exporter once a second.
    let mut health_tick = tokio::time::interval(std::time::Duration::from_secs(1));
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut prober = Prober::new(probe_every);
    // One upgrade at a time; the data plane serves all along.
    let mut upgrading: Option<tokio::task::JoinHandle<Result<u32>>> = None;
    loop {
        let idle = upgrading.is_none();
        let next_upgrade = async {
            match (&signals.handover, idle) {
                (Some((l, _)), true) => l.accept().await.map(|(s, _)| s),
                _ => std::future::pending().await,
            }
        };
        let upgraded = async {
            match upgrading.as_mut() {
                Some(h) => h.await,
                None => std::future::pending().await,
            }
        };
        let next_published = async {
            match published.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let token_up = async {
            match pending.as_mut() {
                Some(p) => p.rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => {
                crate::systemd::stopping();
                return Ok(Exit::Stop);
            }
            _ = int.recv() => {
                crate::systemd::stopping();
                return Ok(Exit::Stop);
            }
            Ok(stream) = next_upgrade => {
                let kit = signals.handover.as_ref().map(|(_, k)| k.clone());
                match (stream.into_std(), dataplane.listening_sockets(), kit) {
                    (Ok(stream), Ok(sockets), Some(kit)) => {
                        let appliance = signals.builder.appliance().clone();
                        upgrading = Some(tokio::task::spawn_blocking(move || {
                            crate::upgrade::give(stream, &kit, sockets, &appliance.sessions)
                        }));
                    }
                    (Err(e), _, _) => tracing::warn!(error = %e, "upgrade: cannot take the handover connection"),
                    (_, Err(e), _) => tracing::warn!(error = %e, "upgrade: cannot duplicate the listening sockets"),
                    _ => {}
                }
            }
            done = upgraded => {
                upgrading = None;
                match done {
                    Ok(Ok(pid)) => {
                        tracing::info!(new_pid = pid, "upgrade: the new process serves; this one stops accepting and drains");
                        return Ok(Exit::HandedOver);
                    }
                    Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "upgrade failed before the new process was ready; this one keeps serving"),
                    Err(e) => tracing::error!(error = %e, "upgrade: the handover task failed; this one keeps serving"),
                }
            }
            Some((snapshot, ack)) = next_published => {
                // `update` stores the snapshot before it returns: every connection accepted
                // after the API answers uses it.
                dataplane.update(snapshot);
                let _ = ack.send(());
            }
            Some(t) = token_up => {
                let since = pending.take().map(|p| p.since.elapsed()).unwrap_or_default();
                tracing::info!(
                    token = %t.label(), replicas = t.replicas().len(),
                    degraded_ms = since.as_millis() as u64,
                    "RECOVERED from degraded start: the HSM is open; loading its certificates"
                );
                token = Some(t.clone());
                // The token's keys replace the stand-ins: a builder of its own.
                signals.builder = Arc::new(Builder::new(
                    signals.builder.appliance().clone(),
                    Some(t),
                    signals.builder.stapler().clone(),
                    None,
                ));
                reload_now(config_path, dataplane, &signals, "HSM up after degraded start").await;
            }
            _ = hup.recv() => {
                crate::systemd::reloading();
                reload_now(config_path, dataplane, &signals, "SIGHUP").await;
                crate::systemd::ready("serving");
            }
            _ = health_tick.tick() => {
                if let Some(w) = watchdog.as_mut() {
                    w.tick(&dataplane.core_heartbeats(), std::time::Instant::now());
                }
                let pool = dataplane.key_op_counters();
                let refused = degraded_refused.load(std::sync::atomic::Ordering::Relaxed);
                match (&token, &pending) {
                    (None, Some(p)) => crate::mgmt_metrics::publish_hsm_pending(&p.label, refused, pool),
                    _ => crate::mgmt_metrics::publish_hsm(token.as_deref(), pool, refused),
                }
                for r in token.as_ref().map(|t| t.replicas()).unwrap_or_default() {
                    crate::mgmt_metrics::publish_hsm(Some(&r), pool.only_token(), 0);
                }
                prober.maybe_probe(token.as_ref());
                signals.builder.appliance().pools.refresh(dataplane);
            }
            Some(listeners) = signals.restaple.recv() => {
                match signals.manager.clone() {
                    // Off this loop: the rebuild publishes through it.
                    Some(m) => {
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = m.refresh(&listeners) {
                                tracing::error!(error = %e.message, "OCSP refresh: rebuild refused; the running snapshot stays");
                            }
                        });
                    }
                    None => reload_now(config_path, dataplane, &signals, "OCSP refresh").await,
                }
            }
        }
    }
}

/// Probes the token every `every` (from the signal loop's tick) on a blocking thread, one probe
/// at a time: a probe stuck on a frozen HSM is not joined by another.
struct Prober {
    every: std::time::Duration,
    last: std::time::Instant,
    busy: Arc<std::sync::atomic::AtomicBool>,
}

impl Prober {
    fn new(every: std::time::Duration) -> Prober {
        Prober {
            every,
            last: std::time::Instant::now(),
            busy: Arc::default(),
        }
    }

    fn maybe_probe(&mut self, token: Option<&Arc<Token>>) {
        use std::sync::atomic::Ordering::SeqCst;
        let Some(token) = token else { return };
        if self.every.is_zero() || self.last.elapsed() < self.every {
            return;
        }
        if self.busy.swap(true, SeqCst) {
            return;
        }
        self.last = std::time::Instant::now();
        let mut tokens = vec![token.clone()];
        tokens.extend(token.replicas());
        let busy = self.busy.clone();
        tokio::task::spawn_blocking(move || {
            // Only tokens in service: recovery checks the others. A failure has taken the
            // token out of service and logged the state change.
            for t in tokens.iter().filter(|t| t.is_up()) {
                if let Err(e) = t.probe() {
                    tracing::debug!(token = %t.label(), error = %e, "HSM probe failed");
                }
            }
            busy.store(false, SeqCst);
        });
    }
}

/// Reloads for `why`: through the management plane when there is one (it owns the state and
/// publishes through the signal loop), else straight from the file.
async fn reload_now(
    config_path: &Path,
    dataplane: &tlsgate_dataplane::Dataplane,
    signals: &Signals,
    why: &'static str,
) {
    if let Some(m) = signals.manager.clone() {
        // Off this loop: the reload publishes through it.
        tokio::task::spawn_blocking(move || {
            m.audited(
                &crate::audit::ClientIdentity::Signal(why),
                "reload",
                "config",
                |m| m.reload(),
            )
        });
        return;
    }
    // Off this loop and with a deadline: a frozen HSM must not stop the loop that answers
    // SIGTERM and publishes metrics.
    let limit = signals.builder.token().map_or(
        std::time::Duration::from_millis(crate::config::DEFAULT_CALL_TIMEOUT_MS),
        |_| call_timeout(config_path),
    );
    let (path, builder) = (config_path.to_owned(), signals.builder.clone());
    let built = tokio::time::timeout(
        limit,
        tokio::task::spawn_blocking(move || reload(&path, &builder)),
    )
    .await;
    let built = match built {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(anyhow::anyhow!("the reload did not finish: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "the HSM did not answer within {} ms",
            limit.as_millis()
        )),
    };
    match built {
        Ok(snapshot) => {
            dataplane.update(Arc::new(snapshot));
            tracing::info!(trigger = why, "reloaded certificates for new handshakes");
        }
        Err(err) => {
            tracing::error!(trigger = why, error = %format!("{err:#}"), "reload refused; the running configuration stays")
        }
    }
}

/// `[pkcs11] call_timeout_ms` of the file as it is now (its default when it does not load).
fn call_timeout(config_path: &Path) -> std::time::Duration {
    Config::load(config_path)
        .ok()
        .and_then(|c| c.pkcs11.map(|p| p.call_timeout()))
        .unwrap_or(std::time::Duration::from_millis(
            crate::config::DEFAULT_CALL_TIMEOUT_MS,
        ))
}

/// Re-reads certificates and keys. Listener addresses, cores and the token are fixed at start.
fn reload(config_path: &Path, builder: &Builder) -> Result<Snapshot> {
    builder.build_committed(&Config::load(config_path)?, Scope::All)
}

/// Opens the token named by `[pkcs11]`, if any, and its replicas, each within
/// `open_timeout_ms`.
pub fn open_token(config: &Config) -> Result<Option<Arc<Token>>> {
    let limit = config.pkcs11.as_ref().map(|p| p.open_timeout());
    open_token_with(config, limit)
}

/// [`open_token`] with each open bounded by `limit`, or waiting as long as the HSM takes.
fn open_token_with(
    config: &Config,
    limit: Option<std::time::Duration>,
) -> Result<Option<Arc<Token>>> {
    let (Some(p11), Some(pin)) = (&config.pkcs11, config.pin_source()?) else {
        return Ok(None);
    };
    let open = |module: &Path, label: &str, pin: &tlsgate_keystore::PinSource| match limit {
        Some(limit) => {
            Token::open_within(module, TokenSelector::Label(label.to_owned()), pin, limit)
        }
        None => Token::open(module, TokenSelector::Label(label.to_owned()), pin),
    };
    let token = open(&p11.module, &p11.token, &pin)
        .with_context(|| format!("[pkcs11]: cannot open token {:?}", p11.token))?;
    // A signature waits for room on a token at most as long as its key operation may take.
    token.set_budget_wait(config.dataplane().key_ops.deadline());
    token.set_breaker_errors(p11.breaker_errors);
    token.set_max_inflight(p11.max_inflight);
    for (i, r) in p11.replica.iter().enumerate() {
        let at = format!("[[pkcs11.replica]] {i} ({})", r.token);
        let pin: tlsgate_keystore::PinSource = r
            .pin
            .parse()
            .with_context(|| format!("{at}: pin: use env:VAR or file:PATH"))?;
        let module = config.resolve(&r.module);
        let replica = open(&module, &r.token, &pin)
            .with_context(|| format!("{at}: cannot open token {:?}", r.token))?;
        replica.set_breaker_errors(p11.breaker_errors);
        replica.set_max_inflight(r.max_inflight);
        token.add_replica(replica);
    }
    Ok(Some(token))
}
