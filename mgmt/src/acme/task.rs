//! One `[[acme]]` entry's life: wait until the certificate is due (or an operator asks), run one
//! attempt (account → order → challenges → finalize with the token-signed CSR → install), and
//! back off with jitter after a failure. Every step that changes what the CA knows is written to
//! the state directory before the next one, so a restart picks the order up where it was.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey,
    Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use tlsgate_keystore::Token;
use zeroize::Zeroizing;

use super::home::Turn;
use super::store::{AcmeStore, ProblemView, Progress, RetiredKey, SubproblemView};
use super::AcmeStatus;
use super::{Challenges, Entry};
use crate::api::Manager;
use crate::audit::ClientIdentity;
use crate::config::acme::ChallengeKind;
use crate::mgmt_metrics::{ACME_NEXT_RENEWAL_TIMESTAMP_SECONDS, ACME_ORDERS_TOTAL};

/// How long one attempt waits for the CA to validate, and then to issue.
const POLL_TIMEOUT: Duration = Duration::from_secs(90);
/// The task wakes at least this often (key deletions come due, status stays fresh).
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// How often an entry another fleet member orders for refreshes its status.
const STANDBY_REFRESH: Duration = Duration::from_secs(2);

pub(super) struct Ctx {
    pub manager: Arc<Manager>,
    pub token: Arc<Token>,
    pub store: AcmeStore,
    pub challenges: Arc<Challenges>,
    /// In fleet mode: the orderer role and where the fleet keeps progress and challenges.
    pub fleet: Option<super::home::FleetHome>,
}

/// Why an attempt failed, as status shows it, and when the CA asked us to come back.
#[derive(Debug)]
struct Failure {
    problem: ProblemView,
    retry_after: Option<SystemTime>,
    /// The order is dead (invalid, gone): place a new one next time.
    drop_order: bool,
}

impl Failure {
    fn ours(kind: &str, e: impl std::fmt::Display) -> Failure {
        Failure {
            problem: ProblemView {
                kind: format!("tlsgate:{kind}"),
                detail: e.to_string(),
                subproblems: Vec::new(),
                at_unix: now_unix(),
            },
            retry_after: None,
            drop_order: false,
        }
    }

    fn acme(what: &str, e: instant_acme::Error) -> Failure {
        match e {
            instant_acme::Error::Api(p) => Failure {
                problem: problem_view(what, &p),
                retry_after: None,
                drop_order: false,
            },
            other => {
                // The causes too: "client error (Connect)" alone does not say what went wrong.
                let mut detail = format!("{what}: {other}");
                let mut source = std::error::Error::source(&other);
                while let Some(s) = source {
                    detail.push_str(&format!(": {s}"));
                    source = s.source();
                }
                Failure::ours("network", detail)
            }
        }
    }
}

