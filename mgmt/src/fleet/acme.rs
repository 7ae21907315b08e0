//! ACME for a fleet: one appliance orders for every `[[acme]]` entry, any appliance answers.
//!
//! ```text
//! <prefix>/acme/orderer                      the orderer's member name, bound to its lease
//! <prefix>/acme/progress/<entry>             the entry's progress (the order in flight, ...)
//! <prefix>/acme/accounts/<entry>             the ACME account, sealed by the token's secret
//! <prefix>/acme/challenges/tls-alpn-01/<name> SHA-256 of the key authorization (hex), and
//! <prefix>/acme/challenges/http-01/<token>    the key authorization: both bound to the
//!                                             orderer's lease
//! <prefix>/acme/seen/<member>                the challenge revision a member answers for
//! ```
//!
//! The orderer is elected by a transaction that creates `acme/orderer` with this appliance's
//! lease only when it does not exist; the others try again every second and take over within
//! the lease's TTL of the orderer's death. The orderer writes progress and challenges in
//! transactions that compare `acme/orderer`'s lease with its own, so an appliance that lost the
//! role (its lease expired while it was cut off) cannot overwrite its successor's progress.
//! A successor reads the progress and resumes the order in flight with the same account.
//!
//! Every appliance with `[[acme]]` mirrors `acme/challenges/` into its own [`ChallengeSink`] (so
//! the CA's validation may reach any of them) and acknowledges the revision it mirrored under
//! `acme/seen/<member>`; the orderer asks the CA to validate once every member has
//! acknowledged the challenge (or after [`SEEN_TIMEOUT`], with a warning).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio::sync::watch;

use super::{Fleet, Keys};

/// What answers challenges on this appliance (the ACME client's challenge table): the mirror
/// loads into it what the orderer publishes.
pub trait ChallengeSink: Send + Sync + 'static {
    /// Answers `tls-alpn-01` for `name` with this SHA-256 of the key authorization.
    fn add_tls_alpn(&self, name: &str, digest: &[u8]) -> Result<()>;
    fn remove_tls_alpn(&self, name: &str);
    /// Answers `http-01` for `token` with this key authorization.
    fn add_http01(&self, token: &str, key_authorization: &str);
    fn remove_http01(&self, token: &str);
}

/// How long the orderer waits for every member to answer a new challenge: about a member
/// lease, after which a member that died is no longer listed.
pub const SEEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an appliance that does not order tries to take the role.
const CAMPAIGN_EVERY: Duration = Duration::from_secs(1);
/// How long one etcd call of the ACME client may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// This appliance's part in the fleet's ACME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not connected to etcd yet, or the role was just lost.
    Unknown,
    /// This appliance orders; its writes are guarded by this lease.
    Orderer { lease: i64 },
    /// Another member orders (`None`: nobody holds the role at this instant).
    Standby { orderer: Option<String> },
}

impl Keys {
    fn acme_orderer(&self) -> String {
        format!("{}/acme/orderer", self.prefix)
    }
    pub(crate) fn acme_progress(&self, entry: &str) -> String {
        format!("{}/acme/progress/{entry}", self.prefix)
    }
    pub(crate) fn acme_account(&self, entry: &str) -> String {
        format!("{}/acme/accounts/{entry}", self.prefix)
    }
    fn acme_challenges(&self) -> String {
        format!("{}/acme/challenges/", self.prefix)
    }
    pub(crate) fn acme_tls_alpn(&self, name: &str) -> String {
        format!(
            "{}tls-alpn-01/{}",
            self.acme_challenges(),
            name.to_ascii_lowercase()
        )
    }
    pub(crate) fn acme_http01(&self, token: &str) -> String {
        format!("{}http-01/{token}", self.acme_challenges())
    }
    fn acme_seen(&self) -> String {
        format!("{}/acme/seen/", self.prefix)
    }
}

