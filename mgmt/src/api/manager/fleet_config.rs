//! The fleet's share of the configuration through the API (fleet mode): backend pools, and per
//! listener its backends, routes and session (ticket) policy, kept in etcd and merged over each
//! appliance's configuration file ([`crate::config::fleet_overlay`]). A change is checked as a
//! reload is (this appliance's file with the new document merged, every listener built), written
//! to etcd with the rest of the state, and applied by every appliance the same way.

use std::sync::Arc;

use super::Manager;
use crate::api::error::ApiError;
use crate::api::wire::{FleetConfigView, PutFleetConfig};
use crate::config::Config;
use crate::snapshot::Scope;
use crate::state::StateData;

/// The configuration a manager starts with: the file's, with the cached fleet configuration
/// merged when there is one and it merges (else the file's alone, and a loud error: the fleet's
/// next state says again what it wants).
pub(super) fn merged_at_start(config: Config, state: &StateData) -> Config {
    let Some(fleet) = state.fleet_config.as_deref() else {
        return config;
    };
    match Config::load_with_fleet(&config.path, Some(fleet)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the cached fleet configuration does not make a valid configuration with this file; starting with the file alone");
            config
        }
    }
}

impl Manager {
    fn fleet_on(&self) -> Result<(), ApiError> {
        match self.fleet.get() {
            Some(_) => Ok(()),
            None => Err(ApiError::conflict(
                "fleet_off",
                "no [fleet] section: the configuration file is this appliance's whole configuration",
            )),
        }
    }

    /// `GET /v1/fleet/config`.
    pub fn get_fleet_config(&self) -> Result<FleetConfigView, ApiError> {
        self.fleet_on()?;
        match self.lock().state.fleet_config.as_deref() {
            Some(t) => Ok(FleetConfigView { toml: t.to_owned() }),
            None => Err(ApiError::not_found(
                "fleet_config_not_found",
                "the fleet has no configuration of its own: each appliance's file decides alone",
            )),
        }
    }

    /// `PUT /v1/fleet/config`: checked against this appliance's file first.
    pub fn put_fleet_config(&self, req: &PutFleetConfig) -> Result<FleetConfigView, ApiError> {
        self.fleet_on()?;
        self.change_fleet_config(Some(req.toml.as_str()))?;
        Ok(FleetConfigView {
            toml: req.toml.clone(),
        })
    }

    /// `DELETE /v1/fleet/config`: every appliance back to its file alone.
    pub fn delete_fleet_config(&self) -> Result<(), ApiError> {
        self.fleet_on()?;
        if self.lock().state.fleet_config.is_none() {
            return Err(ApiError::not_found(
                "fleet_config_not_found",
                "the fleet has no configuration of its own",
            ));
        }
        self.change_fleet_config(None)
    }

    /// As `change()`, for a new configuration: build, etcd, state directory, commit, publish.
    fn change_fleet_config(&self, text: Option<&str>) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let config = Config::load_with_fleet(&inner.config.path, text)
            .map_err(|e| ApiError::invalid("fleet_config_invalid", e.to_string()))?;
        let mut new_state = inner.state.clone();
        new_state.fleet_config = text.map(Arc::from);
        let built = self.build(&config, &new_state, Scope::All, None)?;
        if let Some(fleet) = self.fleet.get() {
            // Compared with what etcd holds, not with what this appliance serves: the two
            // differ while etcd holds a configuration every appliance refused.
            let mut old = inner.state.clone();
            if let Some(seen) = fleet.seen_config() {
                old.fleet_config = seen;
            }
            fleet.write(&old, &new_state)?;
        }
        self.store
            .put_fleet_config(text)
            .map_err(|e| ApiError::state_write(&e))?;
        inner.state = new_state;
        inner.config = config;
        let snapshot = self.commit(built);
        (self.publish)(Arc::new(snapshot));
        Ok(())
    }
}
