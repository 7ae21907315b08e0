//! Fleet mode (the `fleet` module): the state read from etcd applied through the same checks
//! and the same snapshot builder as a local change, and the fleet's status for the API.

use std::sync::Arc;
use std::time::SystemTime;

use super::Manager;
use crate::api::error::ApiError;
use crate::api::wire::FleetStatus;
use crate::snapshot::Scope;
use crate::state::{for_each_change, Binding, Map, StateData, StoredCert, StoredCrl};

/// The fleet store a manager writes through (the etcd client of the `fleet` module).
pub trait FleetStore: Send + Sync {
    /// Writes the difference between `old` and `new` as one transaction; a `fleet_conflict`
    /// when the state changed since it was read.
    fn write(&self, old: &StateData, new: &StateData) -> Result<(), ApiError>;
    /// Every member's report.
    fn status(&self) -> Result<FleetStatus, ApiError>;
}

impl Manager {
    /// Turns fleet mode on: from now on every change is written to etcd first.
    pub fn set_fleet(&self, fleet: Arc<dyn FleetStore>) {
        let _ = self.fleet.set(fleet);
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

    /// Replaces the certificates, bindings and API-uploaded CRLs with the fleet's. Every
    /// certificate that changed is loaded and checked against its key, as an upload is, and the
    /// whole snapshot is built; anything wrong refuses the whole state and nothing changes.
    /// Returns whether anything changed.
    pub fn apply_fleet(
        &self,
        certs: Map<Arc<StoredCert>>,
        bindings: Map<Arc<Binding>>,
        crls: Map<Vec<StoredCrl>>,
    ) -> Result<bool, ApiError> {
        let mut inner = self.lock();
        // A listener with an empty CRL list is the same as one without.
        let local_crls: Map<Vec<StoredCrl>> = inner
            .state
            .crls
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(l, v)| (l.clone(), v.clone()))
            .collect();
        if inner.state.certs == certs && inner.state.bindings == bindings && local_crls == crls {
            return Ok(false);
        }
        let now = SystemTime::now();
        for c in certs.values() {
            if inner.state.certs.get(&c.id) != Some(c) {
                self.check_cert(&inner.config, c, now).map_err(|e| {
                    ApiError::invalid(e.code, format!("certificate {:?}: {}", c.id, e.message))
                })?;
            }
        }
        let old = inner.state.clone();
        let mut new_state = inner.state.clone();
        new_state.certs = certs;
        new_state.bindings = bindings;
        new_state.crls = crls;
        let built = self.build(&inner.config, &new_state, Scope::All, None)?;
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
            })
        };
        persist().map_err(|e| ApiError::state_write(&e))?;
        inner.state = new_state;
        let snapshot = self.commit(built);
        (self.publish)(Arc::new(snapshot));
        Ok(true)
    }
}
