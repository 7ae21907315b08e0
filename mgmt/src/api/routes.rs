//! The `/v1/…` routes. Each handler runs its operation on a blocking thread (token calls may
//! take a while) through [`Manager::audited`], so every request leaves an audit line. Bodies are
//! parsed here so that every error, a malformed body included, answers in the JSON error shape.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::handler::Handler;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::ApiError;
use super::manager::Manager;
use super::openapi::Doc;
use super::secret_body;
use super::wire::AcmeList;
use super::wire::{
    CertList, CertListItem, CertProblem, CrlList, CsrRequest, CsrResponse, ErrorDetail,
    GenerateKey, KeyList, ListenerList, PutBinding, PutCert, PutClientCa, PutCrl, PutFleetConfig,
    Reloaded, Renewing,
};
use crate::audit::ClientIdentity;

type Mgr = State<Arc<Manager>>;
type Who = Extension<ClientIdentity>;

/// One served route: the method and path the OpenAPI document must list, and its handler.
#[derive(Debug)]
pub struct Route {
    /// Lower-case HTTP method, as OpenAPI spells it.
    pub method: &'static str,
    /// The path with `{param}` segments.
    pub path: &'static str,
    /// What the generated OpenAPI document says about it.
    pub doc: Doc,
    handler: MethodRouter<Arc<Manager>>,
}

/// A route's document entry: summary, request schema, success status and answer schema (names
/// of [`super::wire`] types).
const fn doc(
    summary: &'static str,
    request: Option<&'static str>,
    status: u16,
    answer: Option<&'static str>,
) -> Doc {
    Doc {
        summary,
        request,
        status,
        answer,
    }
}

fn route<H, T>(method: &'static str, path: &'static str, d: Doc, handler: H) -> Route
where
    H: Handler<T, Arc<Manager>>,
    T: 'static,
{
    // The table below names only these four methods; a fifth would be caught by every test that
    // builds the router.
    let filter = match method {
        "get" => MethodFilter::GET,
        "post" => MethodFilter::POST,
        "put" => MethodFilter::PUT,
        "delete" => MethodFilter::DELETE,
        other => unreachable!("route table method {other}"),
    };
    Route {
        method,
        path,
        doc: d,
        handler: on(filter, handler),
    }
}

