//! Fleet mode: several appliances share one desired state kept in etcd.
//!
//! ```text
//! <prefix>/state/certs/<id>          StoredCert JSON (chain + key reference, never key bytes)
//! <prefix>/state/bindings/<listener> Binding JSON
//! <prefix>/state/crls/<listener>     the listener's uploaded CRLs (JSON list)
//! <prefix>/state/client-cas/<listener> StoredClientCa JSON (the listener's client CA bundle)
//! <prefix>/state/config              the fleet's share of the configuration (TOML: pools,
//!                                    routes, session policy; `config::fleet_overlay`)
//! <prefix>/members/<name>            Member JSON, bound to the appliance's lease
//! <prefix>/acme/...                  the fleet's ACME orderer, progress, accounts, challenges
//!                                    ([`acme`])
//! ```
//!
//! Writes: the management API builds and checks the new state as it does without a fleet
//! ([`crate::api::Manager`]'s one change path), then writes the difference to etcd in **one
//! transaction** that compares each written key's `mod_revision` with the one this appliance last
//! read, so a concurrent change made elsewhere is a `fleet_conflict`, never overwritten.
//!
//! Reads ([`sync`]): each appliance reads the whole `state/` prefix, checks and applies it with
//! the same code as a local change (a state that does not build is refused, reported in its member
//! key, and the last good state keeps serving), caches it in the state directory (the same files
//! as without a fleet, plus `fleet.json` with the applied revision), and watches the prefix from
//! the revision it read. When etcd is unreachable the appliance serves the cached state and
//! reconnects with back-off.

pub mod acme;
mod sync;

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::api::error::ApiError;
use crate::api::wire::{FleetMember, FleetStatus};
use crate::config::fleet::FleetConfig;
use crate::state::{for_each_change, StateData};

/// How long an API write waits for etcd before answering `fleet_unavailable`.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a write or a status call waits for the sync task to connect again after its
/// connection failed (with [`WRITE_TIMEOUT`] after it, within the API's default 10 s).
const RECONNECT_WAIT: Duration = Duration::from_millis(2500);

/// What an appliance reports under `<prefix>/members/<name>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// etcd revision of the state this appliance serves (0: none from etcd yet).
    pub applied_revision: i64,
    /// The newest revision it read (greater than `applied_revision` when that state was refused).
    pub seen_revision: i64,
    /// Why the newest state was refused; `None` when it serves it.
    pub error: Option<String>,
    /// Certificates of the state whose key this appliance's HSM does not hold: served by the
    /// others, left out of this one's bindings.
    #[serde(default)]
    pub missing_keys: Vec<String>,
    pub updated_unix: u64,
}

/// Keys of one fleet.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn state(&self) -> String {
        format!("{}/state/", self.prefix)
    }
    pub(crate) fn cert(&self, id: &str) -> String {
        format!("{}/state/certs/{id}", self.prefix)
    }
    pub(crate) fn binding(&self, listener: &str) -> String {
        format!("{}/state/bindings/{listener}", self.prefix)
    }
    pub(crate) fn crls(&self, listener: &str) -> String {
        format!("{}/state/crls/{listener}", self.prefix)
    }
    pub(crate) fn config(&self) -> String {
        format!("{}/state/config", self.prefix)
    }
    pub(crate) fn client_ca(&self, listener: &str) -> String {
        format!("{}/state/client-cas/{listener}", self.prefix)
    }
    pub(crate) fn members(&self) -> String {
        format!("{}/members/", self.prefix)
    }
    pub(crate) fn member(&self, name: &str) -> String {
        format!("{}/members/{name}", self.prefix)
    }
}

