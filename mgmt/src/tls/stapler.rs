//! The OCSP stapler: a cache of OCSP responses keyed by certificate (the leaf's SHA-256
//! fingerprint), and the task that keeps it fresh.
//!
//! The snapshot builder asks [`Stapler::staple`] for each certificate it serves; that answer
//! never waits on a network: it is the cached response (when it is still current), or none yet.
//! A certificate the cache has not seen is queued for the task, which fetches from the
//! responder in the leaf's Authority Information Access (async, within `[ocsp] timeout_ms`),
//! checks the answer ([`super::ocsp::check`]) and, when a new response is stapled, hands the
//! listeners that serve the certificate to the caller of [`Stapler::run`], which rebuilds those
//! listeners through the snapshot builder. The task refreshes a response three quarters into its
//! validity ([`super::ocsp::wake_at`]) and retries a failed fetch after a minute. Nothing here
//! runs under the management plane's lock, and an unchanged certificate is never fetched again
//! because of an API change or a reload: its entry stays.
//!
//! A response from a file (`ocsp = "path"`) is read by the builder itself, as before (a missing
//! file is a configuration error), and read again by the task when it is due.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

use super::ocsp::{
    self, OcspStatus, Source, OCSP_NEXT_UPDATE_TIMESTAMP_SECONDS, OCSP_RESPONSES_REFUSED_TOTAL,
};

/// How long after a failed fetch the task tries again.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// The cache and its schedule. One per running appliance.
#[derive(Debug)]
pub struct Stapler {
    entries: Mutex<HashMap<String, Entry>>,
    timeout: Duration,
    wake: tokio::sync::Notify,
    fetches: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    source: Source,
    chain: Vec<CertificateDer<'static>>,
    /// Listeners that served it in a build since it was added (metric labels; what to rebuild).
    listeners: BTreeSet<String>,
    subject: String,
    response: Option<(Arc<Vec<u8>>, OcspStatus)>,
    /// Goes up with each new response: a memoised stapled key is for one generation.
    generation: u64,
    due: SystemTime,
    busy: bool,
    /// The last key handed out: (the key asked for, its generation, the stapled key).
    memo: Option<(Arc<CertifiedKey>, u64, Arc<CertifiedKey>)>,
}

impl Stapler {
    /// A stapler whose fetches give up after `timeout`.
    pub fn new(timeout: Duration) -> Arc<Stapler> {
        Arc::new(Stapler {
            entries: Mutex::new(HashMap::new()),
            timeout,
            wake: tokio::sync::Notify::new(),
            fetches: AtomicU64::new(0),
        })
    }

    /// How many fetches from responders have started (each one request).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// `key` with the current staple for it from `source` (`key` itself when there is none).
    /// `fingerprint` names the certificate (the leaf's SHA-256, hex). A file source is read now
    /// (an unreadable file is an error); a responder is never asked here.
    pub fn staple(
        &self,
        listener: &str,
        subject: &str,
        fingerprint: &str,
        source: Option<&Source>,
        key: Arc<CertifiedKey>,
        now: SystemTime,
    ) -> anyhow::Result<Arc<CertifiedKey>> {
        let Some(source) = source else {
            return Ok(key);
        };
        let file = match source {
            Source::File(path) => Some(
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
            ),
            Source::Fetch => None,
        };
        let mut entries = self.entries.lock();
        let fresh = !entries.contains_key(fingerprint);
        if fresh {
            entries.insert(
                fingerprint.to_owned(),
                Entry::new(source, &key, subject, now),
            );
        }
        let Some(entry) = entries.get_mut(fingerprint) else {
            return Ok(key);
        };
        if !entry.listeners.contains(listener) {
            entry.listeners.insert(listener.to_owned());
        }
        if entry.source != *source {
            entry.source = source.clone();
            entry.response = None;
            entry.generation += 1;
            entry.due = now;
        }
        if let Some(der) = file {
            if entry.response.as_ref().is_none_or(|(r, _)| **r != der) {
                entry.take(der, listener, &source.describe(), now);
            }
        }
        if entry
            .response
            .as_ref()
            .is_some_and(|(_, s)| now >= s.next_update)
        {
            entry.response = None;
            entry.generation += 1;
        }
        let out = match &entry.response {
            None => key,
            Some((der, _)) => match &entry.memo {
                Some((asked, generation, stapled))
                    if Arc::ptr_eq(asked, &key) && *generation == entry.generation =>
                {
                    stapled.clone()
                }
                _ => {
                    let mut ck = (*key).clone();
                    ck.ocsp = Some(der.to_vec());
                    let stapled = Arc::new(ck);
                    entry.memo = Some((key, entry.generation, stapled.clone()));
                    stapled
                }
            },
        };
        drop(entries);
        if fresh && *source == Source::Fetch {
            self.wake.notify_one();
        }
        Ok(out)
    }

    /// Forgets every certificate not in `keep` (after a build of every listener).
    pub fn retain(&self, keep: &HashSet<&str>) {
        self.entries.lock().retain(|k, _| keep.contains(k.as_str()));
    }

