//! `tlsgate serve`: load the configuration, open the token, start the data plane, and handle
//! signals (SIGTERM/SIGINT drain and exit; SIGHUP reloads certificates for new handshakes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result};
use clap::Args;
use tlsgate_dataplane::{ListenerSnapshot, Snapshot};
use tlsgate_keystore::cert::CertChain;
use tlsgate_keystore::keyref::{self, KeyBackend, KeyRef};
use tlsgate_keystore::token::{Token, TokenSelector};

use crate::config::Config;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The TOML configuration file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Once every listener is bound, write `name addr` lines here (atomically), for scripts and
    /// tests that bind port 0.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// Runs the appliance until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the management runtime")?;
    // The recorder must be in place before the data plane's cores first flush their counters.
    let metrics = match &config.metrics {
        Some(m) => {
            let handle = crate::metrics_http::install()?;
            let (listener, addr) = rt.block_on(crate::metrics_http::bind(m.listen))?;
            Some((handle, listener, addr))
        }
        None => None,
    };
    let token = open_token(&config)?;
    let (snapshot, ocsp_wake) = build_snapshot_scheduled(&config, token.as_ref())?;
    let dp_config = config.dataplane();
    let drain = dp_config.limits.drain_timeout();
    let dataplane = tlsgate_dataplane::start(dp_config, Arc::new(snapshot))
        .context("cannot start the data plane")?;

    let addrs = dataplane.local_addrs();
    for (name, addr) in &addrs {
        tracing::info!(listener = %name, %addr, driver = dataplane.driver().as_str(), "listening");
    }
    let mut ready: String = addrs.iter().map(|(n, a)| format!("{n} {a}\n")).collect();
    if let Some((handle, listener, addr)) = metrics {
        tracing::info!(%addr, "metrics endpoint: GET /metrics");
        ready.push_str(&format!("metrics {addr}\n"));
        rt.spawn(crate::metrics_http::serve(listener, handle));
    }
    if let Some(path) = &args.ready_file {
        crate::files::write_atomic(path, ready.as_bytes(), 0o644)?;
    }

    rt.block_on(wait_for_signals(
        &args.config,
        &dataplane,
        token.as_ref(),
        ocsp_wake,
    ))?;
    tracing::info!(drain_secs = drain.as_secs_f64(), "draining");
    dataplane.shutdown(drain).context("shutdown")?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signals(
    config_path: &Path,
    dataplane: &tlsgate_dataplane::Dataplane,
    token: Option<&Arc<Token>>,
    mut ocsp_wake: Option<SystemTime>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        // OCSP responses near their nextUpdate: reload (re-reads and re-checks them) then.
        let ocsp_sleep = ocsp_wake.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(std::time::Duration::from_secs(1))
        });
        let why = tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => "SIGHUP",
            _ = async { match ocsp_sleep { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => "OCSP refresh",
        };
        match reload(config_path, token) {
            Ok((snapshot, wake)) => {
                dataplane.update(Arc::new(snapshot));
                ocsp_wake = wake;
                tracing::info!(trigger = why, "reloaded certificates for new handshakes");
            }
            Err(err) => {
                // Keep the old schedule only for a signal; a failing timed reload must not spin.
                if why != "SIGHUP" {
                    ocsp_wake = None;
                }
                tracing::error!(trigger = why, error = %format!("{err:#}"), "reload refused; the running configuration stays")
            }
        }
    }
}

/// Re-reads certificates and keys. Listener addresses, cores and the token are fixed at start.
fn reload(
    config_path: &Path,
    token: Option<&Arc<Token>>,
) -> Result<(Snapshot, Option<SystemTime>)> {
    let config = Config::load(config_path)?;
    build_snapshot_scheduled(&config, token)
}

/// Opens the token named by `[pkcs11]`, if any.
pub fn open_token(config: &Config) -> Result<Option<Arc<Token>>> {
    let (Some(p11), Some(pin)) = (&config.pkcs11, config.pin_source()?) else {
        return Ok(None);
    };
    let token = Token::open(&p11.module, TokenSelector::Label(p11.token.clone()), &pin)
        .with_context(|| format!("[pkcs11]: cannot open token {:?}", p11.token))?;
    Ok(Some(token))
}

/// Loads every listener's certificates and keys into a snapshot, checking each chain (order,
/// validity, key match) so a bad file fails here and not in a handshake.
pub fn build_snapshot(config: &Config, token: Option<&Arc<Token>>) -> Result<Snapshot> {
    Ok(build_snapshot_scheduled(config, token)?.0)
}

