//! The `/v1/…` routes. Each handler runs its operation on a blocking thread (token calls may
//! take a while) through [`Manager::audited`], so every request leaves an audit line. Bodies are
//! parsed here so that every error, a malformed body included, answers in the JSON error shape.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::error::ApiError;
use super::manager::{CsrRequest, GenerateKey, Manager, PutBinding, PutCert, PutCrl};
use crate::audit::ClientIdentity;

/// Every route the router serves, `(method, path)`; the OpenAPI document must list each one
/// (a test checks both ways).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/openapi.json"),
    ("get", "/v1/keys"),
    ("post", "/v1/keys"),
    ("post", "/v1/keys/import"),
    ("delete", "/v1/keys/{label}"),
    ("post", "/v1/keys/{label}/csr"),
    ("get", "/v1/certificates"),
    ("get", "/v1/certificates/{id}"),
    ("put", "/v1/certificates/{id}"),
    ("delete", "/v1/certificates/{id}"),
    ("get", "/v1/listeners"),
    ("put", "/v1/listeners/{name}/binding"),
    ("delete", "/v1/listeners/{name}/binding"),
    ("get", "/v1/listeners/{name}/crls"),
    ("post", "/v1/listeners/{name}/crls"),
    ("delete", "/v1/listeners/{name}/crls/{id}"),
    ("post", "/v1/reload"),
];

type Mgr = State<Arc<Manager>>;
type Who = Extension<ClientIdentity>;

/// The router; each request must carry a [`ClientIdentity`] extension (the servers add it).
pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/keys", get(list_keys).post(generate_key))
        .route("/v1/keys/import", post(import_key))
        .route("/v1/keys/{label}", delete(delete_key))
        .route("/v1/keys/{label}/csr", post(csr))
        .route("/v1/certificates", get(list_certs))
        .route(
            "/v1/certificates/{id}",
            get(get_cert).put(put_cert).delete(delete_cert),
        )
        .route("/v1/listeners", get(list_listeners))
        .route(
            "/v1/listeners/{name}/binding",
            put(put_binding).delete(delete_binding),
        )
        .route("/v1/listeners/{name}/crls", get(list_crls).post(post_crl))
        .route("/v1/listeners/{name}/crls/{id}", delete(delete_crl))
        .route("/v1/reload", post(reload))
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
        .with_state(manager)
}

/// Runs `op` on a blocking thread with its audit line.
async fn run<T: Send + 'static>(
    m: Arc<Manager>,
    who: ClientIdentity,
    operation: &'static str,
    target: String,
    op: impl FnOnce(&Manager) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || m.audited(&who, operation, &target, op))
        .await
        .map_err(|e| ApiError::internal(format!("the operation did not finish: {e}")))?
}

pub(crate) fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

fn ok(v: Value) -> Response {
    Json(v).into_response()
}

fn created(v: Value) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::OPENAPI_JSON,
    )
        .into_response()
}

async fn list_keys(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    let keys = run(m, who, "key.list", "*".into(), |m| m.list_keys()).await?;
    Ok(ok(json!({ "items": keys })))
}

async fn generate_key(State(m): Mgr, Extension(who): Who, b: Bytes) -> Result<Response, ApiError> {
    let req: Result<GenerateKey, _> = body(&b);
    let target = req.as_ref().map(|r| r.label.clone()).unwrap_or_default();
    let key = run(m, who, "key.generate", target, move |m| {
        m.generate_key(&req?)
    })
    .await?;
    Ok(created(json!(key)))
}

/// The import request. The key PEM is moved into wiped memory at once and is never logged.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImportKey {
    pub(crate) label: String,
    pub(crate) id: Option<String>,
    pub(crate) pkcs8_pem: String,
}

async fn import_key(State(m): Mgr, Extension(who): Who, b: Bytes) -> Result<Response, ApiError> {
    // The body holds a private key: parse it from a copy that is wiped when dropped.
    let raw = Zeroizing::new(b.to_vec());
    drop(b);
    let parsed: Result<ImportKey, _> = body(&raw);
    drop(raw);
    let (label, id, pem) = match parsed {
        Ok(r) => (r.label, r.id, Zeroizing::new(r.pkcs8_pem)),
        Err(e) => {
            return run(m, who, "key.import", String::new(), move |_| {
                Err::<(), _>(e)
            })
            .await
            .map(|()| no_content())
        }
    };
    let target = label.clone();
    let key = run(m, who, "key.import", target, move |m| {
        m.import_key(&label, id.as_deref(), &pem)
    })
    .await?;
    Ok(created(json!(key)))
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
    Ok(ok(json!({ "csr_pem": pem })))
}

async fn list_certs(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    let items = run(m, who, "certificate.list", "*".into(), |m| {
        Ok(m.list_certs()
            .into_iter()
            .map(|r| match r {
                Ok(v) => json!(v),
                Err((id, e)) => json!({
                    "id": id,
                    "problem": { "code": e.code, "message": e.message },
                }),
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(ok(json!({ "items": items })))
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
    Ok(ok(json!(v)))
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
    Ok(ok(json!(v)))
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
    Ok(ok(json!({ "items": v })))
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
    Ok(ok(json!({ "items": v })))
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
    Ok(created(json!(v)))
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

async fn reload(State(m): Mgr, Extension(who): Who) -> Result<Response, ApiError> {
    run(m, who, "reload", "config".into(), |m| m.reload()).await?;
    Ok(ok(json!({ "reloaded": true })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every served route is in the OpenAPI document, and the document lists nothing else.
    #[test]
    fn openapi_lists_exactly_the_routes() {
        let doc: Value = serde_json::from_str(super::super::OPENAPI_JSON).expect("valid JSON");
        let paths = doc["paths"].as_object().expect("paths");
        for (method, path) in ROUTES {
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
                    ROUTES.contains(&(method.as_str(), path.as_str())),
                    "openapi.json lists {method} {path}, which is not served"
                );
            }
        }
    }
}