/// Every route the router serves. The router is built from this table and nothing else, so
/// the `(method, path)` pairs here are exactly what it answers; a test checks them against the
/// OpenAPI document both ways, and `api_round_trip` sends a request to each.
pub fn routes() -> Vec<Route> {
    const NONE: Option<&str> = None;
    vec![
        route("get", "/v1/openapi.json", doc("This document", NONE, 200, NONE), openapi),
        route("get", "/v1/keys", doc("List the private keys on the token", NONE, 200, Some("KeyList")), list_keys),
        route("post", "/v1/keys", doc("Generate a key pair on the token (sensitive, non-extractable, sign-only)", Some("GenerateKey"), 201, Some("KeyView")), generate_key),
        route("post", "/v1/keys/import", doc("Import a PKCS#8 private key as sensitive and non-extractable; over HTTPS refused with 403 key_import_needs_local_socket before the body is read, unless [api] danger_allow_key_import_over_https", Some("ImportKey"), 201, Some("KeyView")), import_key),
        route("delete", "/v1/keys/{label}", doc("Delete a key (refused while a bound certificate uses it)", NONE, 204, NONE), delete_key),
        route("post", "/v1/keys/{label}/csr", doc("A CSR signed by the key on the token", Some("CsrRequest"), 200, Some("CsrResponse")), csr),
        route("get", "/v1/certificates", doc("List the stored certificates", NONE, 200, Some("CertList")), list_certs),
        route("get", "/v1/certificates/{id}", doc("One stored certificate", NONE, 200, Some("CertView")), get_cert),
        route("put", "/v1/certificates/{id}", doc("Store (or replace) a certificate chain for a key", Some("PutCert"), 200, Some("CertView")), put_cert),
        route("delete", "/v1/certificates/{id}", doc("Delete a stored certificate (refused while bound)", NONE, 204, NONE), delete_cert),
        route("get", "/v1/listeners", doc("List the listeners, their bindings and CRLs", NONE, 200, Some("ListenerList")), list_listeners),
        route("put", "/v1/listeners/{name}/binding", doc("Bind stored certificates to a listener (replaces the configuration file's)", Some("PutBinding"), 204, NONE), put_binding),
        route("delete", "/v1/listeners/{name}/binding", doc("Remove a listener's binding (the configuration file's certificates serve again)", NONE, 204, NONE), delete_binding),
        route("get", "/v1/listeners/{name}/crls", doc("A listener's CRLs", NONE, 200, Some("CrlList")), list_crls),
        route("post", "/v1/listeners/{name}/crls", doc("Add a CRL to a listener", Some("PutCrl"), 201, Some("CrlView")), post_crl),
        route("delete", "/v1/listeners/{name}/crls/{id}", doc("Remove a CRL", NONE, 204, NONE), delete_crl),
        route("get", "/v1/listeners/{name}/client-ca", doc("The client CA bundle uploaded for a listener (404 client_ca_not_found: its configuration's serves)", NONE, 200, Some("ClientCaView")), get_client_ca),
        route("put", "/v1/listeners/{name}/client-ca", doc("Trust these CAs for the listener's client certificates, in place of its configuration's client_auth.ca (409 client_auth_not_configured without [listener.client_auth])", Some("PutClientCa"), 200, Some("ClientCaView")), put_client_ca),
        route("delete", "/v1/listeners/{name}/client-ca", doc("Remove the uploaded client CA bundle (the configuration's serves again)", NONE, 204, NONE), delete_client_ca),
        route("post", "/v1/reload", doc("Re-read the configuration file", NONE, 200, Some("Reloaded")), reload),
        route("get", "/v1/acme", doc("Every [[acme]] entry's status", NONE, 200, Some("AcmeList")), acme_status),
        route("get", "/v1/fleet", doc("Fleet mode: every member's applied etcd revision, its lag behind the newest state revision, and the error that refused a newer state (409 fleet_off without a [fleet] section)", NONE, 200, Some("FleetStatus")), fleet_status),
        route("get", "/v1/fleet/config", doc("Fleet mode: the fleet's share of the configuration (pools, routes, session policy; 404 fleet_config_not_found when it has none, 409 fleet_off without [fleet])", NONE, 200, Some("FleetConfigView")), get_fleet_config),
        route("put", "/v1/fleet/config", doc("Fleet mode: set the fleet's share of the configuration, checked against this appliance's file as a reload is (400 fleet_config_invalid)", Some("PutFleetConfig"), 200, Some("FleetConfigView")), put_fleet_config),
        route("delete", "/v1/fleet/config", doc("Fleet mode: remove the fleet's share of the configuration (each appliance's file alone again)", NONE, 204, NONE), delete_fleet_config),
        route("post", "/v1/acme/{name}/renew", doc("Renew an [[acme]] entry now", NONE, 202, Some("Renewing")), acme_renew),
        route("get", "/v1/backends", doc("Backend pools of the published snapshot and their servers", NONE, 200, Some("PoolList")), super::backends::get),
        route(
            "put",
            "/v1/backends/{name}/servers/{id}/state",
            doc("Set a backend server's state (ready, drain, maint)", Some("SetState"), 200, Some("ServerState")),
            super::backends::put_state,
        ),
    ]
}

/// The `(method, path)` of every served route.
pub fn served() -> Vec<(&'static str, &'static str)> {
    routes().iter().map(|r| (r.method, r.path)).collect()
}

