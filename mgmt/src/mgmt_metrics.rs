//! The metric names the management plane emits (the data plane's are in
//! `tlsgate_dataplane::metrics`), and how they are recorded.
//!
//! - Certificate expiry: a gauge per listener, certificate and SNI name, set whenever a snapshot
//!   is published. A certificate no longer served keeps its series at NaN (the exporter cannot
//!   drop a series), which never satisfies an expiry alert such as
//!   `tlsgate_certificate_not_after_seconds - time() < 14 * 86400`.
//! - Signature duration by backend and scheme, measured around each `Signer::sign`. Samples go
//!   into a buffer of the signing thread and reach the shared recorder at most once a second per
//!   thread, so software keys signing inline on the cores add no cross-core contention.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::SubjectPublicKeyInfoDer;
use tlsgate_keystore::keyref::KeyBackend;

/// Gauge: the leaf's not-after as a Unix timestamp. Labels: `listener`, `certificate` (state id,
/// or `config:<index>` for the configuration file's), `name` (SNI name, `*` for a default without
/// names).
pub const CERTIFICATE_NOT_AFTER_SECONDS: &str = "tlsgate_certificate_not_after_seconds";
/// Histogram: one private-key signature. Labels: `backend` (`pkcs11`|`software`), `mechanism`
/// (the signature scheme, e.g. `ecdsa_nistp256_sha256`, `rsa_pss_sha256`).
pub const KEY_SIGN_DURATION_SECONDS: &str = "tlsgate_key_sign_duration_seconds";

/// Gauge: 1 while the token is in service, 0 while it is out (unhealthy or recovering). Labels:
/// `token`.
pub const HSM_UP: &str = "tlsgate_hsm_up";
/// Gauge: 1 for the state the token is in. Labels: `token`, `state` (`healthy`|`unhealthy`|
/// `recovering`).
pub const HSM_STATE: &str = "tlsgate_hsm_state";
/// Gauge: the token's circuit breaker: 0 closed (in service), 1 half-open (a recovery attempt
/// is running), 2 open (out of service, waiting for the next attempt). Labels: `token`.
pub const HSM_BREAKER_STATE: &str = "tlsgate_hsm_breaker_state";
/// Gauge: PKCS#11 calls on the token now (signatures and management). Labels: `token`.
pub const HSM_INFLIGHT: &str = "tlsgate_hsm_inflight";
/// Gauge: signatures on the token now, each holding a place of its in-flight budget. Labels:
/// `token`.
pub const HSM_SIGNING: &str = "tlsgate_hsm_signing";
/// Gauge: the token's in-flight budget (`max_inflight`). Labels: `token`.
pub const HSM_MAX_INFLIGHT: &str = "tlsgate_hsm_max_inflight";
/// Counter: key operations for the token by outcome. Labels: `token`, `outcome` (`ok`, `error`:
/// the token answered with an error; `unavailable`: refused at once while out of service;
/// `timeout`: waited past its deadline in the queue; `late`: the token answered after the
/// deadline, also counted as `ok`; `shed`: refused at once, a core at its in-flight bound or the
/// queue full, or every token at its in-flight budget for as long as a signature may wait).
/// `ok + error + unavailable + timeout + shed` = full handshakes offered.
pub const HSM_OPS_TOTAL: &str = "tlsgate_hsm_ops_total";
/// Gauge: certificates whose token key is not loaded yet (a degraded start, or the reload when
/// the token came up refused: a key missing or not matching): they refuse full handshakes.
/// Set with each snapshot built from the configuration file; 0 once every key is loaded.
pub const CERTIFICATES_AWAITING_TOKEN: &str = "tlsgate_certificates_awaiting_token";
/// Counter: times the token came back into service. Labels: `token`.
pub const HSM_RECOVERIES_TOTAL: &str = "tlsgate_hsm_recoveries_total";
/// Counter: times recovery re-initialised the module (`C_Finalize` + `C_Initialize`). Labels:
/// `token`.
pub const HSM_REINITIALISATIONS_TOTAL: &str = "tlsgate_hsm_reinitialisations_total";

