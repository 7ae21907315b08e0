//! Where an entry's progress, account and challenges live. Alone: the state directory
//! ([`AcmeStore`]) and this appliance's challenge table. In a fleet: etcd
//! ([`crate::fleet::acme`]) — the orderer's progress and sealed account are the fleet's, so a
//! successor resumes the order in flight; challenges are published there for every appliance
//! to answer; the state directory keeps a copy of the progress.

use std::sync::Arc;

use tokio::sync::watch;
use zeroize::Zeroizing;

use super::store::Progress;
use super::task::Ctx;
use super::Challenges;
use crate::fleet::acme::Role;
use crate::fleet::Fleet;

/// Runs `f` on a blocking thread (state files, the token); its error as text.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e:#}"))
}

/// The fleet side of the ACME client, when `[fleet]` is configured.
pub(crate) struct FleetHome {
    pub fleet: Arc<Fleet>,
    pub role: watch::Receiver<Role>,
}

/// Whether this appliance orders now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Turn {
    /// Not in a fleet: it always orders.
    Alone,
    /// The fleet's orderer, with this lease.
    Orderer(i64),
    /// Another member orders (its name when known).
    Standby(Option<String>),
}

impl Ctx {
    pub(super) fn turn(&self) -> Turn {
        match &self.fleet {
            None => Turn::Alone,
            Some(h) => match &*h.role.borrow() {
                Role::Orderer { lease } => Turn::Orderer(*lease),
                Role::Standby { orderer } => Turn::Standby(orderer.clone()),
                Role::Unknown => Turn::Standby(None),
            },
        }
    }