impl Fleet {
    /// The sync task's client once it has one (waits while it connects).
    async fn client_async(&self) -> Client {
        loop {
            if let Some(c) = self.client.lock().clone() {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `fut` on the fleet runtime (where the etcd client lives), bounded by
    /// [`CALL_TIMEOUT`].
    async fn on_fleet<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let joined = self
            .handle()
            .spawn(async move { tokio::time::timeout(CALL_TIMEOUT, fut).await })
            .await
            .map_err(|e| anyhow!("the fleet task did not finish: {e}"))?;
        joined.map_err(|_| anyhow!("etcd did not answer within {CALL_TIMEOUT:?}"))?
    }

    /// Starts campaigning for the orderer role; the receiver follows this appliance's role.
    pub fn acme_campaign(self: &Arc<Self>) -> watch::Receiver<Role> {
        let (tx, rx) = watch::channel(Role::Unknown);
        let me = self.clone();
        self.handle().spawn(async move {
            loop {
                if let Err(e) = campaign(&me, &tx).await {
                    tracing::warn!(error = %format!("{e:#}"), "fleet ACME: orderer election failed; trying again");
                }
                tx.send_replace(Role::Unknown);
                tokio::time::sleep(CAMPAIGN_EVERY).await;
            }
        });
        rx
    }

    /// Starts mirroring the fleet's published challenges into `challenges`.
    pub fn mirror_challenges(self: &Arc<Self>, challenges: Arc<dyn ChallengeSink>) {
        let me = self.clone();
        self.handle().spawn(async move {
            let mut mirrored = HashSet::new();
            loop {
                if let Err(e) = mirror(&me, &*challenges, &mut mirrored).await {
                    tracing::warn!(error = %format!("{e:#}"), "fleet ACME: challenge watch failed; reading again");
                }
                tokio::time::sleep(CAMPAIGN_EVERY).await;
            }
        });
    }

    /// The value of `key`, if any.
    pub(crate) async fn acme_get(self: &Arc<Self>, key: String) -> Result<Option<Vec<u8>>> {
        let me = self.clone();
        self.on_fleet(async move {
            let mut client = me.client_async().await;
            let resp = client.get(key, None).await?;
            Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
        })
        .await
    }

    /// Puts `key` while this appliance holds the orderer role with `lease` (bound to the lease
    /// when `bound`); returns the revision written.
    pub(crate) async fn acme_put(
        self: &Arc<Self>,
        lease: i64,
        key: String,
        value: Vec<u8>,
        bound: bool,
    ) -> Result<i64> {
        let me = self.clone();
        self.on_fleet(async move {
            let mut client = me.client_async().await;
            let opts = bound.then(|| PutOptions::new().with_lease(lease));
            let txn = Txn::new()
                .when([Compare::lease(
                    me.keys.acme_orderer(),
                    CompareOp::Equal,
                    lease,
                )])
                .and_then([TxnOp::put(key, value, opts)]);
            let resp = client.txn(txn).await?;
            if !resp.succeeded() {
                anyhow::bail!("this appliance no longer orders for the fleet (another took over)");
            }
            Ok(resp.header().map_or(0, |h| h.revision()))
        })
        .await
    }

    /// Deletes `key` (a challenge answered or abandoned), in the background.
    pub(crate) fn acme_forget(self: &Arc<Self>, key: String) {
        let me = self.clone();
        self.handle().spawn(async move {
            let mut client = me.client_async().await;
            if let Err(e) = client.delete(key.clone(), None).await {
                tracing::warn!(key, error = %e, "fleet ACME: cannot delete a challenge; it goes with the orderer's lease");
            }
        });
    }

    /// Waits until every member has acknowledged the challenges of `revision`; `Err` names the
    /// members that have not after [`SEEN_TIMEOUT`].
    pub(crate) async fn acme_wait_seen(self: &Arc<Self>, revision: i64) -> Result<()> {
        let start = tokio::time::Instant::now();
        loop {
            let me = self.clone();
            let behind = self
                .on_fleet(async move {
                    let mut client = me.client_async().await;
                    let members = client
                        .get(
                            me.keys.members(),
                            Some(GetOptions::new().with_prefix().with_keys_only()),
                        )
                        .await?;
                    let seen = client
                        .get(me.keys.acme_seen(), Some(GetOptions::new().with_prefix()))
                        .await?;
                    let seen: HashMap<String, i64> = seen
                        .kvs()
                        .iter()
                        .filter_map(|kv| {
                            let name = kv.key_str().ok()?.rsplit('/').next()?.to_owned();
                            let rev = kv.value_str().ok()?.parse().ok()?;
                            Some((name, rev))
                        })
                        .collect();
                    Ok(members
                        .kvs()
                        .iter()
                        .filter_map(|kv| Some(kv.key_str().ok()?.rsplit('/').next()?.to_owned()))
                        .filter(|m| seen.get(m).copied().unwrap_or(0) < revision)
                        .collect::<Vec<String>>())
                })
                .await?;
            if behind.is_empty() {
                return Ok(());
            }
            if start.elapsed() > SEEN_TIMEOUT {
                anyhow::bail!("members {behind:?} have not loaded the challenge");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One term: take the role (or report who has it) and hold it until the lease fails.
async fn campaign(fleet: &Arc<Fleet>, tx: &watch::Sender<Role>) -> Result<()> {
    let key = fleet.keys.acme_orderer();
    let lease = loop {
        let mut client = fleet.client_async().await;
        let lease = client
            .lease_grant(fleet.config.lease_ttl_s, None)
            .await?
            .id();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                fleet.name.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            break lease;
        }
        let _ = client.lease_revoke(lease).await;
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        tx.send_if_modified(|r| {
            let new = Role::Standby { orderer: holder };
            let changed = *r != new;
            *r = new;
            changed
        });
        tokio::time::sleep(CAMPAIGN_EVERY).await;
    };
    tracing::info!(member = %fleet.name, "fleet ACME: this appliance orders for the fleet");
    tx.send_replace(Role::Orderer { lease });
    let mut client = fleet.client_async().await;
    let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(
        (fleet.config.lease_ttl_s as u64 / 3).max(1),
    ));
    loop {
        tick.tick().await;
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(r) if r.ttl() > 0 => {}
            _ => anyhow::bail!("the orderer's lease expired"),
        }
    }
}

/// Reads the published challenges, loads them, and follows them until the watch fails.
async fn mirror(
    fleet: &Arc<Fleet>,
    challenges: &dyn ChallengeSink,
    mirrored: &mut HashSet<String>,
) -> Result<()> {
    let mut client = fleet.client_async().await;
    let prefix = fleet.keys.acme_challenges();
    let resp = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut now = HashSet::new();
    for kv in resp.kvs() {
        let key = kv.key_str()?.to_owned();
        load(challenges, &prefix, &key, kv.value());
        now.insert(key);
    }
    for gone in mirrored.difference(&now) {
        unload(challenges, &prefix, gone);
    }
    *mirrored = now;
    acknowledge(fleet, &mut client, revision).await?;
    let mut watch = client
        .watch(
            prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    while let Some(msg) = watch.message().await? {
        if msg.canceled() || msg.compact_revision() > 0 {
            anyhow::bail!("the challenge watch was cancelled or compacted");
        }
        let mut last = None;
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = kv.key_str()?.to_owned();
            match ev.event_type() {
                EventType::Put => {
                    load(challenges, &prefix, &key, kv.value());
                    mirrored.insert(key);
                }
                EventType::Delete => {
                    unload(challenges, &prefix, &key);
                    mirrored.remove(&key);
                }
            }
            last = Some(kv.mod_revision());
        }
        if let Some(rev) = last {
            acknowledge(fleet, &mut client, rev).await?;
        }
    }
    anyhow::bail!("the challenge watch ended")
}

/// Records that this member answers the challenges of `revision`.
async fn acknowledge(fleet: &Fleet, client: &mut Client, revision: i64) -> Result<()> {
    client
        .put(
            format!("{}{}", fleet.keys.acme_seen(), fleet.name),
            revision.to_string(),
            None,
        )
        .await
        .context("acknowledge the challenges")?;
    Ok(())
}

fn load(challenges: &dyn ChallengeSink, prefix: &str, key: &str, value: &[u8]) {
    let rest = key.strip_prefix(prefix).unwrap_or(key);
    let outcome = if let Some(name) = rest.strip_prefix("tls-alpn-01/") {
        hex::decode(value)
            .map_err(|e| anyhow!("not hex: {e}"))
            .and_then(|digest| challenges.add_tls_alpn(name, &digest))
    } else if let Some(token) = rest.strip_prefix("http-01/") {
        std::str::from_utf8(value)
            .map_err(|e| anyhow!("not UTF-8: {e}"))
            .map(|ka| challenges.add_http01(token, ka))
    } else {
        Err(anyhow!("not a challenge key"))
    };
    match outcome {
        Ok(()) => tracing::info!(
            key,
            "fleet ACME: challenge loaded; this appliance answers it"
        ),
        Err(e) => {
            tracing::warn!(key, error = %format!("{e:#}"), "fleet ACME: a published challenge is malformed; not answered here")
        }
    }
}

fn unload(challenges: &dyn ChallengeSink, prefix: &str, key: &str) {
    let rest = key.strip_prefix(prefix).unwrap_or(key);
    if let Some(name) = rest.strip_prefix("tls-alpn-01/") {
        challenges.remove_tls_alpn(name);
    } else if let Some(token) = rest.strip_prefix("http-01/") {
        challenges.remove_http01(token);
    }
}