/// [`build_snapshot`], and when the OCSP responses want a fresh look (see `ocsp::wake_at`).
pub fn build_snapshot_scheduled(
    config: &Config,
    token: Option<&Arc<Token>>,
) -> Result<(Snapshot, Option<SystemTime>)> {
    let now = SystemTime::now();
    let mut ocsp_wake = None;
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for (i, l) in config.listeners.iter().enumerate() {
        let policy = l
            .tls_policy()
            .with_context(|| format!("listener[{i}] ({}).policy", l.name))?;
        let mut certs = Vec::with_capacity(l.certificates.len());
        let mut offload = false;
        for (j, c) in l.certificates.iter().enumerate() {
            let at = format!("listener[{i}].certificate[{j}] ({})", l.name);
            let key_ref: KeyRef = c.key.parse().with_context(|| format!("{at}.key"))?;
            let key_ref = match key_ref {
                KeyRef::File(p) => KeyRef::File(config.resolve(&p)),
                other => other,
            };
            let loaded =
                keyref::load(&key_ref, token).with_context(|| format!("{at}.key: {}", c.key))?;
            let chain_path = config.resolve(&c.chain);
            let chain = CertChain::from_pem_file(&chain_path)
                .with_context(|| format!("{at}.chain: {}", chain_path.display()))?;
            let report = chain
                .validate(&loaded.spki_der, now)
                .with_context(|| format!("{at}.chain: {}", chain_path.display()))?;
            policy
                .check_key(loaded.signing_key.algorithm())
                .with_context(|| format!("{at}.key: {}", c.key))?;
            tracing::info!(listener = %l.name, subject = %report.subject, sans = ?report.sans, key = %c.key, "certificate loaded");
            let names = match &c.names {
                Some(names) => names.clone(),
                None => dns_names(&report.sans),
            };
            let key = tlsgate_keystore::cert::certified_key(&chain, loaded.signing_key.clone())
                .with_context(|| at.clone())?;
            let key = crate::ocsp::attach(
                &l.name,
                &report.subject,
                ocsp_source(config, c).as_ref(),
                key,
                now,
                &mut ocsp_wake,
            )
            .with_context(|| format!("{at}.ocsp"))?;
            certs.push(crate::tls::ServedCert {
                key,
                names,
                default: c.default,
            });
            offload |= loaded.backend == KeyBackend::Pkcs11;
        }
        let client_auth = match &l.client_auth {
            Some(c) => Some(
                crate::client_auth::ClientAuth::load(c, |p| config.resolve(p))
                    .with_context(|| format!("listener[{i}] ({}).client_auth", l.name))?,
            ),
            None => None,
        };
        let opts = crate::tls::ListenerTls {
            unknown_sni: l.unknown_sni,
            policy,
            client_auth,
            session: Some(crate::session::ListenerSessions::for_listener(
                &l.name, &l.session, token,
            )?),
            ..Default::default()
        };
        let sni_filter = crate::tls::sni_filter(&certs, &opts)
            .with_context(|| format!("listener {:?}", l.name))?;
        let client_cert_check = crate::tls::client_cert_check(&opts)
            .with_context(|| format!("listener {:?}", l.name))?;
        listeners.push(ListenerSnapshot {
            name: l.name.clone(),
            bind: l.bind,
            tls: crate::tls::server_config(certs, &opts)
                .with_context(|| format!("listener {:?}", l.name))?,
            offload_key_ops: offload,
            backend: l.backend,
            proxy_protocol: l.proxy_protocol,
            sni_filter,
            client_cert_check,
            backend_tls: crate::backend_tls::build(config, i, token)?,
        });
    }
    Ok((Snapshot { listeners }, ocsp_wake))
}

/// Where a certificate's OCSP response comes from, if anywhere.
fn ocsp_source(
    config: &Config,
    c: &crate::config::CertificateConfig,
) -> Option<crate::ocsp::Source> {
    match (&c.ocsp, c.ocsp_fetch) {
        (Some(p), _) => Some(crate::ocsp::Source::File(config.resolve(p))),
        (None, true) => Some(crate::ocsp::Source::Fetch {
            timeout: crate::ocsp::FETCH_TIMEOUT,
        }),
        (None, false) => None,
    }
}

/// The DNS names among a leaf's SANs (IP, e-mail and URI SANs are not SNI names).
pub fn dns_names(sans: &[String]) -> Vec<String> {
    sans.iter()
        .filter(|s| s.parse::<std::net::IpAddr>().is_err())
        .filter_map(|s| crate::tls::normalize_name(s).ok())
        .collect()
}