/// Publishes a token not opened yet (degraded start): out of service, breaker open, with the
/// full handshakes its certificates refused as `unavailable`.
pub fn publish_hsm_pending(label: &str, refused: u64, pool: tlsgate_dataplane::KeyOpCounters) {
    use tlsgate_keystore::token::HsmState;
    metrics::gauge!(tlsgate_dataplane::metrics::KEY_OP_QUEUE_DEPTH).set(pool.depth as f64);
    let label = label.to_owned();
    metrics::gauge!(HSM_UP, "token" => label.clone()).set(0.0);
    for s in [HsmState::Healthy, HsmState::Unhealthy, HsmState::Recovering] {
        let v = if s == HsmState::Unhealthy { 1.0 } else { 0.0 };
        metrics::gauge!(HSM_STATE, "token" => label.clone(), "state" => s.as_str()).set(v);
    }
    metrics::gauge!(HSM_BREAKER_STATE, "token" => label.clone())
        .set(f64::from(HsmState::Unhealthy.breaker()));
    for (outcome, v) in [
        ("ok", 0),
        ("error", 0),
        ("unavailable", refused),
        ("timeout", pool.expired),
        ("late", pool.late),
        ("shed", pool.shed),
    ] {
        metrics::counter!(HSM_OPS_TOTAL, "token" => label.clone(), "outcome" => outcome)
            .absolute(v);
    }
}

/// Publishes the token's health and the key-op pool's counters (called about once a second).
/// `refused_before`: full handshakes refused before the token was opened (degraded start),
/// counted as `unavailable`.
pub fn publish_hsm(
    token: Option<&tlsgate_keystore::Token>,
    pool: tlsgate_dataplane::KeyOpCounters,
    refused_before: u64,
) {
    metrics::gauge!(tlsgate_dataplane::metrics::KEY_OP_QUEUE_DEPTH).set(pool.depth as f64);
    let Some(token) = token else { return };
    let h = token.health();
    let label = token.label().to_owned();
    let up = h.state == tlsgate_keystore::token::HsmState::Healthy;
    metrics::gauge!(HSM_UP, "token" => label.clone()).set(if up { 1.0 } else { 0.0 });
    for s in [
        tlsgate_keystore::token::HsmState::Healthy,
        tlsgate_keystore::token::HsmState::Unhealthy,
        tlsgate_keystore::token::HsmState::Recovering,
    ] {
        let v = if s == h.state { 1.0 } else { 0.0 };
        metrics::gauge!(HSM_STATE, "token" => label.clone(), "state" => s.as_str()).set(v);
    }
    metrics::gauge!(HSM_BREAKER_STATE, "token" => label.clone()).set(f64::from(h.state.breaker()));
    metrics::gauge!(HSM_INFLIGHT, "token" => label.clone()).set(h.inflight as f64);
    metrics::gauge!(HSM_SIGNING, "token" => label.clone()).set(h.signing as f64);
    metrics::gauge!(HSM_MAX_INFLIGHT, "token" => label.clone()).set(token.max_inflight() as f64);
    for (outcome, v) in [
        ("ok", h.sign_ok),
        ("error", h.sign_error),
        ("unavailable", h.sign_unavailable + refused_before),
        ("timeout", pool.expired),
        ("late", pool.late),
        ("shed", pool.shed + h.sign_shed),
    ] {
        metrics::counter!(HSM_OPS_TOTAL, "token" => label.clone(), "outcome" => outcome)
            .absolute(v);
    }
    metrics::counter!(HSM_RECOVERIES_TOTAL, "token" => label.clone()).absolute(h.recoveries);
    metrics::counter!(HSM_REINITIALISATIONS_TOTAL, "token" => label).absolute(h.reinitialisations);
}

/// Gauge: 1 when TLS runs on the AWS-LC FIPS module in FIPS mode with FIPS-approved algorithms
/// only (`tlsgate version` says the same), else 0.
pub const FIPS_MODE: &str = "tlsgate_fips_mode";

/// Counter: ACME orders by outcome (`issued`: a certificate was installed; `failed`: the attempt
/// ended in an error and is retried with back-off). Labels: `acme` (the `[[acme]]` name),
/// `outcome`.
pub const ACME_ORDERS_TOTAL: &str = "tlsgate_acme_orders_total";
/// Gauge: when the ACME client next tries to issue or renew, as a Unix timestamp. Labels: `acme`.
pub const ACME_NEXT_RENEWAL_TIMESTAMP_SECONDS: &str = "tlsgate_acme_next_renewal_timestamp_seconds";