/// The router; each request must carry a [`ClientIdentity`] extension (the servers add it).
pub fn router(manager: Arc<Manager>) -> Router {
    let mut by_path: Vec<(&'static str, MethodRouter<Arc<Manager>>)> = Vec::new();
    for r in routes() {
        match by_path.iter_mut().find(|(p, _)| *p == r.path) {
            Some((_, m)) => *m = std::mem::take(m).merge(r.handler),
            None => by_path.push((r.path, r.handler)),
        }
    }
    let mut router = Router::new();
    for (path, handler) in by_path {
        router = router.route(path, handler);
    }
    router
        .fallback(|| async {
            ApiError::not_found("route_not_found", "no such route; see GET /v1/openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see GET /v1/openapi.json",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            manager.clone(),
            super::access::layer,
        ))
        .with_state(manager)
}

/// Runs `op` on a blocking thread, naming the operation and target for the request's audit line
/// (written by [`super::access`]), and answers `hsm_timeout` when it takes longer than
/// `[pkcs11] call_timeout_ms`: a frozen HSM can hang any token call, and the caller must hear so.
/// The operation itself cannot be cancelled; it may still finish after the answer went out.
pub(super) async fn run<T: Send + 'static>(
    m: Arc<Manager>,
    who: ClientIdentity,
    operation: &'static str,
    target: String,
    op: impl FnOnce(&Manager) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    super::access::note_operation(operation, &target);
    let limit = m.call_timeout();
    let task = tokio::task::spawn_blocking(move || m.perform(&who, operation, &target, op));
    match tokio::time::timeout(limit, task).await {
        Ok(done) => {
            done.map_err(|e| ApiError::internal(format!("the operation did not finish: {e}")))?
        }
        Err(_) => Err(super::error::key_error(&tlsgate_keystore::Error::Timeout {
            what: operation.to_owned(),
            after_ms: limit.as_millis() as u64,
        })),
    }
}

pub(crate) fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

fn ok(v: impl Serialize) -> Response {
    Json(v).into_response()
}

fn created(v: impl Serialize) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

async fn openapi() -> Response {
    super::access::note_operation("openapi.get", "-");
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::json(),
    )
        .into_response()
}

async fn list_keys(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    let keys = run(m, who, "key.list", "*".into(), |m| m.list_keys()).await?;
    Ok(ok(KeyList { items: keys }))
}

async fn generate_key(State(m): Mgr, Extension(who): Who, b: Bytes) -> Result<Response, ApiError> {
    let req: Result<GenerateKey, _> = body(&b);
    let target = req.as_ref().map(|r| r.label.clone()).unwrap_or_default();
    let key = run(m, who, "key.generate", target, move |m| {
        m.generate_key(&req?)
    })
    .await?;
    Ok(created(key))
}

