//! The one authoritative management state: the configuration file, the state directory and the
//! token. Every change is checked by building the complete new snapshot first; only a change
//! that builds is written to the state directory and then published to the data plane, so a
//! change that fails changes nothing. Changes are serialised by one lock.
//!
//! This file holds the state, its lock and the one path every change takes (`build`, then
//! `change`); the operations are split by what they change: `keys`, `certs`, and `listeners`
//! (bindings and CRLs).

mod acme;
mod certs;
mod client_ca;
mod fleet;
mod fleet_config;
mod keys;
mod listeners;
mod overlay;

pub use acme::{acme_cert_id, AcmeControl};
pub use fleet::{Applied, FleetStore};

pub(crate) use listeners::crl_der;
// The upload parsers the fuzz targets drive, at the paths they have always had.
#[cfg(any(test, fuzzing))]
pub(crate) use keys::{check_label, parse_id};
#[cfg(any(test, fuzzing))]
pub(crate) use listeners::{crl_view, pem_encode_crl};

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::snapshot::{Builder, Scope};
use axum::http::StatusCode;
use parking_lot::{Mutex, MutexGuard};

use tlsgate_dataplane::Snapshot;
use tlsgate_keystore::keyref::KeyRef;
use tlsgate_keystore::{ChainSource, Credential};
use tlsgate_keystore::{Pkcs11Uri, Token};

use super::error::{key_error, ApiError};
use crate::audit::{AuditLog, ClientIdentity};
use crate::config::Config;
use crate::state::{StateData, StateStore, StoredCert};

/// Hands a snapshot to the data plane and returns once new connections use it.
pub type Publisher = Box<dyn Fn(Arc<Snapshot>) + Send + Sync>;

pub use crate::snapshot::{ListenerOverlay, Overlay};

pub use super::wire::{
    CertSource, CertView, CrlView, CsrRequest, GenerateKey, KeyView, ListenerView, PutBinding,
    PutCert, PutCrl,
};

struct Inner {
    config: Config,
    state: StateData,
    /// Fleet mode: certificates of the fleet's state whose key this appliance's HSM lacks.
    missing_keys: Vec<String>,
}

/// A stored certificate as last loaded and checked: reused while its key and chain stay the
/// same, so a change loads only the certificates it changes.
struct CachedCert {
    /// The stored object it was loaded from: the same `Arc` (the state's maps share them
    /// between changes) is the same key and chain without comparing the PEM.
    stored: Arc<StoredCert>,
    cred: Credential,
    certified: Arc<rustls::sign::CertifiedKey>,
    fetch: bool,
    /// The leaf's DNS names (what it serves unless the binding names others).
    names: Arc<[String]>,
    fingerprint: Arc<str>,
    subject: Arc<str>,
}