/// Registers help texts (with the data plane's), and sets the gauges fixed for the process's
/// life.
pub fn describe() {
    metrics::describe_counter!(
        ACME_ORDERS_TOTAL,
        "ACME orders by [[acme]] name and outcome (issued, failed)."
    );
    metrics::describe_gauge!(
        ACME_NEXT_RENEWAL_TIMESTAMP_SECONDS,
        metrics::Unit::Seconds,
        "When the ACME client next tries to issue or renew, as a Unix timestamp, by [[acme]] name."
    );
    tlsgate_dataplane::metrics::describe();
    metrics::describe_gauge!(
        FIPS_MODE,
        "1 when TLS runs on the AWS-LC FIPS module in FIPS mode (FIPS-approved algorithms only), else 0."
    );
    metrics::gauge!(FIPS_MODE).set(if crate::policy::fips_active() {
        1.0
    } else {
        0.0
    });
    metrics::describe_gauge!(
        HSM_UP,
        "1 while the token is in service, 0 while it is out (unhealthy or recovering)."
    );
    metrics::describe_gauge!(
        HSM_STATE,
        "1 for the state the token is in (healthy, unhealthy, recovering)."
    );
    metrics::describe_gauge!(HSM_INFLIGHT, "PKCS#11 calls on the token now.");
    metrics::describe_gauge!(
        CERTIFICATES_AWAITING_TOKEN,
        "Certificates whose token key is not loaded yet (degraded start); they refuse full handshakes."
    );
    metrics::describe_gauge!(
        HSM_BREAKER_STATE,
        "The token's circuit breaker: 0 closed, 1 half-open (recovery attempt running), 2 open."
    );
    metrics::describe_gauge!(
        HSM_SIGNING,
        "Signatures on the token now, each holding a place of its in-flight budget."
    );
    metrics::describe_gauge!(
        HSM_MAX_INFLIGHT,
        "The token's in-flight budget (max_inflight)."
    );
    metrics::describe_counter!(
        HSM_OPS_TOTAL,
        "Key operations for the token by outcome (ok, error, unavailable, timeout, late, shed)."
    );
    metrics::describe_counter!(
        HSM_RECOVERIES_TOTAL,
        "Times the token came back into service after a device-level error."
    );
    metrics::describe_counter!(
        HSM_REINITIALISATIONS_TOTAL,
        "Times recovery re-initialised the PKCS#11 module (C_Finalize + C_Initialize)."
    );
    metrics::describe_gauge!(
        CERTIFICATE_NOT_AFTER_SECONDS,
        metrics::Unit::Seconds,
        "Not-after of each served certificate as a Unix timestamp, by listener, certificate and SNI name; NaN once no longer served."
    );
    metrics::describe_histogram!(
        KEY_SIGN_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "One private-key signature, by backend (pkcs11, software) and signature scheme."
    );
    metrics::describe_counter!(
        crate::tls::session::METRIC_TICKETS,
        "Session tickets by listener and result (issued, accepted, expired, rejected)."
    );
    metrics::describe_counter!(
        crate::tls::session::METRIC_TICKET_KEYS,
        "Ticket-key derivations by listener, source (fleet, local) and result (ok, failed)."
    );
    metrics::describe_counter!(
        crate::tls::session::METRIC_RESUMPTION_REFUSED,
        "Session resumptions refused by listener and reason (policy_changed, no_client_certificate, client_certificate_rejected)."
    );
    metrics::describe_gauge!(
        crate::tls::session::METRIC_TICKET_KEYS_HELD,
        "Ticket keys held now, by listener."
    );
    metrics::describe_gauge!(
        crate::ocsp::OCSP_NEXT_UPDATE_TIMESTAMP_SECONDS,
        metrics::Unit::Seconds,
        "nextUpdate of the stapled OCSP response as a Unix timestamp, by listener and certificate; 0 when nothing is stapled."
    );
    metrics::describe_counter!(
        crate::ocsp::OCSP_RESPONSES_REFUSED_TOTAL,
        "OCSP responses not stapled, by listener, certificate and reason."
    );
}

/// Histogram buckets (seconds) for every `_seconds` histogram: 50 µs to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Most samples a thread buffers between flushes.
const MAX_BUFFERED: usize = 4096;
/// How often a signing thread hands its samples to the recorder.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// One certificate's expiry as served.
#[derive(Debug, Clone, PartialEq)]
pub struct Expiry {
    pub listener: String,
    pub certificate: String,
    pub names: Arc<[String]>,
    pub not_after: SystemTime,
}