/// `POST /v1/keys/import`: the body holds a private key, so it is read, parsed and decoded only
/// into secret memory (see [`super::secret_body`]), and the connection closes after the answer
/// so hyper lets go of its read buffer, which is then wiped. Over HTTPS (an HTTPS client is
/// named by its certificate) the import is refused before any byte of the body is read, unless
/// `[api] danger_allow_key_import_over_https`: rustls's record buffers, which the bytes would
/// pass through, are freed unwiped.
async fn import_key(State(m): Mgr, Extension(who): Who, req: axum::extract::Request) -> Response {
    let (parts, body) = req.into_parts();
    drop(parts);
    if matches!(who, ClientIdentity::Cert { .. }) && !m.key_import_over_https() {
        // Never polled: hyper neither reads it nor answers an `Expect: 100-continue`, so a
        // client that waits for that sends no key byte at all.
        drop(body);
        super::access::note_operation("key.import", "");
        tracing::warn!(client = %who, "key import over HTTPS refused: import over the unix socket");
        let mut response = ApiError::new(
            StatusCode::FORBIDDEN,
            "key_import_needs_local_socket",
            "key bytes are not accepted over HTTPS (they would pass through buffers that are \
             freed unwiped): import over the unix socket on the appliance \
             (`tlsgate ctl --socket <[api] socket> keys import ...`) or generate the key on the \
             token (`POST /v1/keys`)",
        )
        .into_response();
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return response;
    }
    let result = async {
        let raw = secret_body::read(body, secret_body::MAX_IMPORT_BODY_BYTES).await;
        let parsed = raw.and_then(|raw| secret_body::parse_import(&raw));
        let target = parsed.as_ref().map(|r| r.label.clone()).unwrap_or_default();
        run(m, who, "key.import", target, move |m| {
            let req = parsed?;
            m.import_key(&req.label, req.id.as_deref(), &req.pkcs8_pem)
        })
        .await
    }
    .await;
    let mut response = match result {
        Ok(key) => created(key),
        Err(e) => e.into_response(),
    };
    response.headers_mut().insert(
        header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

async fn delete_key(
    State(m): Mgr,
    Extension(who): Who,
    Path(label): Path<String>,
) -> Result<Response, ApiError> {
    run(m, who, "key.delete", label.clone(), move |m| {
        m.delete_key(&label)
    })
    .await?;
    Ok(no_content())
}

async fn csr(
    State(m): Mgr,
    Extension(who): Who,
    Path(label): Path<String>,
    b: Bytes,
) -> Result<Response, ApiError> {
    let req: Result<CsrRequest, _> = body(&b);
    let pem = run(m, who, "key.csr", label.clone(), move |m| {
        m.csr(&label, &req?)
    })
    .await?;
    Ok(ok(CsrResponse { csr_pem: pem }))
}

async fn list_certs(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    let items = run(m, who, "certificate.list", "*".into(), |m| {
        Ok(m.list_certs()
            .into_iter()
            .map(|r| match r {
                Ok(v) => CertListItem::Ok(v),
                Err((id, e)) => CertListItem::Problem(CertProblem {
                    id,
                    problem: ErrorDetail {
                        code: e.code.to_owned(),
                        message: e.message,
                    },
                }),
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(ok(CertList { items }))
}

async fn get_cert(
    State(m): Mgr,
    Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let v = run(m, who, "certificate.get", id.clone(), move |m| {
        m.get_cert(&id)
    })
    .await?;
    Ok(ok(v))
}

async fn put_cert(
    State(m): Mgr,
    Extension(who): Who,
    Path(id): Path<String>,
    b: Bytes,
) -> Result<Response, ApiError> {
    let req: Result<PutCert, _> = body(&b);
    let v = run(m, who, "certificate.put", id.clone(), move |m| {
        m.put_cert(&id, req?)
    })
    .await?;
    Ok(ok(v))
}

async fn delete_cert(
    State(m): Mgr,
    Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    run(m, who, "certificate.delete", id.clone(), move |m| {
        m.delete_cert(&id)
    })
    .await?;
    Ok(no_content())
}

async fn list_listeners(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    let v = run(m, who, "listener.list", "*".into(), |m| {
        Ok(m.list_listeners())
    })
    .await?;
    Ok(ok(ListenerList { items: v }))
}

async fn put_binding(
    State(m): Mgr,
    Extension(who): Who,
    Path(name): Path<String>,
    b: Bytes,
) -> Result<Response, ApiError> {
    let req: Result<PutBinding, _> = body(&b);
    run(m, who, "binding.put", name.clone(), move |m| {
        m.put_binding(&name, req?)
    })
    .await?;
    Ok(no_content())
}

async fn delete_binding(
    State(m): Mgr,
    Extension(who): Who,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    run(m, who, "binding.delete", name.clone(), move |m| {
        m.delete_binding(&name)
    })
    .await?;
    Ok(no_content())
}

async fn list_crls(
    State(m): Mgr,
    Extension(who): Who,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let v = run(m, who, "crl.list", name.clone(), move |m| {
        m.list_listeners()
            .into_iter()
            .find(|l| l.name == name)
            .map(|l| l.crls)
            .ok_or_else(|| {
                ApiError::not_found("listener_not_found", format!("no listener {name:?}"))
            })
    })
    .await?;
    Ok(ok(CrlList { items: v }))
}

async fn post_crl(
    State(m): Mgr,
    Extension(who): Who,
    Path(name): Path<String>,
    b: Bytes,
) -> Result<Response, ApiError> {
    let req: Result<PutCrl, _> = body(&b);
    let v = run(m, who, "crl.put", name.clone(), move |m| {
        m.put_crl(&name, &req?)
    })
    .await?;
    Ok(created(v))
}

async fn delete_crl(
    State(m): Mgr,
    Extension(who): Who,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let target = format!("{name}/{id}");
    run(m, who, "crl.delete", target, move |m| {
        m.delete_crl(&name, &id)
    })
    .await?;
    Ok(no_content())
}

async fn get_fleet_config(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    let v = run(m, who, "fleet_config.get", "fleet".into(), |m| {
        m.get_fleet_config()
    })
    .await?;
    Ok(ok(v))
}

async fn put_fleet_config(
    State(m): Mgr,
    Extension(who): Who,
    b: Bytes,
) -> Result<Response, ApiError> {
    let req: Result<PutFleetConfig, _> = body(&b);
    let v = run(m, who, "fleet_config.put", "fleet".into(), move |m| {
        m.put_fleet_config(&req?)
    })
    .await?;
    Ok(ok(v))
}

async fn delete_fleet_config(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    run(m, who, "fleet_config.delete", "fleet".into(), |m| {
        m.delete_fleet_config()
    })
    .await?;
    Ok(no_content())
}

async fn get_client_ca(
    State(m): Mgr,
    Extension(who): Who,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let v = run(m, who, "client_ca.get", name.clone(), move |m| {
        m.get_client_ca(&name)
    })
    .await?;
    Ok(ok(v))
}

async fn put_client_ca(
    State(m): Mgr,
    Extension(who): Who,
    Path(name): Path<String>,
    b: Bytes,
) -> Result<Response, ApiError> {
    let req: Result<PutClientCa, _> = body(&b);
    let v = run(m, who, "client_ca.put", name.clone(), move |m| {
        m.put_client_ca(&name, &req?)
    })
    .await?;
    Ok(ok(v))
}

async fn delete_client_ca(
    State(m): Mgr,
    Extension(who): Who,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    run(m, who, "client_ca.delete", name.clone(), move |m| {
        m.delete_client_ca(&name)
    })
    .await?;
    Ok(no_content())
}

async fn reload(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    run(m, who, "reload", "config".into(), |m| m.reload()).await?;
    Ok(ok(Reloaded { reloaded: true }))
}

async fn acme_status(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    let items = run(m, who, "acme.status", "*".into(), |m| m.acme_status()).await?;
    Ok(ok(AcmeList { items }))
}

async fn fleet_status(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    let status = run(m, who, "fleet.status", "*".into(), |m| m.fleet_status()).await?;
    Ok(ok(status))
}

async fn acme_renew(
    State(m): Mgr,
    Extension(who): Who,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let target = name.clone();
    run(m, who, "acme.renew", target, move |m| m.acme_renew(&name)).await?;
    Ok((StatusCode::ACCEPTED, Json(Renewing { renewing: true })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every served route is in the OpenAPI document, and the document lists nothing else.
    #[test]
    fn openapi_lists_exactly_the_routes() {
        let doc: serde_json::Value =
            serde_json::from_str(super::super::openapi::json()).expect("valid JSON");
        let paths = doc["paths"].as_object().expect("paths");
        let served = served();
        assert!(served.len() >= 17, "the table lists the router's routes");
        for (method, path) in &served {
            assert!(
                paths.get(*path).and_then(|p| p.get(*method)).is_some(),
                "{method} {path} is served but not in openapi.json"
            );
        }
        for (path, ops) in paths {
            for method in ops.as_object().expect("operations").keys() {
                if method == "parameters" {
                    continue;
                }
                assert!(
                    served.contains(&(method.as_str(), path.as_str())),
                    "openapi.json lists {method} {path}, which is not served"
                );
            }
        }
    }
}