fn problem_view(what: &str, p: &instant_acme::Problem) -> ProblemView {
    ProblemView {
        kind: p.r#type.clone().unwrap_or_else(|| "about:blank".into()),
        detail: format!("{what}: {}", p.detail.as_deref().unwrap_or("(no detail)")),
        subproblems: p
            .subproblems
            .iter()
            .map(|s| SubproblemView {
                identifier: s
                    .identifier
                    .as_ref()
                    .map(|i| i.authorized(false).to_string()),
                kind: s.r#type.clone(),
                detail: s.detail.clone(),
            })
            .collect(),
        at_unix: now_unix(),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fmt_unix(t: u64) -> String {
    tlsgate_keystore::cert::fmt_time(UNIX_EPOCH + Duration::from_secs(t))
}

/// A uniformly random fraction in [0, 1).
fn random_fraction() -> f64 {
    let mut b = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::ours("internal", e))
}

/// The served certificate's facts the schedule needs.
struct Current {
    key: String,
    not_before: i64,
    not_after: i64,
    serial: String,
    issuer: String,
    leaf_der: Vec<u8>,
}

fn current(manager: &Manager, name: &str) -> Option<Current> {
    let (key, pem) = manager.acme_current(name)?;
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    Some(Current {
        key,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: cert.raw_serial_as_string(),
        issuer: cert.issuer().to_string(),
        leaf_der: leaf.to_vec(),
    })
}

/// The account: loaded from the state directory (unsealed with the token's key) or created.
struct AccountSlot {
    account: Option<Account>,
    retry_after: Option<super::http::RetryAfter>,
}

pub(super) async fn run(ctx: Arc<Ctx>, entry: Arc<Entry>) {
    let name = entry.cfg.name.clone();
    // Both outcomes exist from the start, so `increase()` in an alert sees the first one.
    for outcome in ["issued", "failed"] {
        metrics::counter!(ACME_ORDERS_TOTAL, "acme" => name.clone(), "outcome" => outcome)
            .increment(0);
    }
    let mut progress = Progress::default();
    // The lease whose progress `progress` is (fleet mode): a new term reads the fleet's.
    let mut term: Option<Option<i64>> = None;
    let mut slot = AccountSlot {
        account: None,
        retry_after: None,
    };
    let mut ari: Option<bool> = None;
    // The renewal point of the served certificate, with its jitter drawn once per certificate.
    let mut renew_at: Option<(String, u64)> = None;
    loop {
        let cur = {
            let (m, n) = (ctx.manager.clone(), name.clone());
            blocking(move || current(&m, &n)).await.ok().flatten()
        };
        let turn = ctx.turn();
        let lease = match &turn {
            Turn::Alone => None,
            Turn::Orderer(l) => Some(*l),
            Turn::Standby(orderer) => {
                standby(&entry, cur.as_ref(), orderer.clone());
                tokio::select! {
                    _ = ctx.turn_changed(&turn) => {}
                    _ = tokio::time::sleep(STANDBY_REFRESH) => {}
                }
                continue;
            }
        };
        if term != Some(lease) {
            match ctx.load_progress(&name).await {
                Ok(p) => progress = p,
                Err(e) => {
                    tracing::error!(acme = %name, error = %e, "ACME progress unreadable; starting afresh");
                    progress = Progress::default();
                }
            }
            if lease.is_some() {
                tracing::info!(acme = %name, order = ?progress.order_url, "ordering for the fleet from its recorded progress");
                slot.account = None;
            }
            term = Some(lease);
        }
        let now = now_unix();
        let mut due = match &cur {
            None => now,
            Some(c) => {
                if renew_at.as_ref().is_none_or(|(s, _)| s != &c.serial) {
                    let life = (c.not_after - c.not_before).max(0) as f64;
                    let left = life * entry.cfg.renew_before;
                    // Up to a tenth of the time until the renewal point, earlier: a fleet that
                    // issued together does not renew together.
                    let jitter = (life - left) * 0.1 * random_fraction();
                    let at = c.not_after as f64 - left - jitter;
                    renew_at = Some((c.serial.clone(), at.max(0.0) as u64));
                }
                renew_at.as_ref().map_or(now, |(_, t)| *t)
            }
        };
        // RFC 9773: the CA may ask for an earlier renewal (a revocation coming, say).
        if let (Some(c), Some(account)) = (&cur, &slot.account) {
            if let Ok(id) = instant_acme::CertificateIdentifier::try_from(
                &rustls_pki_types::CertificateDer::from(c.leaf_der.as_slice()),
            ) {
                match account.renewal_info(&id).await {
                    Ok((info, _)) => {
                        ari = Some(true);
                        let start = info.suggested_window.start.unix_timestamp();
                        let end = info.suggested_window.end.unix_timestamp().max(start);
                        let pick = start as f64 + (end - start) as f64 * random_fraction();
                        due = due.min(pick.max(0.0) as u64);
                    }
                    Err(instant_acme::Error::Unsupported(_)) => ari = Some(false),
                    Err(e) => {
                        tracing::debug!(acme = %name, error = %e, "renewal information not available")
                    }
                }
            }
        }
        let mut at = if progress.order_url.is_some() {
            now
        } else {
            due
        };
        at = at.max(progress.next_attempt_unix.unwrap_or(0));
        publish_status(&entry, &progress, cur.as_ref(), at, ari);
        entry.status.lock().orderer = ctx.fleet.as_ref().map(|h| h.fleet.name().to_owned());
        if at > now {
            let wait = Duration::from_secs(at - now).min(MAX_SLEEP);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {
                    if now_unix() < at {
                        delete_retired(&ctx, &entry, &mut progress).await;
                        continue;
                    }
                }
                _ = entry.renew.notified() => {
                    tracing::info!(acme = %name, "renewal requested");
                    progress.next_attempt_unix = None;
                }
                _ = ctx.turn_changed(&turn) => continue,
            }
        }
        delete_retired(&ctx, &entry, &mut progress).await;
        entry.status.lock().state = if cur.is_some() {
            "renewing"
        } else {
            "ordering"
        }
        .into();
        let result = attempt(&ctx, &entry, &mut progress, &mut slot, cur.as_ref()).await;
        match result {
            Ok(report) => {
                metrics::counter!(ACME_ORDERS_TOTAL, "acme" => name.clone(), "outcome" => "issued")
                    .increment(1);
                tracing::info!(acme = %name, subject = %report.subject, issuer = %report.issuer, not_after = %tlsgate_keystore::cert::fmt_time(report.not_after), key = ?progress.current_key, "ACME certificate issued and live");
                progress.failures = 0;
                progress.next_attempt_unix = None;
                progress.last_error = None;
            }
            Err(f) => {
                metrics::counter!(ACME_ORDERS_TOTAL, "acme" => name.clone(), "outcome" => "failed")
                    .increment(1);
                progress.failures = progress.failures.saturating_add(1);
                let base = entry.cfg.retry_min_ms as f64
                    * 2f64.powi(progress.failures.saturating_sub(1).min(30) as i32);
                let delay_ms = base.min(entry.cfg.retry_max_ms as f64) * (0.5 + random_fraction());
                let mut next = SystemTime::now() + Duration::from_millis(delay_ms as u64);
                let retry_after = f
                    .retry_after
                    .or_else(|| slot.retry_after.as_ref().and_then(|r| r.lock().take()));
                if let Some(ra) = retry_after {
                    next = next.max(ra);
                }
                let next_unix = next
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs().max(now_unix() + 1));
                tracing::warn!(acme = %name, problem = %f.problem.kind, detail = %f.problem.detail, subproblems = ?f.problem.subproblems, failures = progress.failures, retry_at = %fmt_unix(next_unix), "ACME attempt failed; the served certificate stays");
                if f.drop_order {
                    progress.order_url = None;
                }
                progress.next_attempt_unix = Some(next_unix);
                progress.last_error = Some(f.problem);
            }
        }
        save(&ctx, &name, &progress).await;
    }
}