/// The management plane's state and every operation on it.
pub struct Manager {
    inner: Mutex<Inner>,
    /// Listener addresses as bound (port 0 resolved).
    bound: Mutex<HashMap<String, std::net::SocketAddr>>,
    token: Option<Arc<Token>>,
    builder: Arc<Builder>,
    /// By certificate id; taken under `inner`'s lock.
    certs: Mutex<HashMap<String, Arc<CachedCert>>>,
    /// Each bound listener's certificates as last committed (what a rotation patches); taken
    /// under `inner`'s lock.
    bound_listeners: Mutex<HashMap<String, Arc<overlay::BoundListener>>>,
    /// `[ocsp] api_fetch`: staple certificates bound through the API from their responder.
    ocsp_fetch: bool,
    /// `[pkcs11] call_timeout_ms`, kept outside `inner`: a call stuck on the HSM holds that lock.
    call_timeout: std::time::Duration,
    /// `[api] danger_allow_key_import_over_https`, read at start (outside `inner` likewise).
    key_import_over_https: bool,
    store: StateStore,
    audit: AuditLog,
    publish: Publisher,
    /// The ACME client, for `ctl acme` (set once at start when `[[acme]]` is configured).
    acme: std::sync::OnceLock<Arc<dyn AcmeControl>>,
    /// Fleet mode: changes go to etcd (set once at start when `[fleet]` is configured).
    fleet: std::sync::OnceLock<Arc<dyn FleetStore>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("state_dir", &self.store.dir())
            .finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Manager {
    /// Loads the state directory and builds the first snapshot from the configuration file and
    /// the state. The snapshot is returned for the data plane's start; later ones go through
    /// `publish`.
    pub fn start(
        config: Config,
        builder: Arc<Builder>,
        store: StateStore,
        audit: AuditLog,
        publish: Publisher,
        prefetch: &dyn Fn() -> bool,
    ) -> anyhow::Result<(Manager, Snapshot)> {
        let token = builder.token().cloned();
        let ocsp_fetch = config.ocsp.api_fetch;
        let state = store.load()?;
        let config = fleet_config::merged_at_start(config, &state);
        let call_timeout = config.pkcs11.as_ref().map_or(
            std::time::Duration::from_millis(crate::config::DEFAULT_CALL_TIMEOUT_MS),
            |p| p.call_timeout(),
        );
        let key_import_over_https = config
            .api
            .as_ref()
            .is_some_and(|a| a.danger_allow_key_import_over_https);
        let mgr = Manager {
            inner: Mutex::new(Inner {
                config,
                state: StateData::default(),
                missing_keys: Vec::new(),
            }),
            bound: Mutex::new(HashMap::new()),
            token,
            builder,
            certs: Mutex::new(HashMap::new()),
            bound_listeners: Mutex::new(HashMap::new()),
            ocsp_fetch,
            call_timeout,
            key_import_over_https,
            store,
            audit,
            publish,
            acme: std::sync::OnceLock::new(),
            fleet: std::sync::OnceLock::new(),
        };
        let snapshot = {
            let mut inner = mgr.lock();
            let built = mgr
                .build(&inner.config, &state, Scope::All, None)
                .map_err(|e| anyhow::anyhow!("the state directory does not load: {e}"))?;
            let mut snapshot = mgr.commit(built);
            // The first staples from responders, before the first snapshot goes live.
            if prefetch() {
                let built = mgr
                    .build(&inner.config, &state, Scope::All, None)
                    .map_err(|e| anyhow::anyhow!("the state directory does not load: {e}"))?;
                snapshot = mgr.commit(built);
            }
            inner.state = state;
            snapshot
        };
        Ok((mgr, snapshot))
    }

    /// Hands the manager the ACME client (once, at start).
    pub fn set_acme(&self, acme: Arc<dyn AcmeControl>) {
        let _ = self.acme.set(acme);
    }

    /// The ACME client, when `[[acme]]` is configured.
    fn acme(&self) -> Option<&Arc<dyn AcmeControl>> {
        self.acme.get()
    }

    /// Records the addresses the data plane bound, for listings.
    pub fn set_bound(&self, addrs: &[(String, std::net::SocketAddr)]) {
        let mut bound = self.bound.lock();
        bound.extend(addrs.iter().cloned());
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the state half-changed: every change is
        // committed by one assignment after it was persisted. So the lock does not poison.
        self.inner.lock()
    }

    /// Runs `op` and writes its audit line (for changes that are not API requests: a signal).
    pub fn audited<T>(
        &self,
        client: &ClientIdentity,
        operation: &str,
        target: &str,
        op: impl FnOnce(&Manager) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let result = self.perform(client, operation, target, op);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.code,
        };
        self.audit.record(client, operation, target, outcome);
        result
    }

    /// The audit log (API requests write their line in `api::access`).
    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// Runs `op` and logs it; the API request around it writes the audit line.
    pub fn perform<T>(
        &self,
        client: &ClientIdentity,
        operation: &str,
        target: &str,
        op: impl FnOnce(&Manager) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let result = op(self);
        if let Err(e) = &result {
            tracing::warn!(client = %client, operation, target, code = e.code, message = %e.message, "management operation refused");
        } else {
            tracing::info!(client = %client, operation, target, "management operation");
        }
        result
    }

    /// Whether `POST /v1/keys/import` is served over HTTPS (`[api]
    /// danger_allow_key_import_over_https`); over the unix socket it always is.
    pub fn key_import_over_https(&self) -> bool {
        self.key_import_over_https
    }

    /// How long an API call may take before it answers `hsm_timeout`.
    /// The appliance this manager changes (its pools, sessions).
    pub fn appliance(&self) -> &Arc<crate::appliance::Appliance> {
        self.builder.appliance()
    }

    pub fn call_timeout(&self) -> std::time::Duration {
        self.call_timeout
    }

