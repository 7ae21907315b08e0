//! A listener's client CA bundle through the API: the CA certificates it trusts for client
//! certificates, in place of its configuration's `client_auth.ca` (the mode and the CRL files
//! stay the configuration's). A change rebuilds the listener like any other: the bundle is
//! checked, every CRL must still come from one of its CAs, and sessions made under the old
//! bundle no longer resume (the client-auth policy digest covers the anchors).

use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use tlsgate_keystore::cert::fmt_time;

use super::listeners::one;
use super::{now_unix, Manager};
use crate::api::error::ApiError;
use crate::api::wire::{ClientCaCert, ClientCaView, PutClientCa};
use crate::snapshot::Scope;
use crate::state::StoredClientCa;
use crate::tls::client_auth::CaBundle;

impl Manager {
    /// `PUT /v1/listeners/{name}/client-ca`.
    pub fn put_client_ca(
        &self,
        listener: &str,
        req: &PutClientCa,
    ) -> Result<ClientCaView, ApiError> {
        let mut inner = self.lock();
        Self::check_listener(&inner, listener)?;
        let configured = inner
            .config
            .listeners
            .iter()
            .any(|l| l.name == listener && l.client_auth.is_some());
        if !configured {
            return Err(ApiError::conflict(
                "client_auth_not_configured",
                format!(
                    "listener {listener:?} has no [listener.client_auth] in its configuration \
                     file (the mode: required or optional); a client CA bundle needs one"
                ),
            ));
        }
        let stored = StoredClientCa {
            listener: listener.to_owned(),
            pem: normalized(&req.pem)?,
            updated_unix: now_unix(),
        };
        let view = client_ca_view(&stored)?;
        let mut new_state = inner.state.clone();
        new_state
            .client_cas
            .insert(listener.to_owned(), Arc::new(stored.clone()));
        self.change(
            &mut inner,
            new_state,
            Scope::Listeners(&one(listener)),
            |s| s.put_client_ca(&stored),
        )?;
        Ok(view)
    }

    /// `GET /v1/listeners/{name}/client-ca`.
    pub fn get_client_ca(&self, listener: &str) -> Result<ClientCaView, ApiError> {
        let inner = self.lock();
        Self::check_listener(&inner, listener)?;
        match inner.state.client_cas.get(listener) {
            Some(c) => client_ca_view(c),
            None => Err(not_uploaded(listener)),
        }
    }

    /// `DELETE /v1/listeners/{name}/client-ca`: back to the configuration's bundle.
    pub fn delete_client_ca(&self, listener: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        Self::check_listener(&inner, listener)?;
        if !inner.state.client_cas.contains_key(listener) {
            return Err(not_uploaded(listener));
        }
        let mut new_state = inner.state.clone();
        new_state.client_cas.remove(listener);
        self.change(
            &mut inner,
            new_state,
            Scope::Listeners(&one(listener)),
            |s| s.delete_client_ca(listener),
        )
    }
}

fn not_uploaded(listener: &str) -> ApiError {
    ApiError::not_found(
        "client_ca_not_found",
        format!(
            "listener {listener:?} has no uploaded client CA bundle (its configuration's serves)"
        ),
    )
}

/// The bundle checked as trust anchors, each certificate PEM-encoded again (nothing but
/// `CERTIFICATE` blocks is kept).
fn normalized(pem: &str) -> Result<String, ApiError> {
    let bundle = CaBundle::parse(pem.as_bytes())
        .map_err(|why| ApiError::invalid("client_ca_invalid", why))?;
    Ok(bundle
        .anchors
        .iter()
        .map(|c| tlsgate_keystore::keyinfo::pem_encode("CERTIFICATE", c))
        .collect())
}

pub(crate) fn client_ca_view(c: &StoredClientCa) -> Result<ClientCaView, ApiError> {
    use rustls_pki_types::pem::PemObject;
    let mut certificates = Vec::new();
    for der in CertificateDer::pem_slice_iter(c.pem.as_bytes()) {
        let der = der.map_err(|e| ApiError::invalid("client_ca_invalid", e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| ApiError::invalid("client_ca_invalid", e.to_string()))?;
        let not_after = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
        certificates.push(ClientCaCert {
            subject: cert.subject().to_string(),
            not_after: fmt_time(not_after),
            sha256: hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der)),
        });
    }
    Ok(ClientCaView {
        listener: c.listener.clone(),
        certificates,
        updated_unix: c.updated_unix,
    })
}