fn unix(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as f64,
        Err(e) => -(e.duration().as_secs() as f64),
    }
}

// Process-wide by nature: the series created in the process-wide metrics recorder.
static SERIES: Mutex<BTreeSet<(String, String, String)>> = Mutex::new(BTreeSet::new());

/// Creates a listener's refused-resumption series at zero (one per reason), so an alert over
/// `increase()` sees the first refusal. Called once per listener the snapshot builder makes.
pub fn create_listener_series(listener: &str) {
    for reason in crate::session::Refusal::ALL {
        metrics::counter!(crate::session::METRIC_RESUMPTION_REFUSED,
            "listener" => listener.to_owned(), "reason" => reason.as_str())
        .increment(0);
    }
}

/// Moves the expiry gauges of one listener from `old` to `new` (what it served before and what it
/// serves now): only the entries that differ are written, series no longer served go to NaN. A
/// change to one certificate of many writes one entry. `changed`, when given, lists the only
/// positions where `new` may differ from `old` (lists of the same length), so the others are
/// not compared.
pub fn publish_expiry_change(
    old: &imbl::Vector<Expiry>,
    new: &imbl::Vector<Expiry>,
    changed: Option<&[usize]>,
) {
    let (gone, added): (Vec<&Expiry>, Vec<&Expiry>) = if old.len() != new.len() {
        (old.iter().collect(), new.iter().collect())
    } else {
        let differ = |(o, n): &(&Expiry, &Expiry)| o != n;
        match changed {
            Some(changed) => changed
                .iter()
                .filter_map(|&i| old.get(i).zip(new.get(i)))
                .filter(differ)
                .unzip(),
            None => old.iter().zip(new).filter(differ).unzip(),
        }
    };
    let series = |e: &Expiry| -> Vec<(String, String, String)> {
        let names = if e.names.is_empty() {
            vec!["*".to_owned()]
        } else {
            e.names.to_vec()
        };
        names
            .into_iter()
            .map(|n| (e.listener.clone(), e.certificate.clone(), n))
            .collect()
    };
    let now: BTreeSet<(String, String, String)> = added.iter().flat_map(|e| series(e)).collect();
    let mut all = SERIES.lock();
    for s in gone.iter().flat_map(|e| series(e)) {
        if !now.contains(&s) {
            metrics::gauge!(CERTIFICATE_NOT_AFTER_SECONDS,
                "listener" => s.0.clone(), "certificate" => s.1.clone(), "name" => s.2.clone())
            .set(f64::NAN);
            all.remove(&s);
        }
    }
    for e in added {
        for s in series(e) {
            metrics::gauge!(CERTIFICATE_NOT_AFTER_SECONDS,
                "listener" => s.0.clone(), "certificate" => s.1.clone(), "name" => s.2.clone())
            .set(unix(e.not_after));
            all.insert(s);
        }
    }
}

/// Wraps a signing key so each signature's duration is recorded.
pub fn timed(key: Arc<dyn SigningKey>, backend: KeyBackend) -> Arc<dyn SigningKey> {
    Arc::new(TimedKey {
        inner: key,
        backend: match backend {
            KeyBackend::Pkcs11 => "pkcs11",
            KeyBackend::Software => "software",
        },
    })
}

#[derive(Debug)]
struct TimedKey {
    inner: Arc<dyn SigningKey>,
    backend: &'static str,
}

impl SigningKey for TimedKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let inner = self.inner.choose_scheme(offered)?;
        Some(Box::new(TimedSigner {
            mechanism: scheme_name(inner.scheme()),
            inner,
            backend: self.backend,
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        self.inner.public_key()
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.inner.algorithm()
    }
}

#[derive(Debug)]
struct TimedSigner {
    inner: Box<dyn Signer>,
    backend: &'static str,
    mechanism: &'static str,
}

impl Signer for TimedSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let start = Instant::now();
        let result = self.inner.sign(message);
        if result.is_ok() {
            record(self.backend, self.mechanism, start.elapsed());
        }
        result
    }

    fn scheme(&self) -> SignatureScheme {
        self.inner.scheme()
    }
}