fn publish_status(
    entry: &Entry,
    progress: &Progress,
    cur: Option<&Current>,
    next: u64,
    ari: Option<bool>,
) {
    metrics::gauge!(ACME_NEXT_RENEWAL_TIMESTAMP_SECONDS, "acme" => entry.cfg.name.clone())
        .set(next as f64);
    let mut s = entry.status.lock();
    s.state = match (cur, &progress.last_error, &progress.order_url) {
        (_, Some(_), _) => "retrying",
        (_, None, Some(_)) => "ordering",
        (Some(_), None, None) => "valid",
        (None, None, None) => "pending",
    }
    .into();
    served(&mut s, cur);
    s.next_renewal_unix = Some(next);
    s.next_renewal = Some(fmt_unix(next));
    s.order_url = progress.order_url.clone();
    s.orders_placed = progress.orders_placed;
    s.failures = progress.failures;
    s.last_error = progress.last_error.clone();
    s.ari = ari;
}

async fn save(ctx: &Ctx, name: &str, progress: &Progress) {
    if let Err(e) = ctx.save_progress(name, progress).await {
        tracing::error!(acme = %name, error = %e, "cannot write ACME progress");
    }
}

/// The served certificate's facts in a status.
fn served(s: &mut AcmeStatus, cur: Option<&Current>) {
    s.not_after_unix = cur.map(|c| c.not_after);
    s.not_after = cur.map(|c| fmt_unix(c.not_after.max(0) as u64));
    s.issuer = cur.map(|c| c.issuer.clone());
    s.serial = cur.map(|c| c.serial.clone());
    s.key = cur.map(|c| c.key.clone());
}

/// Status of an entry another fleet member orders for.
fn standby(entry: &Entry, cur: Option<&Current>, orderer: Option<String>) {
    let mut s = entry.status.lock();
    s.state = "standby".into();
    s.orderer = orderer;
    served(&mut s, cur);
    s.order_url = None;
    s.next_renewal_unix = None;
    s.next_renewal = None;
}