/// The fleet client of one appliance: its own runtime thread talks to etcd.
pub struct Fleet {
    keys: Keys,
    name: String,
    config: FleetConfig,
    /// Always `Some` until dropped (then shut down without waiting: a drop may happen on a
    /// runtime thread, where waiting is not allowed).
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    /// The client once connected (by the sync task).
    client: Mutex<Option<Client>>,
    /// `mod_revision` of each state key as last read from etcd: what a write compares against.
    revisions: Mutex<HashMap<String, i64>>,
    /// What this appliance last reported.
    me: Mutex<Member>,
    /// The fleet configuration of the last read (see `FleetStore::seen_config`).
    seen_config: Mutex<Option<Option<Arc<str>>>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("name", &self.name)
            .field("prefix", &self.keys.prefix)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    pub fn new(config: &FleetConfig) -> Result<Arc<Fleet>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fleet")
            .enable_all()
            .build()
            .context("cannot start the fleet runtime")?;
        let name = config.member_name();
        Ok(Arc::new(Fleet {
            keys: Keys {
                prefix: config.prefix().to_owned(),
            },
            me: Mutex::new(Member {
                name: name.clone(),
                ..Member::default()
            }),
            name,
            config: config.clone(),
            handle: rt.handle().clone(),
            rt: Some(rt),
            client: Mutex::new(None),
            revisions: Mutex::new(HashMap::new()),
            seen_config: Mutex::new(None),
        }))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    /// This appliance's member name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection options from `[fleet]` (TLS files read now).
    fn connect_options(&self) -> Result<ConnectOptions> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        if self
            .config
            .endpoints
            .iter()
            .any(|e| e.starts_with("https://"))
        {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.config.ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("[fleet] ca: cannot read {}", ca.display()))?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&self.config.cert, &self.config.key) {
                let cert_pem = std::fs::read(cert)
                    .with_context(|| format!("[fleet] cert: cannot read {}", cert.display()))?;
                let key_pem = zeroize::Zeroizing::new(
                    std::fs::read(key)
                        .with_context(|| format!("[fleet] key: cannot read {}", key.display()))?,
                );
                tls = tls.identity(etcd_client::Identity::from_pem(
                    cert_pem,
                    key_pem.as_slice(),
                ));
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }

    /// Runs `fut` on the fleet runtime and waits for it (from any thread, in or outside a
    /// runtime) at most `WRITE_TIMEOUT`.
    fn call<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (tx, rx) = mpsc::channel();
        self.handle().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(WRITE_TIMEOUT).unwrap_or_else(|_| {
            Err(unavailable(format!(
                "etcd did not answer within {WRITE_TIMEOUT:?}"
            )))
        })
    }

    /// The sync task's client. When its connection just failed (the etcd member it used went
    /// away, a new leader is being elected) the task connects again within moments: a call
    /// waits up to [`RECONNECT_WAIT`] for that rather than failing in the gap.
    fn connected(&self) -> Result<Client, ApiError> {
        let deadline = std::time::Instant::now() + RECONNECT_WAIT;
        loop {
            if let Some(client) = self.client.lock().clone() {
                return Ok(client);
            }
            if std::time::Instant::now() >= deadline {
                return Err(unavailable(
                    "not connected to etcd (serving the cached state)",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The etcd keys that turn `old` into `new` (certificates, bindings, CRLs, client CA
    /// bundles), one call each:
    /// `touch(key, Some(value))` to put, `touch(key, None)` to delete.
    pub(crate) fn key_changes(
        &self,
        old: &StateData,
        new: &StateData,
        mut touch: impl FnMut(String, Option<Vec<u8>>),
    ) -> Result<(), ApiError> {
        for_each_change(&old.certs, &new.certs, |id, c| {
            touch(self.keys.cert(id), c.map(|c| json(&**c)).transpose()?);
            Ok(())
        })?;
        for_each_change(&old.bindings, &new.bindings, |l, b| {
            touch(self.keys.binding(l), b.map(|b| json(&**b)).transpose()?);
            Ok(())
        })?;
        for_each_change(&old.crls, &new.crls, |l, v| {
            // No CRLs left: no key, as a listener that never had any.
            let value = v.filter(|v| !v.is_empty()).map(json).transpose()?;
            touch(self.keys.crls(l), value);
            Ok(())
        })?;
        for_each_change(&old.client_cas, &new.client_cas, |l, c| {
            touch(self.keys.client_ca(l), c.map(|c| json(&**c)).transpose()?);
            Ok(())
        })?;
        if old.fleet_config != new.fleet_config {
            touch(
                self.keys.config(),
                new.fleet_config.as_ref().map(|t| t.as_bytes().to_vec()),
            );
        }
        Ok(())
    }

    /// Writes the difference between `old` and `new` (certificates, bindings, CRLs) as one etcd
    /// transaction, compare-and-swap on the revisions last read.
    fn write_txn(&self, old: &StateData, new: &StateData) -> Result<(), ApiError> {
        let mut ops = Vec::new();
        let mut compares = Vec::new();
        let revisions = self.revisions.lock().clone();
        self.key_changes(old, new, |key, value| {
            let rev = revisions.get(&key).copied().unwrap_or(0);
            compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, rev));
            ops.push(match value {
                Some(v) => TxnOp::put(key, v, None),
                None => TxnOp::delete(key, None),
            });
        })?;
        if ops.is_empty() {
            return Ok(());
        }
        let mut client = self.connected()?;
        let txn = Txn::new().when(compares).and_then(ops);
        let resp = self
            .call(async move {
                // A member without a leader (the cluster lost its quorum) would hold the transaction
                // and could still commit it once quorum returns, after this write was answered as
                // failed: ask first, and send nothing without a leader.
                let status = client
                    .status()
                    .await
                    .map_err(|e| unavailable(format!("etcd status failed: {e}")))?;
                if status.leader() == 0 {
                    return Err(unavailable(
                        "etcd has no leader (the cluster lost its quorum): nothing was written",
                    ));
                }
                client
                    .txn(txn)
                    .await
                    .map_err(|e| unavailable(format!("etcd transaction failed: {e}")))
            })
            .map_err(|mut e| {
                if e.message.starts_with("etcd did not answer") {
                    e.message = format!(
                    "{}: the change is not confirmed and may still be applied when etcd recovers \
                     (`tlsgate ctl fleet status` and `ctl certs list` show what the fleet serves)",
                    e.message
                );
                }
                e
            })?;
        if !resp.succeeded() {
            return Err(ApiError::conflict(
                "fleet_conflict",
                "the fleet state changed since this appliance read it (another appliance or \
                 operator wrote it); read it again and retry",
            ));
        }
        Ok(())
    }

    /// Every member's report, with its lag behind the newest state revision.
    fn members(&self) -> Result<FleetStatus, ApiError> {
        let mut client = self.connected()?;
        let keys = self.keys.clone();
        let me = self.me.lock().clone();
        self.call(async move {
            let err = |e: etcd_client::Error| unavailable(format!("etcd read failed: {e}"));
            let state = client
                .get(
                    keys.state(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .map_err(err)?;
            let latest = state
                .kvs()
                .iter()
                .map(|kv| kv.mod_revision())
                .max()
                .unwrap_or(0);
            let members = client
                .get(keys.members(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(err)?;
            let mut items = Vec::new();
            for kv in members.kvs() {
                let m: Member = match serde_json::from_slice(kv.value()) {
                    Ok(m) => m,
                    Err(e) => Member {
                        name: kv
                            .key_str()
                            .unwrap_or("?")
                            .rsplit('/')
                            .next()
                            .unwrap_or("?")
                            .into(),
                        error: Some(format!("unreadable member record: {e}")),
                        ..Member::default()
                    },
                };
                items.push(FleetMember {
                    name: m.name,
                    applied_revision: m.applied_revision,
                    seen_revision: m.seen_revision,
                    lag: (latest - m.applied_revision).max(0),
                    error: m.error,
                    missing_keys: m.missing_keys,
                    updated_unix: m.updated_unix,
                });
            }
            Ok(FleetStatus {
                this: me.name,
                state_revision: latest,
                members: items,
            })
        })
    }

    /// Connects without starting the sync task: writes then compare against revisions this
    /// handle never read (none), so any existing key is a conflict. For tools and tests that
    /// need a writer that has not caught up.
    pub fn connect_only(&self) -> Result<(), ApiError> {
        let endpoints = self.config.endpoints.clone();
        let opts = self
            .connect_options()
            .map_err(|e| unavailable(format!("{e:#}")))?;
        let client = self.call(async move {
            Client::connect(endpoints, Some(opts))
                .await
                .map_err(|e| unavailable(format!("cannot connect to etcd: {e}")))
        })?;
        *self.client.lock() = Some(client);
        Ok(())
    }

    /// Starts the sync task (connect, read, apply, watch, report; reconnect with back-off).
    pub fn start(self: &Arc<Self>, manager: Arc<crate::api::Manager>, state_dir: &std::path::Path) {
        let me = self.clone();
        let cache = state_dir.join(sync::CACHE_FILE);
        if let Ok(bytes) = std::fs::read(&cache) {
            if let Ok(m) = serde_json::from_slice::<Member>(&bytes) {
                let mut mine = self.me.lock();
                mine.applied_revision = m.applied_revision;
                mine.seen_revision = m.seen_revision;
            }
        }
        self.handle()
            .spawn(async move { sync::run(me, manager, cache).await });
    }
}

impl crate::api::FleetStore for Fleet {
    fn write(&self, old: &StateData, new: &StateData) -> Result<(), ApiError> {
        self.write_txn(old, new)
    }
    fn status(&self) -> Result<FleetStatus, ApiError> {
        self.members()
    }
    fn seen_config(&self) -> Option<Option<Arc<str>>> {
        self.seen_config.lock().clone()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(v).map_err(|e| ApiError::internal(format!("cannot encode: {e}")))
}

fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "fleet_unavailable",
        message,
    )
}
