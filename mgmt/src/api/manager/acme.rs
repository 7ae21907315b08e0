//! ACME-issued certificates in the one state: stored like uploaded ones (`certs/acme-<name>`),
//! served beside each named listener's own certificates, installed by the ACME task through the
//! same build → persist → commit → publish path as an upload.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use tlsgate_keystore::cert::ChainReport;
use tlsgate_keystore::keyref::KeyBackend;

use super::{now_unix, Manager};
use crate::api::error::ApiError;
use crate::config::Config;
use crate::snapshot::{BoundServed, Overlay, Scope};
use crate::state::{StateData, StoredCert};
use crate::tls::ServedCert;

/// What the management API asks of the ACME client ([`crate::acme::Acme`] implements it; the
/// API does not depend on the client's module).
pub trait AcmeControl: Send + Sync + std::fmt::Debug {
    /// Every entry's status, as JSON objects.
    fn status(&self) -> Vec<crate::api::wire::AcmeStatus>;
    /// Asks entry `name` to renew now; false: no such entry.
    fn renew(&self, name: &str) -> bool;
}

/// The state-directory id of the certificate an `[[acme]]` entry keeps.
pub fn acme_cert_id(name: &str) -> String {
    format!("acme-{name}")
}

/// The listeners that serve stored certificate `id` because an `[[acme]]` entry names them.
pub(super) fn acme_listeners(config: &Config, id: &str) -> Vec<String> {
    config
        .acme
        .iter()
        .filter(|a| acme_cert_id(&a.name) == id)
        .flat_map(|a| a.listeners.iter().cloned())
        .collect()
}

impl Manager {
    /// Adds each issued ACME certificate to the listeners its entry names (those in scope).
    pub(super) fn acme_overlay(
        &self,
        config: &Config,
        state: &StateData,
        in_scope: &dyn Fn(&str) -> bool,
        overlay: &mut Overlay,
        now: SystemTime,
    ) -> Result<(), ApiError> {
        for a in &config.acme {
            let Some(stored) = state.certs.get(&acme_cert_id(&a.name)) else {
                continue;
            };
            let cached = self.cached_cert(config, stored, now)?;
            for l in a.listeners.iter().filter(|l| in_scope(l)) {
                let entry = overlay.listeners.entry(l.clone()).or_default();
                entry.extra_expiry.push(crate::mgmt_metrics::Expiry {
                    listener: l.clone(),
                    certificate: stored.id.clone(),
                    names: cached.names.clone(),
                    not_after: cached.cred.report.not_after,
                });
                entry.extra.push(BoundServed {
                    served: ServedCert {
                        key: cached.certified.clone(),
                        names: cached.names.clone(),
                        default: false,
                    },
                    fingerprint: cached.fingerprint.clone(),
                    subject: cached.subject.clone(),
                    fetch: cached.fetch,
                    on_token: cached.cred.backend() == KeyBackend::Pkcs11,
                });
            }
        }
        Ok(())
    }

    /// Stores the chain an ACME order gave for `name` (key: a label on the token) and makes it
    /// live on its listeners (and any binding that names it): checked against the key first,
    /// persisted, then published; a chain that does not build changes nothing.
    pub fn acme_install(
        &self,
        name: &str,
        key_label: &str,
        chain_pem: &str,
    ) -> Result<ChainReport, ApiError> {
        let id = acme_cert_id(name);
        let mut inner = self.lock();
        let stored = StoredCert {
            id: id.clone(),
            key: key_label.to_owned(),
            chain_pem: chain_pem.to_owned(),
            updated_unix: now_unix(),
        };
        let cred = self.check_cert(&inner.config, &stored, SystemTime::now())?;
        let stored = StoredCert {
            chain_pem: cred.chain.to_pem(),
            ..stored
        };
        let mut new_state = inner.state.clone();
        new_state.certs.insert(id.clone(), Arc::new(stored.clone()));
        let mut users: BTreeSet<String> = inner.state.listeners_using(&id).into_iter().collect();
        users.extend(acme_listeners(&inner.config, &id));
        self.change(&mut inner, new_state, Scope::Listeners(&users), |s| {
            s.put_cert(&stored)
        })?;
        Ok(cred.report)
    }

    /// The chain stored for `name` (PEM) and its key label, if one was issued.
    pub fn acme_current(&self, name: &str) -> Option<(String, String)> {
        let inner = self.lock();
        inner
            .state
            .certs
            .get(&acme_cert_id(name))
            .map(|c| (c.key.clone(), c.chain_pem.clone()))
    }
}

impl Manager {
    /// `GET /v1/acme`: every `[[acme]]` entry's status.
    pub fn acme_status(&self) -> Result<Vec<crate::api::wire::AcmeStatus>, ApiError> {
        Ok(self.acme_client()?.status())
    }

    /// `POST /v1/acme/{name}/renew`: renew now (after an attempt in progress ends).
    pub fn acme_renew(&self, name: &str) -> Result<(), ApiError> {
        if self.acme_client()?.renew(name) {
            Ok(())
        } else {
            Err(ApiError::not_found(
                "acme_not_found",
                format!("no [[acme]] entry named {name:?}"),
            ))
        }
    }

    fn acme_client(&self) -> Result<&Arc<dyn AcmeControl>, ApiError> {
        self.acme().ok_or_else(|| {
            ApiError::conflict(
                "acme_not_configured",
                "the configuration has no [[acme]] entry",
            )
        })
    }
}