    /// Runs the schedule until the runtime stops: each round fetches (or re-reads) what is due,
    /// then hands `changed` the listeners whose certificates have a new staple (or lost a stale
    /// one). `changed` must not block the runtime.
    pub async fn run(self: Arc<Self>, changed: impl Fn(BTreeSet<String>) + Send + Sync + 'static) {
        loop {
            let next = self
                .entries
                .lock()
                .values()
                .filter(|e| !e.busy)
                .map(|e| e.due)
                .min();
            let sleep = next.map(|at| {
                at.duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_millis(10))
            });
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = async {
                    match sleep {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            let listeners = self.refresh_due().await;
            if !listeners.is_empty() {
                changed(listeners);
            }
        }
    }

    /// One round: every entry that is due, fetched (or re-read) at the same time, each within
    /// the timeout. Returns the listeners whose staples changed.
    pub async fn refresh_due(&self) -> BTreeSet<String> {
        let now = SystemTime::now();
        let due: Vec<(String, Source, Vec<CertificateDer<'static>>)> = {
            let mut entries = self.entries.lock();
            entries
                .iter_mut()
                .filter(|(_, e)| !e.busy && e.due <= now)
                .map(|(k, e)| {
                    e.busy = true;
                    (k.clone(), e.source.clone(), e.chain.clone())
                })
                .collect()
        };
        let mut tasks = tokio::task::JoinSet::new();
        for (fingerprint, source, chain) in due {
            let timeout = self.timeout;
            if source == Source::Fetch {
                self.fetches.fetch_add(1, Ordering::Relaxed);
            }
            tasks.spawn(async move {
                let got = match &source {
                    Source::File(path) => tokio::fs::read(path)
                        .await
                        .with_context(|| format!("cannot read {}", path.display())),
                    Source::Fetch => ocsp::fetch(&chain, timeout).await,
                };
                (fingerprint, source, got)
            });
        }
        let mut changed = BTreeSet::new();
        while let Some(done) = tasks.join_next().await {
            let Ok((fingerprint, source, got)) = done else {
                continue;
            };
            let now = SystemTime::now();
            let mut entries = self.entries.lock();
            let Some(e) = entries.get_mut(&fingerprint) else {
                continue;
            };
            e.busy = false;
            let listener = e.listeners.iter().next().cloned().unwrap_or_default();
            let before = e.generation;
            match got {
                Ok(der) if e.response.as_ref().is_some_and(|(r, _)| **r == der) => {
                    e.due = e
                        .response
                        .as_ref()
                        .map_or(now + RETRY_AFTER, |(_, s)| ocsp::wake_at(s, now));
                }
                Ok(der) => e.take(der, &listener, &source.describe(), now),
                Err(err) => {
                    tracing::warn!(%listener, certificate = %e.subject, reason = "fetch_failed", error = %format!("{err:#}"), "OCSP response NOT refreshed: fetch failed");
                    metrics::counter!(OCSP_RESPONSES_REFUSED_TOTAL, "listener" => listener.clone(), "certificate" => e.subject.clone(), "reason" => "fetch_failed")
                        .increment(1);
                    e.due = now + RETRY_AFTER;
                }
            }
            if e.response
                .as_ref()
                .is_some_and(|(_, s)| now >= s.next_update)
            {
                e.response = None;
                e.generation += 1;
            }
            if e.generation != before {
                changed.extend(e.listeners.iter().cloned());
            }
        }
        changed
    }
}

impl Entry {
    fn new(source: &Source, key: &CertifiedKey, subject: &str, now: SystemTime) -> Entry {
        Entry {
            source: source.clone(),
            chain: key.cert.clone(),
            listeners: BTreeSet::new(),
            subject: subject.to_owned(),
            response: None,
            generation: 0,
            due: now,
            busy: false,
            memo: None,
        }
    }

    /// Checks `der` for this certificate and keeps it when it passes (logged and counted either
    /// way); schedules the next look.
    fn take(&mut self, der: Vec<u8>, listener: &str, from: &str, now: SystemTime) {
        let certificate = self.subject.clone();
        match ocsp::check(&der, &self.chain, now) {
            Ok(status) => {
                let next = ocsp::unix_secs(status.next_update);
                tracing::info!(%listener, %certificate, %from, next_update = next, "OCSP response stapled");
                metrics::gauge!(OCSP_NEXT_UPDATE_TIMESTAMP_SECONDS, "listener" => listener.to_owned(), "certificate" => certificate)
                    .set(next as f64);
                self.due = ocsp::wake_at(&status, now);
                self.response = Some((Arc::new(der), status));
            }
            Err(e) => {
                tracing::warn!(%listener, %certificate, %from, reason = e.reason(), error = %e, "OCSP response NOT stapled");
                metrics::counter!(OCSP_RESPONSES_REFUSED_TOTAL, "listener" => listener.to_owned(), "certificate" => certificate.clone(), "reason" => e.reason())
                    .increment(1);
                metrics::gauge!(OCSP_NEXT_UPDATE_TIMESTAMP_SECONDS, "listener" => listener.to_owned(), "certificate" => certificate)
                    .set(0.0);
                self.response = None;
                self.due = now + RETRY_AFTER;
            }
        }
        self.generation += 1;
    }
}