fn scheme_name(s: SignatureScheme) -> &'static str {
    match s {
        SignatureScheme::ECDSA_NISTP256_SHA256 => "ecdsa_nistp256_sha256",
        SignatureScheme::ECDSA_NISTP384_SHA384 => "ecdsa_nistp384_sha384",
        SignatureScheme::ECDSA_NISTP521_SHA512 => "ecdsa_nistp521_sha512",
        SignatureScheme::RSA_PSS_SHA256 => "rsa_pss_sha256",
        SignatureScheme::RSA_PSS_SHA384 => "rsa_pss_sha384",
        SignatureScheme::RSA_PSS_SHA512 => "rsa_pss_sha512",
        SignatureScheme::RSA_PKCS1_SHA256 => "rsa_pkcs1_sha256",
        SignatureScheme::RSA_PKCS1_SHA384 => "rsa_pkcs1_sha384",
        SignatureScheme::RSA_PKCS1_SHA512 => "rsa_pkcs1_sha512",
        SignatureScheme::ED25519 => "ed25519",
        _ => "other",
    }
}

type Samples = Mutex<Vec<(&'static str, &'static str, f64)>>;

/// Every signing thread's buffer. A thread locks only its own buffer (uncontended but for the
/// flusher's visit once a second). Process-wide by nature: signing threads of the process feed
/// the process-wide metrics recorder through one flusher.
static BUFFERS: Mutex<Vec<std::sync::Weak<Samples>>> = Mutex::new(Vec::new());
static FLUSHER: std::sync::Once = std::sync::Once::new();

thread_local! {
    static BUFFER: RefCell<Option<Arc<Samples>>> = const { RefCell::new(None) };
}

fn record(backend: &'static str, mechanism: &'static str, elapsed: Duration) {
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        let buf = b.get_or_insert_with(|| {
            let buf = Arc::new(Samples::default());
            BUFFERS.lock().push(Arc::downgrade(&buf));
            FLUSHER.call_once(start_flusher);
            buf
        });
        let mut samples = buf.lock();
        if samples.len() < MAX_BUFFERED {
            samples.push((backend, mechanism, elapsed.as_secs_f64()));
        }
    });
}

/// Starts the thread that flushes signing-time samples, if it is not running yet. `serve` calls
/// it before the data plane starts: a core thread signing with a software key inline records
/// samples too, and under its seccomp filter it may not start a thread.
pub fn start_sign_metrics_flusher() {
    FLUSHER.call_once(start_flusher);
}

fn start_flusher() {
    let spawned = std::thread::Builder::new()
        .name("tlsgate-sign-metrics".into())
        .spawn(|| loop {
            crate::sandbox::enter_thread("tlsgate-sign-metrics");
            std::thread::sleep(FLUSH_INTERVAL);
            let buffers: Vec<Arc<Samples>> = {
                let mut all = BUFFERS.lock();
                all.retain(|w| w.strong_count() > 0);
                all.iter().filter_map(std::sync::Weak::upgrade).collect()
            };
            for buf in buffers {
                let samples = std::mem::take(&mut *buf.lock());
                for (backend, mechanism, secs) in samples {
                    metrics::histogram!(KEY_SIGN_DURATION_SECONDS, "backend" => backend, "mechanism" => mechanism)
                        .record(secs);
                }
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start the signature-metrics thread; signature durations are not exported");
    }
}

#[cfg(test)]
mod tests {
    /// Every metric name defined in code has a row in the README's metrics table.
    #[test]
    fn every_metric_is_documented() {
        let readme = include_str!("../../README.md");
        let sources = [
            include_str!("../../dataplane/src/metrics.rs"),
            include_str!("mgmt_metrics.rs"),
            include_str!("tls/session/ticketer.rs"),
            include_str!("tls/session/policy.rs"),
            include_str!("tls/ocsp.rs"),
        ];
        let mut names = 0;
        for src in sources {
            for line in src.lines().filter(|l| l.starts_with("pub const ")) {
                let Some(name) = line.split('"').nth(1) else {
                    continue;
                };
                if !name.starts_with("tlsgate_") {
                    continue;
                }
                names += 1;
                assert!(
                    readme.contains(&format!("| `{name}` |")),
                    "{name} is not in the README metrics table"
                );
            }
        }
        assert!(names >= 15, "found only {names} metric names");
    }
}