/// Deletes replaced keys whose certificate has expired (`delete_old_key`).
async fn delete_retired(ctx: &Ctx, entry: &Entry, progress: &mut Progress) {
    let now = now_unix();
    let due: Vec<RetiredKey> = progress
        .retired_keys
        .iter()
        .filter(|k| k.delete_after_unix <= now)
        .cloned()
        .collect();
    if due.is_empty() {
        return;
    }
    for k in due {
        let (m, label) = (ctx.manager.clone(), k.label.clone());
        let r = blocking(move || m.delete_key(&label)).await;
        let outcome = match &r {
            Ok(Ok(())) => "ok",
            Ok(Err(e)) => e.code,
            Err(_) => "internal",
        };
        ctx.manager.audit_log().record(
            &ClientIdentity::Internal("acme"),
            "acme_delete_key",
            &k.label,
            outcome,
        );
        match r {
            Ok(Ok(())) => {
                tracing::info!(acme = %entry.cfg.name, key = %k.label, "replaced ACME key deleted from the token (its certificate has expired)");
                progress.retired_keys.retain(|r| r.label != k.label);
            }
            Ok(Err(e)) if e.code == "key_not_found" => {
                progress.retired_keys.retain(|r| r.label != k.label);
            }
            Ok(Err(e)) => {
                tracing::warn!(acme = %entry.cfg.name, key = %k.label, code = e.code, message = %e.message, "cannot delete a replaced ACME key; tried again later")
            }
            Err(_) => {}
        }
    }
    save(ctx, &entry.cfg.name, progress).await;
}