    /// Resolves when this appliance's turn is no longer `seen` (never outside a fleet).
    pub(super) async fn turn_changed(&self, seen: &Turn) {
        let Some(h) = &self.fleet else {
            return std::future::pending().await;
        };
        let mut rx = h.role.clone();
        loop {
            rx.borrow_and_update();
            if self.turn() != *seen {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    fn orderer(&self) -> Result<(&Arc<Fleet>, i64), String> {
        let Some(h) = &self.fleet else {
            return Err("not in a fleet".into());
        };
        match self.turn() {
            Turn::Orderer(lease) => Ok((&h.fleet, lease)),
            _ => Err("this appliance no longer orders for the fleet".into()),
        }
    }

    /// The entry's progress: the fleet's when in one (the state directory's copy when the
    /// fleet has none yet: an appliance moved into a fleet), else the state directory's.
    pub(super) async fn load_progress(&self, name: &str) -> Result<Progress, String> {
        if let Some(h) = &self.fleet {
            let key = h.fleet.keys().acme_progress(name);
            if let Some(bytes) = h.fleet.acme_get(key).await.map_err(|e| format!("{e:#}"))? {
                return serde_json::from_slice(&bytes)
                    .map_err(|e| format!("the fleet's progress of {name}: {e}"));
            }
        }
        let (store, n) = (self.store.clone(), name.to_owned());
        off_thread(move || store.load_progress(&n)).await
    }

    /// Saves the progress: to the fleet first (only while this appliance orders), then to the
    /// state directory.
    pub(super) async fn save_progress(&self, name: &str, p: &Progress) -> Result<(), String> {
        if self.fleet.is_some() {
            let (fleet, lease) = self.orderer()?;
            let bytes = serde_json::to_vec(p).map_err(|e| e.to_string())?;
            fleet
                .acme_put(lease, fleet.keys().acme_progress(name), bytes, false)
                .await
                .map_err(|e| format!("{e:#}"))?;
        }
        let (store, n, p) = (self.store.clone(), name.to_owned(), p.clone());
        off_thread(move || store.save_progress(&n, &p)).await
    }

    /// The account credentials (JSON) for `directory`, unsealed by the token.
    pub(super) async fn load_account(
        &self,
        name: &str,
        directory: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        let (store, token, n, d) = (
            self.store.clone(),
            self.token.clone(),
            name.to_owned(),
            directory.to_owned(),
        );
        match &self.fleet {
            None => off_thread(move || store.load_account(&n, &d, &token)).await,
            Some(h) => {
                let key = h.fleet.keys().acme_account(name);
                let Some(bytes) = h.fleet.acme_get(key).await.map_err(|e| format!("{e:#}"))? else {
                    return Ok(None);
                };
                off_thread(move || store.unseal_account(&n, &d, &token, &bytes))
                    .await
                    .map_err(|e| format!("the fleet's account: {e}"))
            }
        }
    }

    pub(super) async fn save_account(
        &self,
        name: &str,
        directory: &str,
        json: Zeroizing<Vec<u8>>,
    ) -> Result<(), String> {
        let (store, token, n, d) = (
            self.store.clone(),
            self.token.clone(),
            name.to_owned(),
            directory.to_owned(),
        );
        if self.fleet.is_none() {
            return off_thread(move || store.save_account(&n, &d, &token, &json)).await;
        }
        let (fleet, lease) = self.orderer()?;
        let sealed = off_thread(move || store.seal_account(&n, &d, &token, &json)).await?;
        fleet
            .acme_put(lease, fleet.keys().acme_account(name), sealed, false)
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }

    /// A `Published` set for one attempt.
    pub(super) fn published(&self) -> Published {
        Published {
            challenges: self.challenges.clone(),
            fleet: self.fleet.as_ref().map(|h| h.fleet.clone()),
            names: Vec::new(),
            tokens: Vec::new(),
            revision: 0,
        }
    }
}

/// The challenges one attempt published; withdrawn when the attempt ends, however it ends.
pub(super) struct Published {
    challenges: Arc<Challenges>,
    fleet: Option<Arc<Fleet>>,
    names: Vec<String>,
    tokens: Vec<String>,
    /// The fleet revision of the newest challenge published.
    revision: i64,
}

impl Published {
    /// Serves a `tls-alpn-01` challenge for `name`: here, or on every appliance of the fleet.
    pub(super) async fn tls_alpn(
        &mut self,
        ctx: &Ctx,
        name: &str,
        digest: &[u8],
    ) -> Result<(), String> {
        self.names.push(name.to_owned());
        match &self.fleet {
            None => self
                .challenges
                .add_tls_alpn(name, digest)
                .map_err(|e| format!("{e:#}")),
            Some(f) => {
                let (_, lease) = ctx.orderer()?;
                let key = f.keys().acme_tls_alpn(name);
                self.revision = f
                    .acme_put(lease, key, hex::encode(digest).into_bytes(), true)
                    .await
                    .map_err(|e| format!("publish in the fleet: {e:#}"))?;
                Ok(())
            }
        }
    }

    /// Serves an `http-01` challenge: here, or on every appliance of the fleet.
    pub(super) async fn http01(
        &mut self,
        ctx: &Ctx,
        token: &str,
        key_authorization: &str,
    ) -> Result<(), String> {
        self.tokens.push(token.to_owned());
        match &self.fleet {
            None => {
                self.challenges.add_http01(token, key_authorization);
                Ok(())
            }
            Some(f) => {
                let (_, lease) = ctx.orderer()?;
                let key = f.keys().acme_http01(token);
                self.revision = f
                    .acme_put(lease, key, key_authorization.as_bytes().to_vec(), true)
                    .await
                    .map_err(|e| format!("publish in the fleet: {e:#}"))?;
                Ok(())
            }
        }
    }

    /// In a fleet: waits until every member answers what was published (a warning, not a
    /// failure, when some member does not: the CA may not reach it).
    pub(super) async fn wait_answered(&self, entry: &str) {
        if let (Some(f), true) = (&self.fleet, self.revision > 0) {
            match f.acme_wait_seen(self.revision).await {
                Ok(()) => tracing::info!(acme = %entry, "every fleet member answers the challenge"),
                Err(e) => {
                    tracing::warn!(acme = %entry, error = %format!("{e:#}"), "asking the CA to validate although some fleet members may not answer")
                }
            }
        }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        for n in &self.names {
            match &self.fleet {
                None => self.challenges.remove_tls_alpn(n),
                Some(f) => f.acme_forget(f.keys().acme_tls_alpn(n)),
            }
        }
        for t in &self.tokens {
            match &self.fleet {
                None => self.challenges.remove_http01(t),
                Some(f) => f.acme_forget(f.keys().acme_http01(t)),
            }
        }
    }
}