    fn token(&self) -> Result<&Arc<Token>, ApiError> {
        self.token.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_token",
                "no [pkcs11] token is configured",
            )
        })
    }

    /// A stored certificate loaded and checked, from the cache while its key and chain are the
    /// ones cached.
    fn cached_cert(
        &self,
        config: &Config,
        stored: &Arc<StoredCert>,
        now: SystemTime,
    ) -> Result<Arc<CachedCert>, ApiError> {
        if let Some(c) = self.certs.lock().get(&stored.id) {
            if Arc::ptr_eq(&c.stored, stored)
                || (c.stored.key == stored.key && c.stored.chain_pem == stored.chain_pem)
            {
                return Ok(c.clone());
            }
        }
        let cred = self.check_cert(config, stored, now)?;
        let certified = cred
            .certified_key_with(|k| crate::mgmt_metrics::timed(k, cred.backend()))
            .map_err(|e| key_error(&e))?;
        let fetch = self.ocsp_fetch
            && certified
                .cert
                .first()
                .and_then(crate::ocsp::responder_url)
                .is_some();
        let cached = Arc::new(CachedCert {
            stored: stored.clone(),
            names: crate::snapshot::dns_names(&cred.report.sans).into(),
            fingerprint: cred.report.fingerprint_sha256.as_str().into(),
            subject: cred.report.subject.as_str().into(),
            cred,
            certified,
            fetch,
        });
        self.certs.lock().insert(stored.id.clone(), cached.clone());
        Ok(cached)
    }

    /// Loads a stored certificate's key and checks its chain against it.
    fn check_cert(
        &self,
        config: &Config,
        stored: &StoredCert,
        now: SystemTime,
    ) -> Result<Credential, ApiError> {
        let key_ref = self.key_ref(config, &stored.key)?;
        Credential::load(
            &key_ref,
            ChainSource::Pem(stored.chain_pem.as_bytes()),
            self.token.as_ref(),
            now,
        )
        .map_err(|e| key_error(&e))
    }

    /// A key label on the configured token, a `pkcs11:` URI or `file:PATH`.
    fn key_ref(&self, config: &Config, key: &str) -> Result<KeyRef, ApiError> {
        let bad =
            |e: &dyn std::fmt::Display| ApiError::invalid("key_reference_invalid", e.to_string());
        if key.contains(':') {
            let r: KeyRef = key.parse().map_err(|e| bad(&e))?;
            Ok(match r {
                KeyRef::File(p) => KeyRef::File(config.resolve(&p)),
                other => other,
            })
        } else {
            Ok(KeyRef::Pkcs11(self.label_uri(key)?))
        }
    }

    fn label_uri(&self, label: &str) -> Result<Pkcs11Uri, ApiError> {
        if label.is_empty() {
            return Err(ApiError::bad_request("a key label must not be empty"));
        }
        Ok(Pkcs11Uri {
            token: Some(self.token()?.label().to_owned()),
            object: Some(label.to_owned()),
            object_type: Some(tlsgate_keystore::ObjectType::Private),
            ..Default::default()
        })
    }

    /// Checks `new_state` by building its snapshot (the listeners in `scope` anew), runs
    /// `persist`, then commits and publishes.
    fn change(
        &self,
        inner: &mut Inner,
        new_state: StateData,
        scope: Scope<'_>,
        persist: impl FnOnce(&StateStore) -> anyhow::Result<()>,
    ) -> Result<(), ApiError> {
        // The certificates that differ from the committed state: the listeners in scope are
        // patched where they serve them, not rebuilt (a rotation costs one certificate).
        let changed = crate::state::changed_keys(&inner.state.certs, &new_state.certs);
        let built = self.build(&inner.config, &new_state, scope, Some(&changed))?;
        if let Some(fleet) = self.fleet.get() {
            // Fleet mode: etcd first (one transaction); the state directory is then the cache.
            fleet.write(&inner.state, &new_state)?;
        }
        persist(&self.store).map_err(|e| ApiError::state_write(&e))?;
        inner.state = new_state;
        let snapshot = self.commit(built);
        (self.publish)(Arc::new(snapshot));
        Ok(())
    }

    // ---- reload ----

    /// Re-reads the configuration file and publishes it merged with the state directory.
    /// Listener addresses, cores and the token stay as they were at start.
    pub fn reload(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let path = inner.config.path.clone();
        let config = Config::load_with_fleet(&path, inner.state.fleet_config.as_deref())
            .map_err(|e| ApiError::invalid("config_invalid", e.to_string()))?;
        let built = self.build(&config, &inner.state, Scope::All, None)?;
        inner.config = config;
        let snapshot = self.commit(built);
        (self.publish)(Arc::new(snapshot));
        Ok(())
    }

    /// Rebuilds `listeners` with the configuration and state as they are (a new OCSP staple for
    /// one of their certificates) and publishes.
    pub fn refresh(&self, listeners: &BTreeSet<String>) -> Result<(), ApiError> {
        let inner = self.lock();
        // Not patched: every certificate of these listeners is stapled again.
        let built = self.build(
            &inner.config,
            &inner.state,
            Scope::Listeners(listeners),
            None,
        )?;
        let snapshot = self.commit(built);
        (self.publish)(Arc::new(snapshot));
        Ok(())
    }
}

/// Whether a SAN list covers the (normalised) name: an equal DNS SAN, or a `*.` SAN one label up.
fn covered(name: &str, sans: &[String]) -> bool {
    sans.iter().any(|s| {
        let s = s.trim_end_matches('.').to_ascii_lowercase();
        if s == name {
            return true;
        }
        match (s.strip_prefix("*."), name.split_once('.')) {
            (Some(base), Some((_, parent))) => base == parent && !name.starts_with("*."),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn san_coverage() {
        let sans = vec!["www.example.com".to_owned(), "*.api.example.com".to_owned()];
        assert!(covered("www.example.com", &sans));
        assert!(covered("v1.api.example.com", &sans));
        assert!(!covered("api.example.com", &sans));
        assert!(!covered("a.b.api.example.com", &sans));
        assert!(!covered("other.example.com", &sans));
    }
}