async fn account(
    ctx: &Ctx,
    entry: &Entry,
    slot: &mut AccountSlot,
    fresh: bool,
) -> Result<Account, Failure> {
    if !fresh {
        if let Some(a) = &slot.account {
            return Ok(a.clone());
        }
    }
    let cfg = &entry.cfg;
    let (client, retry_after) = super::http::Client::new(entry.directory_ca.as_deref())
        .map_err(|e| Failure::ours("config", format!("{e:#}")))?;
    slot.retry_after = Some(retry_after);
    let builder = Account::builder_with_http(Box::new(client));
    let stored = if fresh {
        None
    } else {
        ctx.load_account(&cfg.name, &cfg.directory)
            .await
            .map_err(|e| Failure::ours("account", e))?
    };
    let account = match stored {
        Some(json) => {
            let creds: AccountCredentials = serde_json::from_slice(&json)
                .map_err(|e| Failure::ours("account", format!("stored account: {e}")))?;
            builder
                .from_credentials(creds)
                .await
                .map_err(|e| Failure::acme("directory", e))?
        }
        None => {
            let eab = match &cfg.eab {
                Some(e) => {
                    let source: tlsgate_keystore::PinSource = e
                        .hmac_key
                        .parse()
                        .map_err(|err| Failure::ours("config", format!("eab.hmac_key: {err}")))?;
                    let text = source
                        .read()
                        .map_err(|err| Failure::ours("config", format!("eab.hmac_key: {err}")))?;
                    use base64::Engine as _;
                    let key = Zeroizing::new(
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(text.trim().trim_end_matches('='))
                            .map_err(|err| {
                                Failure::ours(
                                    "config",
                                    format!("eab.hmac_key: not base64url: {err}"),
                                )
                            })?,
                    );
                    Some(ExternalAccountKey::new(e.kid.clone(), &key))
                }
                None => None,
            };
            let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
            let (account, creds) = builder
                .create(
                    &NewAccount {
                        contact: &contact,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    cfg.directory.clone(),
                    eab.as_ref(),
                )
                .await
                .map_err(|e| Failure::acme("new account", e))?;
            let json = Zeroizing::new(
                serde_json::to_vec(&creds).map_err(|e| Failure::ours("account", e))?,
            );
            ctx.save_account(&cfg.name, &cfg.directory, json)
                .await
                .map_err(|e| Failure::ours("account", e))?;
            tracing::info!(acme = %cfg.name, id = %account.id(), "ACME account registered; stored sealed by the token");
            account
        }
    };
    slot.account = Some(account.clone());
    Ok(account)
}

/// The order in flight (resumed) or a new one, its URL persisted before anything else.
async fn order(
    ctx: &Ctx,
    entry: &Entry,
    progress: &mut Progress,
    slot: &mut AccountSlot,
) -> Result<Order, Failure> {
    let name = &entry.cfg.name;
    let mut acc = account(ctx, entry, slot, false).await?;
    if let Some(url) = progress.order_url.clone() {
        match acc.order(url.clone()).await {
            Ok(mut o) => {
                let status = o.state().status;
                if status != OrderStatus::Invalid {
                    tracing::info!(acme = %name, order = %url, ?status, "resuming the ACME order in flight");
                    return Ok(o);
                }
                tracing::warn!(acme = %name, order = %url, "the order in flight is invalid; placing a new one");
            }
            Err(instant_acme::Error::Api(p)) => {
                tracing::warn!(acme = %name, order = %url, problem = ?p.r#type, detail = ?p.detail, "the order in flight is gone at the CA (expired, or the CA lost its state); placing a new one");
                if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist") {
                    acc = account(ctx, entry, slot, true).await?;
                }
            }
            Err(e) => return Err(Failure::acme("resume order", e)),
        }
        progress.order_url = None;
        progress.order_key = None;
    }
    let ids: Vec<Identifier> = entry
        .cfg
        .names
        .iter()
        .map(|n| Identifier::Dns(n.clone()))
        .collect();
    let placed = match acc.new_order(&NewOrder::new(&ids)).await {
        Err(instant_acme::Error::Api(p))
            if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
        {
            tracing::warn!(acme = %name, "the CA does not know the stored account (it lost its state); registering anew");
            acc = account(ctx, entry, slot, true).await?;
            acc.new_order(&NewOrder::new(&ids)).await
        }
        other => other,
    };
    let o = placed.map_err(|e| Failure::acme("new order", e))?;
    progress.order_url = Some(o.url().to_owned());
    progress.order_key = None;
    progress.orders_placed += 1;
    save(ctx, name, progress).await;
    {
        let mut st = entry.status.lock();
        st.order_url = progress.order_url.clone();
        st.orders_placed = progress.orders_placed;
    }
    tracing::info!(acme = %name, order = %o.url(), names = ?entry.cfg.names, "ACME order placed");
    Ok(o)
}

async fn attempt(
    ctx: &Ctx,
    entry: &Entry,
    progress: &mut Progress,
    slot: &mut AccountSlot,
    cur: Option<&Current>,
) -> Result<tlsgate_keystore::ChainReport, Failure> {
    let cfg = &entry.cfg;
    let name = &cfg.name;
    let mut order = order(ctx, entry, progress, slot).await?;
    let mut published = ctx.published();
    let status = order.state().status;
    if matches!(status, OrderStatus::Pending | OrderStatus::Ready) {
        if status == OrderStatus::Pending {
            let kind = match cfg.challenge {
                ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
                ChallengeKind::Http01 => ChallengeType::Http01,
            };
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a.map_err(|e| Failure::acme("authorization", e))?;
                match a.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => {
                        return Err(Failure {
                            drop_order: true,
                            ..Failure::ours(
                                "authorization",
                                format!("authorization {} is {other:?}", a.url()),
                            )
                        })
                    }
                }
                let mut ch = a.challenge(kind.clone()).ok_or_else(|| {
                    Failure::ours("challenge", format!("the CA offers no {kind:?} challenge"))
                })?;
                let ident = ch.identifier().to_string();
                let ka = ch.key_authorization();
                match cfg.challenge {
                    ChallengeKind::TlsAlpn01 => published
                        .tls_alpn(ctx, &ident, ka.digest().as_ref())
                        .await
                        .map_err(|e| Failure::ours("challenge", e))?,
                    ChallengeKind::Http01 => published
                        .http01(ctx, &ch.token, ka.as_str())
                        .await
                        .map_err(|e| Failure::ours("challenge", e))?,
                }
                published.wait_answered(name).await;
                // A resumed order's challenge may be under validation already: no second ask.
                if ch.status == instant_acme::ChallengeStatus::Pending {
                    tracing::info!(acme = %name, name = %ident, challenge = ?kind, "challenge published; asking the CA to validate");
                    ch.set_ready()
                        .await
                        .map_err(|e| Failure::acme("challenge", e))?;
                } else {
                    tracing::info!(acme = %name, name = %ident, status = ?ch.status, "challenge published again for the resumed order");
                }
            }
            let polled = order
                .poll_ready(
                    &RetryPolicy::new()
                        .initial_delay(Duration::from_millis(250))
                        .backoff(1.5)
                        .timeout(POLL_TIMEOUT),
                )
                .await;
            let status = polled.map_err(|e| Failure::acme("validation", e))?;
            if status == OrderStatus::Invalid {
                return Err(invalid_order(&mut order).await);
            }
        }
        drop(published);
        // The token key: reused, kept from before a restart, or generated now.
        let key = match (&progress.order_key, cfg.reuse_key, cur) {
            (Some(k), _, _) => k.clone(),
            (None, true, Some(c)) => c.key.clone(),
            _ => {
                let label = format!("acme-{name}-{}", now_unix());
                let (m, req) = (
                    ctx.manager.clone(),
                    crate::api::manager::GenerateKey {
                        kind: cfg.key_type.clone(),
                        label: label.clone(),
                        id: None,
                    },
                );
                blocking(move || m.generate_key(&req))
                    .await?
                    .map_err(|e| Failure::ours("token", format!("generate key: {}", e.message)))?;
                tracing::info!(acme = %name, key = %label, "certificate key generated on the token");
                label
            }
        };
        progress.order_key = Some(key.clone());
        save(ctx, name, progress).await;
        let (m, k, req) = (
            ctx.manager.clone(),
            key.clone(),
            crate::api::manager::CsrRequest {
                common_name: cfg.names[0].clone(),
                sans: cfg.names.clone(),
            },
        );
        let csr_pem = blocking(move || m.csr(&k, &req))
            .await?
            .map_err(|e| Failure::ours("token", format!("CSR: {}", e.message)))?;
        let csr = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| Failure::ours("internal", format!("CSR PEM: {e}")))?;
        order
            .finalize_csr(csr.as_ref())
            .await
            .map_err(|e| Failure::acme("finalize", e))?;
    } else {
        drop(published);
    }
    let chain = order
        .poll_certificate(
            &RetryPolicy::new()
                .initial_delay(Duration::from_millis(250))
                .backoff(1.5)
                .timeout(POLL_TIMEOUT),
        )
        .await
        .map_err(|e| Failure {
            drop_order: matches!(e, instant_acme::Error::Api(_)),
            ..Failure::acme("certificate", e)
        })?;
    let key = progress.order_key.clone().ok_or_else(|| Failure {
        drop_order: true,
        ..Failure::ours(
            "state",
            "the order was finalized with a key this state does not name",
        )
    })?;
    let (m, n, k) = (ctx.manager.clone(), name.clone(), key.clone());
    let installed = blocking(move || m.acme_install(&n, &k, &chain)).await?;
    let outcome = match &installed {
        Ok(_) => "ok",
        Err(e) => e.code,
    };
    ctx.manager.audit_log().record(
        &ClientIdentity::Internal("acme"),
        "acme_issue",
        name,
        outcome,
    );
    let report =
        installed.map_err(|e| Failure::ours("install", format!("{}: {}", e.code, e.message)))?;
    if let Some(c) = cur {
        if c.key != key && cfg.delete_old_key {
            progress.retired_keys.push(RetiredKey {
                label: c.key.clone(),
                delete_after_unix: c.not_after.max(0) as u64,
            });
        }
    }
    progress.current_key = Some(key);
    progress.order_url = None;
    progress.order_key = None;
    Ok(report)
}

/// The problem of an order that turned invalid: the failed challenges' errors as subproblems.
async fn invalid_order(order: &mut Order) -> Failure {
    let mut subproblems = Vec::new();
    let mut authzs = order.authorizations();
    while let Some(Ok(a)) = authzs.next().await {
        let ident = a.identifier().to_string();
        for c in &a.challenges {
            if let Some(e) = &c.error {
                subproblems.push(SubproblemView {
                    identifier: Some(ident.clone()),
                    kind: e.r#type.clone(),
                    detail: e.detail.clone(),
                });
            }
        }
    }
    Failure {
        problem: ProblemView {
            kind: "urn:ietf:params:acme:error:unauthorized".into(),
            detail: "validation failed: the order is invalid".into(),
            subproblems,
            at_unix: now_unix(),
        },
        retry_after: None,
        drop_order: true,
    }
}
