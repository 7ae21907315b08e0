//! Certificates that renew themselves: an ACME client (RFC 8555) whose certificate keys are
//! generated on the token and never leave it.
//!
//! ```text
//!  token: generate key (sensitive, non-extractable) ─► CSR signed by the token key
//!  ACME task (mgmt runtime) ─► new order (its URL persisted) ─► authorizations
//!     ─► challenge published in `Challenges` ─► the data plane answers tls-alpn-01 on the
//!        listener (or the [acme_http01] listener answers http-01) ─► CA validates
//!     ─► finalize with the CSR ─► chain ─► Manager::acme_install (the snapshot builder,
//!        persisted, published: live without a restart) ─► stapler (when the CA has OCSP)
//! ```
//!
//! One task per `[[acme]]` entry on the management runtime; token calls and installs run on
//! blocking threads, so neither the data plane nor the management API lock waits on the CA.
//! Progress (the order in flight, the next attempt, keys to delete) is in the state directory
//! (`store`), so a restart resumes an order instead of placing another. In a fleet one
//! appliance orders for all, its progress and challenges in etcd (`home`,
//! [`crate::fleet::acme`]).

pub mod challenge;
mod home;
mod http;
pub mod http01;
pub mod store;
mod task;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use parking_lot::Mutex;
use tlsgate_keystore::Token;

pub use challenge::Challenges;
pub use store::{AcmeStore, ProblemView};

use crate::api::Manager;
use crate::config::acme::AcmeConfig;

pub use crate::api::wire::AcmeStatus;

/// An entry's shared state: its configuration, status, and the "renew now" signal.
#[derive(Debug)]
pub(crate) struct Entry {
    cfg: AcmeConfig,
    directory_ca: Option<PathBuf>,
    status: Mutex<AcmeStatus>,
    renew: tokio::sync::Notify,
}

/// The ACME client of the process.
#[derive(Debug)]
pub struct Acme {
    entries: Vec<Arc<Entry>>,
    challenges: Arc<Challenges>,
}

impl Acme {
    /// `None` when the configuration has no `[[acme]]`.
    pub fn new(config: &crate::config::Config) -> Option<Arc<Acme>> {
        if config.acme.is_empty() {
            return None;
        }
        let entries = config
            .acme
            .iter()
            .map(|a| {
                Arc::new(Entry {
                    cfg: a.clone(),
                    directory_ca: a.directory_ca.as_ref().map(|p| config.resolve(p)),
                    status: Mutex::new(AcmeStatus {
                        name: a.name.clone(),
                        names: a.names.clone(),
                        state: "pending".into(),
                        ..AcmeStatus::default()
                    }),
                    renew: tokio::sync::Notify::new(),
                })
            })
            .collect();
        Some(Arc::new(Acme {
            entries,
            challenges: Challenges::new(),
        }))
    }

    pub fn challenges(&self) -> &Arc<Challenges> {
        &self.challenges
    }
}

impl crate::api::manager::AcmeControl for Acme {
    /// Every entry's status, in configuration order.
    fn status(&self) -> Vec<AcmeStatus> {
        self.entries
            .iter()
            .map(|e| e.status.lock().clone())
            .collect()
    }

    /// Asks entry `name` to renew now (after a running attempt ends); false: no such entry.
    fn renew(&self, name: &str) -> bool {
        match self.entries.iter().find(|e| e.cfg.name == name) {
            Some(e) => {
                e.renew.notify_one();
                true
            }
            None => false,
        }
    }
}

impl Acme {
    /// Starts one task per entry on the current runtime.
    /// In fleet mode (`fleet`), one appliance of the fleet orders and every one answers the
    /// challenges ([`crate::fleet::acme`]).
    pub fn start(
        self: &Arc<Self>,
        manager: Arc<Manager>,
        token: Arc<Token>,
        state_dir: &std::path::Path,
        fleet: Option<Arc<crate::fleet::Fleet>>,
    ) -> Result<()> {
        let store = AcmeStore::open(state_dir)?;
        let fleet = fleet.map(|fleet| {
            fleet.mirror_challenges(self.challenges.clone());
            home::FleetHome {
                role: fleet.acme_campaign(),
                fleet,
            }
        });
        let ctx = Arc::new(task::Ctx {
            manager,
            token,
            store,
            challenges: self.challenges.clone(),
            fleet,
        });
        for e in &self.entries {
            tokio::spawn(task::run(ctx.clone(), e.clone()));
        }
        Ok(())
    }
}
