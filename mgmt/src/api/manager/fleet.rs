//! Fleet mode (the `fleet` module): the state read from etcd applied through the same checks
//! and the same snapshot builder as a local change, and the fleet's status for the API.

use std::sync::Arc;
use std::time::SystemTime;

use super::Manager;
use crate::api::error::ApiError;
use crate::api::wire::FleetStatus;
use crate::snapshot::Scope;
use crate::state::{for_each_change, is_bound, Binding, Map, StateData, StoredCrl};

/// What applying the fleet's state did.
#[derive(Debug)]
pub struct Applied {
    /// Something changed (a new snapshot went live).
    pub changed: bool,
    /// Certificates whose key this appliance's HSM lacks (left out of its bindings).
    pub missing_keys: Vec<String>,
}

/// `bindings` without the certificates in `missing`; a binding left with none is dropped.
fn without(bindings: Map<Arc<Binding>>, missing: &[String]) -> Map<Arc<Binding>> {
    if missing.is_empty() {
        return bindings;
    }
    bindings
        .into_iter()
        .filter_map(|(listener, b)| {
            if missing.iter().all(|id| b.positions(id).is_empty()) {
                return Some((listener, b));
            }
            let kept: Vec<_> = b
                .certificates
                .iter()
                .filter(|c| !missing.contains(&c.cert))
                .cloned()
                .collect();
            if kept.is_empty() {
                tracing::warn!(listener = %listener, "fleet: no certificate of this listener's binding has its key on this appliance's HSM; it serves its configuration file's certificates");
                return None;
            }
            Some((listener.clone(), Arc::new(Binding::new(listener, kept))))
        })
        .collect()
}

/// The fleet store a manager writes through (the etcd client of the `fleet` module).
pub trait FleetStore: Send + Sync {
    /// Writes the difference between `old` and `new` as one transaction; a `fleet_conflict`
    /// when the state changed since it was read.
    fn write(&self, old: &StateData, new: &StateData) -> Result<(), ApiError>;
    /// Every member's report.
    fn status(&self) -> Result<FleetStatus, ApiError>;
    /// The fleet configuration etcd held at the last read (`None`: not read yet), also when
    /// that state was refused: a write of the configuration this appliance serves then still
    /// replaces the refused one.
    fn seen_config(&self) -> Option<Option<Arc<str>>> {
        None
    }
}

impl Manager {
    /// Turns fleet mode on: from now on every change is written to etcd first.
    pub fn set_fleet(&self, fleet: Arc<dyn FleetStore>) {
        let _ = self.fleet.set(fleet);
    }

    /// The state as this appliance serves it (what seeds an empty fleet).
    pub fn state(&self) -> StateData {
        self.lock().state.clone()
    }

    /// `GET /v1/fleet`: every member's applied revision, lag and error.
    pub fn fleet_status(&self) -> Result<FleetStatus, ApiError> {
        self.fleet
            .get()
            .ok_or_else(|| {
                ApiError::conflict("fleet_off", "no [fleet] section: this appliance is alone")
            })?
            .status()
    }

    /// Replaces the certificates, bindings, API-uploaded CRLs and client CA bundles with the
    /// fleet's (`fleet`). Every
    /// certificate that changed is loaded and checked against its key, as an upload is, and the
    /// whole snapshot is built; anything wrong refuses the whole state and nothing changes —
    /// except a certificate whose key this appliance's HSM does not hold (`key_not_found`):
    /// that one is left out of this appliance's bindings (a binding left with none is dropped,
    /// so the listener serves its configuration file's certificates) and reported, while the
    /// others serve it. Such a certificate is checked again at every later apply.
    pub fn apply_fleet(&self, fleet: StateData) -> Result<Applied, ApiError> {
        let StateData {
            certs,
            bindings,
            crls,
            client_cas,
            fleet_config,
        } = fleet;
        let mut inner = self.lock();
        let now = SystemTime::now();
        let mut missing = Vec::new();
        for c in certs.values() {
            let unchanged = inner.state.certs.get(&c.id) == Some(c);
            let bound_there = is_bound(&bindings, &c.id);
            let bound_here = is_bound(&inner.state.bindings, &c.id);
            let recheck = inner.missing_keys.contains(&c.id) || (bound_there && !bound_here);
            if unchanged && !recheck {
                continue;
            }
            match self.check_cert(&inner.config, c, now) {
                Ok(_) => {}
                Err(e) if e.code == "key_not_found" => {
                    tracing::warn!(certificate = %c.id, error = %e.message,
                        "fleet: this appliance's HSM lacks the key of a certificate; it is not bound here");
                    missing.push(c.id.clone());
                }
                Err(e) => {
                    return Err(ApiError::invalid(
                        e.code,
                        format!("certificate {:?}: {}", c.id, e.message),
                    ))
                }
            }
        }
        let bindings = without(bindings, &missing);
        // A listener with an empty CRL list is the same as one without.
        let local_crls: Map<Vec<StoredCrl>> = inner
            .state
            .crls
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(l, v)| (l.clone(), v.clone()))
            .collect();
        if inner.state.certs == certs
            && inner.state.bindings == bindings
            && local_crls == crls
            && inner.state.client_cas == client_cas
            && inner.state.fleet_config == fleet_config
        {
            inner.missing_keys = missing.clone();
            return Ok(Applied {
                changed: false,
                missing_keys: missing,
            });
        }
        let old = inner.state.clone();
        let mut new_state = inner.state.clone();
        new_state.certs = certs;
        new_state.bindings = bindings;
        new_state.crls = crls;
        new_state.client_cas = client_cas;
        // A new fleet configuration: this appliance's file with it merged, checked as a reload.
        let config = if new_state.fleet_config == fleet_config {
            None
        } else {
            let c =
                crate::config::Config::load_with_fleet(&inner.config.path, fleet_config.as_deref())
                    .map_err(|e| ApiError::invalid("fleet_config_invalid", e.to_string()))?;
            Some(c)
        };
        new_state.fleet_config = fleet_config;
        let built = self.build(
            config.as_ref().unwrap_or(&inner.config),
            &new_state,
            Scope::All,
            None,
        )?;
        // The state directory caches what is applied: an appliance restarted while etcd is
        // unreachable serves it.
        let persist = || -> anyhow::Result<()> {
            for_each_change(&old.certs, &new_state.certs, |id, c| match c {
                Some(c) => self.store.put_cert(c),
                None => self.store.delete_cert(id),
            })?;
            for_each_change(&old.bindings, &new_state.bindings, |l, b| match b {
                Some(b) => self.store.put_binding(b),
                None => self.store.delete_binding(l),
            })?;
            for_each_change(&old.crls, &new_state.crls, |l, v| {
                self.store.put_crls(l, v.map_or(&[][..], Vec::as_slice))
            })?;
            for_each_change(&old.client_cas, &new_state.client_cas, |l, c| match c {
                Some(c) => self.store.put_client_ca(c),
                None => self.store.delete_client_ca(l),
            })?;
            if old.fleet_config != new_state.fleet_config {
                self.store
                    .put_fleet_config(new_state.fleet_config.as_deref())?;
            }
            Ok(())
        };
        persist().map_err(|e| ApiError::state_write(&e))?;
        inner.state = new_state;
        if let Some(c) = config {
            inner.config = c;
        }
        let snapshot = self.commit(built);
        (self.publish)(Arc::new(snapshot));
        inner.missing_keys = missing.clone();
        Ok(Applied {
            changed: true,
            missing_keys: missing,
        })
    }
}
