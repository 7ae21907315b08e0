//! From the state to the builder's [`Overlay`]: each bound listener's certificates, loaded
//! through the certificate cache, and kept as committed so that a change of a few certificates
//! replaces only their entries (a rotation with 10,000 bound touches one, not 10,000).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use tlsgate_keystore::keyref::KeyBackend;

use super::{covered, crl_der, Manager};
use crate::api::error::ApiError;
use crate::config::Config;
use crate::mgmt_metrics::Expiry;
use crate::snapshot::{BoundServed, Built, Overlay, Scope};
use crate::state::{Binding, BoundCert, StateData};
use crate::tls::ServedCert;
use tlsgate_dataplane::Snapshot;

/// A bound listener's certificates, in its binding's order.
#[derive(Debug, Clone)]
pub(super) struct BoundListener {
    /// The binding they were made for (a new binding is made anew).
    binding: Arc<Binding>,
    served: imbl::Vector<BoundServed>,
    expiry: imbl::Vector<Expiry>,
    /// How many of them have their key on a token.
    on_token: usize,
}

/// A built snapshot and the bound listeners it was built from, committed together.
pub(super) struct Staged {
    built: Built,
    /// Made for every listener (the others are dropped at commit).
    all: bool,
    /// The listeners in scope: `None` for one without a binding.
    bound: Vec<(String, Option<Arc<BoundListener>>)>,
}

impl Manager {
    /// Builds the snapshot `config` + `state` would give for the listeners in `scope` (the
    /// others as last committed), checking every certificate it loads. A stored certificate
    /// whose key and chain are unchanged since it was last loaded is not loaded again.
    /// `changed`, when given, names every certificate `state` holds differently from the
    /// committed state: a listener whose binding is the committed one then has only those
    /// entries replaced.
    pub(super) fn build(
        &self,
        config: &Config,
        state: &StateData,
        scope: Scope<'_>,
        changed: Option<&BTreeSet<String>>,
    ) -> Result<Staged, ApiError> {
        let now = SystemTime::now();
        let in_scope = |l: &str| match scope {
            Scope::All => true,
            Scope::Listeners(set) => set.contains(l),
        };
        let all = matches!(scope, Scope::All);
        if all {
            // A reload checks every certificate again (validity, the token's keys).
            self.certs.lock().clear();
        }
        let changed = changed.filter(|_| !all);
        let mut overlay = Overlay::default();
        for (listener, crls) in state.crls.iter().filter(|(l, _)| in_scope(l)) {
            let entry = overlay.listeners.entry(listener.clone()).or_default();
            for c in crls {
                entry.crls.push(crl_der(&c.pem)?);
            }
        }
        for (listener, ca) in state.client_cas.iter().filter(|(l, _)| in_scope(l)) {
            let entry = overlay.listeners.entry(listener.clone()).or_default();
            entry.client_ca = Some(ca.pem.as_str().into());
        }
        let mut bound = Vec::new();
        if let Scope::Listeners(set) = scope {
            bound.extend(
                set.iter()
                    .filter(|l| !state.bindings.contains_key(*l))
                    .map(|l| (l.clone(), None)),
            );
        }
        for (listener, binding) in state.bindings.iter().filter(|(l, _)| in_scope(l)) {
            if !config.listeners.iter().any(|l| &l.name == listener) {
                tracing::warn!(
                    listener,
                    "binding for a listener the configuration file does not have; ignored"
                );
                continue;
            }
            let last = changed.and_then(|changed| {
                let last = self.bound_listeners.lock().get(listener).cloned()?;
                Arc::ptr_eq(&last.binding, binding).then_some((last, changed))
            });
            let (b, patched) = match last {
                Some((last, changed)) => {
                    let mut b = (*last).clone();
                    let mut at_all = Vec::new();
                    for id in changed {
                        for &at in binding.positions(id) {
                            let (served, expiry) = self.bound_entry(
                                config,
                                state,
                                listener,
                                &binding.certificates[at],
                                now,
                            )?;
                            let was = b.served.set(at, served);
                            b.on_token = b.on_token - usize::from(was.on_token)
                                + usize::from(b.served[at].on_token);
                            b.expiry.set(at, expiry);
                            at_all.push(at);
                        }
                    }
                    at_all.sort_unstable();
                    (b, Some(at_all))
                }
                None => {
                    let mut b = BoundListener {
                        binding: binding.clone(),
                        served: imbl::Vector::new(),
                        expiry: imbl::Vector::new(),
                        on_token: 0,
                    };
                    for bc in &binding.certificates {
                        let (served, expiry) =
                            self.bound_entry(config, state, listener, bc, now)?;
                        b.on_token += usize::from(served.on_token);
                        b.served.push_back(served);
                        b.expiry.push_back(expiry);
                    }
                    (b, None)
                }
            };
            if b.served.is_empty() {
                return Err(ApiError::invalid(
                    "binding_empty",
                    format!("a binding for {listener:?} needs at least one certificate"),
                ));
            }
            let entry = overlay.listeners.entry(listener.clone()).or_default();
            entry.certs = Some(b.served.clone());
            entry.changed = patched;
            entry.offload = b.on_token > 0;
            entry.expiry = b.expiry.clone();
            bound.push((listener.clone(), Some(Arc::new(b))));
        }
        self.acme_overlay(config, state, &in_scope, &mut overlay, now)?;
        let built = self
            .builder
            .build(config, &overlay, scope)
            .map_err(|e| ApiError::invalid("snapshot_invalid", format!("{e:#}")))?;
        Ok(Staged { built, all, bound })
    }

