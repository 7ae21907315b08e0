//! The sync task of one appliance: connect, read the whole state, apply it through the
//! management plane, report under a lease-bound member key, watch from the revision read;
//! on any etcd failure keep serving and reconnect with back-off. An appliance that joins an
//! empty fleet without ever having applied a fleet state seeds it with its state directory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};

use super::{Fleet, Member};
use crate::state::StateData;
use crate::state::{check_name, Binding, Map, StoredCert, StoredClientCa, StoredCrl};

/// The applied revision, cached beside the state it describes.
pub(super) const CACHE_FILE: &str = "fleet.json";

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

pub(super) async fn run(fleet: Arc<Fleet>, manager: Arc<crate::api::Manager>, cache: PathBuf) {
    let mut backoff = BACKOFF_MIN;
    // One endpoint per connection, the next one after a failure: a client balanced over every
    // endpoint kept sending some requests to a member that had gone (tcp connect errors ended
    // each new session), so a fleet stopped converging when one etcd member of three died.
    let mut next = 0usize;
    loop {
        let endpoint = fleet.config.endpoints[next % fleet.config.endpoints.len()].clone();
        let mut connected = false;
        match session(&fleet, &manager, &cache, &endpoint, &mut connected).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), endpoint, retry_in_ms = backoff.as_millis() as u64,
                    "fleet: etcd unreachable or failed; serving the last applied state");
            }
        }
        *fleet.client.lock() = None;
        if connected {
            // A session that worked ended: try the next member at once, without a long pause.
            backoff = BACKOFF_MIN;
        }
        next = next.wrapping_add(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection's life (to `endpoint`): returns when etcd fails (an error) or the watch ends;
/// `connected` tells whether it got as far as serving the state.
async fn session(
    fleet: &Arc<Fleet>,
    manager: &Arc<crate::api::Manager>,
    cache: &std::path::Path,
    endpoint: &str,
    connected: &mut bool,
) -> anyhow::Result<()> {
    let mut client = Client::connect([endpoint], Some(fleet.connect_options()?)).await?;
    let lease = client
        .lease_grant(fleet.config.lease_ttl_s, None)
        .await?
        .id();
    let (mut keeper, mut keep_stream) = client.lease_keep_alive(lease).await?;
    *fleet.client.lock() = Some(client.clone());
    *connected = true;
    tracing::info!(member = %fleet.name, endpoint, "fleet: connected to etcd");
    let mut tick = tokio::time::interval(Duration::from_secs(
        (fleet.config.lease_ttl_s as u64 / 3).max(1),
    ));
    loop {
        let revision = sync_once(fleet, manager, &mut client, cache).await?;
        report(fleet, &mut client, lease).await?;
        let mut watch = client
            .watch(
                fleet.keys.state(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        // Wait for a change of the state (then read it whole again), renewing the lease.
        loop {
            tokio::select! {
                msg = watch.message() => {
                    match msg? {
                        None => anyhow::bail!("the watch ended"),
                        Some(r) if r.canceled() || r.compact_revision() > 0 => {
                            // Compacted past our revision: the full read below covers it.
                            break;
                        }
                        Some(r) if !r.events().is_empty() => break,
                        Some(_) => {}
                    }
                }
                _ = tick.tick() => {
                    keeper.keep_alive().await?;
                    if keep_stream.message().await?.is_none_or(|r| r.ttl() <= 0) {
                        anyhow::bail!("the member lease expired");
                    }
                }
            }
        }
    }
}

/// Reads the whole state, applies it, records the outcome; returns the revision read.
async fn sync_once(
    fleet: &Arc<Fleet>,
    manager: &Arc<crate::api::Manager>,
    client: &mut Client,
    cache: &std::path::Path,
) -> anyhow::Result<i64> {
    let mut seeded = false;
    let resp = loop {
        let resp = client
            .get(fleet.keys.state(), Some(GetOptions::new().with_prefix()))
            .await?;
        let never_applied = fleet.me.lock().applied_revision == 0;
        if resp.kvs().is_empty() && never_applied && !seeded {
            seeded = true;
            if seed(fleet, manager, client).await? {
                // Read again: what this appliance wrote, or what another seeded first.
                continue;
            }
        }
        break resp;
    };
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut revisions = HashMap::new();
    let mut raw = Vec::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        revisions.insert(key.clone(), kv.mod_revision());
        raw.push((key, kv.value().to_vec()));
    }
    *fleet.revisions.lock() = revisions;
    let state_prefix = fleet.keys.state();
    let outcome = match parse(&state_prefix, &raw) {
        Err(e) => Err(e),
        Ok(fleet_state) => {
            *fleet.seen_config.lock() = Some(fleet_state.fleet_config.clone());
            let m = manager.clone();
            tokio::task::spawn_blocking(move || m.apply_fleet(fleet_state))
                .await
                .map_err(|e| format!("the apply did not finish: {e}"))
                .and_then(|r| r.map_err(|e| format!("{}: {}", e.code, e.message)))
        }
    };
    let member = {
        let mut me = fleet.me.lock();
        me.seen_revision = revision;
        me.updated_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match outcome {
            Ok(applied) => {
                me.applied_revision = revision;
                me.error = None;
                me.missing_keys = applied.missing_keys;
                tracing::info!(revision, "fleet: state applied");
            }
            Err(e) => {
                tracing::error!(revision, error = %e,
                    "fleet: the state in etcd is refused; the last applied state keeps serving");
                me.error = Some(e);
            }
        }
        me.clone()
    };
    if member.error.is_none() {
        let bytes = serde_json::to_vec(&member)?;
        let cache = cache.to_owned();
        tokio::task::spawn_blocking(move || crate::files::write_atomic(&cache, &bytes, 0o600))
            .await??;
    }
    Ok(revision)
}

/// The state's objects from its keys; any key that is not a well-formed object refuses the whole
/// state (an appliance never applies part of one).
fn parse(prefix: &str, raw: &[(String, Vec<u8>)]) -> Result<StateData, String> {
    let mut certs = Map::new();
    let mut bindings = Map::new();
    let mut crls = Map::new();
    let mut client_cas = Map::new();
    let mut fleet_config = None;
    for (key, value) in raw {
        let rest = key.strip_prefix(prefix).unwrap_or(key);
        let bad = |why: String| format!("{key}: {why}");
        if let Some(id) = rest.strip_prefix("certs/") {
            check_name("certificate", id).map_err(|e| bad(format!("{e:#}")))?;
            let c: StoredCert = serde_json::from_slice(value)
                .map_err(|e| bad(format!("not a certificate: {e}")))?;
            if c.id != id {
                return Err(bad(format!("names certificate {:?}", c.id)));
            }
            certs.insert(id.to_owned(), Arc::new(c));
        } else if let Some(l) = rest.strip_prefix("bindings/") {
            let b: Binding =
                serde_json::from_slice(value).map_err(|e| bad(format!("not a binding: {e}")))?;
            if b.listener != l {
                return Err(bad(format!("names listener {:?}", b.listener)));
            }
            bindings.insert(l.to_owned(), Arc::new(b));
        } else if let Some(l) = rest.strip_prefix("crls/") {
            check_name("listener", l).map_err(|e| bad(format!("{e:#}")))?;
            let v: Vec<StoredCrl> =
                serde_json::from_slice(value).map_err(|e| bad(format!("not a CRL list: {e}")))?;
            // An empty list is no key at all: the writer deletes it.
            if !v.is_empty() {
                crls.insert(l.to_owned(), v);
            }
        } else if rest == "config" {
            let text = std::str::from_utf8(value)
                .map_err(|e| bad(format!("the fleet configuration is not UTF-8: {e}")))?;
            fleet_config = Some(text.into());
        } else if let Some(l) = rest.strip_prefix("client-cas/") {
            check_name("listener", l).map_err(|e| bad(format!("{e:#}")))?;
            let c: StoredClientCa = serde_json::from_slice(value)
                .map_err(|e| bad(format!("not a client CA bundle: {e}")))?;
            if c.listener != l {
                return Err(bad(format!("names listener {:?}", c.listener)));
            }
            client_cas.insert(l.to_owned(), Arc::new(c));
        } else {
            return Err(bad("not a key of the fleet state".into()));
        }
    }
    Ok(StateData {
        certs,
        bindings,
        crls,
        client_cas,
        fleet_config,
    })
}

/// Writes this appliance's state directory (certificates, bindings, CRLs) as the fleet's state,
/// in one transaction that succeeds only while the fleet's state is still empty: an existing
/// appliance moved into fleet mode keeps what it serves, and two appliances seeding at once
/// cannot mix (one wins whole; the other then applies it). Returns whether it wrote anything.
async fn seed(
    fleet: &Arc<Fleet>,
    manager: &Arc<crate::api::Manager>,
    client: &mut Client,
) -> anyhow::Result<bool> {
    let mut ops = Vec::new();
    // Everything the local state holds: the keys a write from an empty state would put.
    fleet
        .key_changes(&StateData::default(), &manager.state(), |key, value| {
            ops.extend(value.map(|v| TxnOp::put(key, v, None)));
        })
        .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
    if ops.is_empty() {
        return Ok(false);
    }
    let objects = ops.len();
    // No key under the state prefix (an empty range compares as created at revision 0).
    let empty = Compare::create_revision(fleet.keys.state(), CompareOp::Equal, 0).with_prefix();
    let resp = client.txn(Txn::new().when([empty]).and_then(ops)).await?;
    if resp.succeeded() {
        tracing::info!(
            objects,
            "fleet: the fleet's state was empty; seeded it with this appliance's state directory"
        );
    } else {
        tracing::info!("fleet: another appliance seeded the empty fleet first; applying its state");
    }
    Ok(true)
}

/// Puts this appliance's member record, bound to its lease.
async fn report(fleet: &Arc<Fleet>, client: &mut Client, lease: i64) -> anyhow::Result<()> {
    let me: Member = fleet.me.lock().clone();
    client
        .put(
            fleet.keys.member(&fleet.name),
            serde_json::to_vec(&me)?,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stray_or_malformed_key_refuses_the_whole_state() {
        let p = "/t/state/";
        let cert = br#"{"id":"web","key":"k","chain_pem":"x","updated_unix":1}"#.to_vec();
        let ok = parse(p, &[("/t/state/certs/web".into(), cert.clone())]).expect("parses");
        assert_eq!(ok.certs["web"].key, "k");
        let crls = br#"[{"id":"0123456789abcdef","pem":"x"}]"#.to_vec();
        let ok = parse(p, &[("/t/state/crls/web".into(), crls)]).expect("parses");
        assert_eq!(ok.crls["web"][0].id, "0123456789abcdef");
        let none = parse(p, &[("/t/state/crls/web".into(), b"[]".to_vec())]).expect("parses");
        assert!(none.crls.is_empty(), "an empty list is no CRLs");
        let ca = br#"{"listener":"web","pem":"x","updated_unix":1}"#.to_vec();
        let ok = parse(p, &[("/t/state/client-cas/web".into(), ca.clone())]).expect("parses");
        assert_eq!(ok.client_cas["web"].pem, "x");
        for (k, v) in [
            ("/t/state/certs/api", cert.clone()),
            ("/t/state/certs/web", b"{".to_vec()),
            ("/t/state/other/x", cert.clone()),
            ("/t/state/bindings/web", cert.clone()),
            ("/t/state/crls/web", cert),
            ("/t/state/client-cas/api", ca.clone()),
            ("/t/state/client-cas/web", b"[]".to_vec()),
        ] {
            let err = parse(p, &[(k.into(), v)]).expect_err(k);
            assert!(err.starts_with(k), "{err}");
        }
    }
}