    /// One certificate of a binding, as the builder serves it and as its expiry gauge shows it.
    fn bound_entry(
        &self,
        config: &Config,
        state: &StateData,
        listener: &str,
        bc: &BoundCert,
        now: SystemTime,
    ) -> Result<(BoundServed, Expiry), ApiError> {
        let stored = state.certs.get(&bc.cert).ok_or_else(|| {
            ApiError::not_found(
                "certificate_not_found",
                format!(
                    "listener {listener:?} binds unknown certificate {:?}",
                    bc.cert
                ),
            )
        })?;
        let cached = self.cached_cert(config, stored, now)?;
        let report = &cached.cred.report;
        let names: Arc<[String]> = match &bc.names {
            Some(names) => {
                let mut out = Vec::with_capacity(names.len());
                for n in names {
                    let n = crate::tls::normalize_name(n)
                        .map_err(|e| ApiError::invalid("name_invalid", e.to_string()))?;
                    if !covered(&n, &report.sans) {
                        return Err(ApiError::invalid(
                            "name_not_in_certificate",
                            format!(
                                "certificate {:?} does not cover {n:?} (its SANs: {})",
                                bc.cert,
                                report.sans.join(", ")
                            ),
                        ));
                    }
                    out.push(n);
                }
                out.into()
            }
            None => cached.names.clone(),
        };
        let expiry = Expiry {
            listener: listener.to_owned(),
            certificate: bc.cert.clone(),
            names: names.clone(),
            not_after: report.not_after,
        };
        let served = BoundServed {
            served: ServedCert {
                key: cached.certified.clone(),
                names,
                default: bc.default,
            },
            fingerprint: cached.fingerprint.clone(),
            subject: cached.subject.clone(),
            fetch: cached.fetch,
            on_token: cached.cred.backend() == KeyBackend::Pkcs11,
        };
        Ok((served, expiry))
    }

    /// Makes `staged` the committed build (the caller publishes its snapshot, or starts with
    /// it).
    pub(super) fn commit(&self, staged: Staged) -> Snapshot {
        self.builder.commit(&staged.built);
        let mut cache = self.bound_listeners.lock();
        if staged.all {
            cache.clear();
        }
        for (listener, b) in staged.bound {
            match b {
                Some(b) => cache.insert(listener, b),
                None => cache.remove(&listener),
            };
        }
        staged.built.snapshot
    }
}
