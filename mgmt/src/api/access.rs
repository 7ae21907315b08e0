//! Around every API request: peers outside the socket allowlist are refused, every error
//! answer is JSON, and every request — any route, any status — leaves exactly one audit line.
//!
//! ```text
//! request ─► layer: refused peer? ─yes─► 403 peer_not_allowed ─┐
//!               │ no                                           │
//!               ▼                                              │
//!            router (handler names its operation and target    │
//!            through a task-local: note_operation)             │
//!               │                                              │
//!               ▼                                              ▼
//!            error not JSON (axum's own 413, 400, ...)? ─► JSON error body
//!               ▼
//!            one audit line: client, method, path, status, bytes, operation, target, result
//! ```

use std::cell::RefCell;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::error::{ApiError, ErrorCode};
use super::Manager;
use crate::audit::{ClientIdentity, HttpRequest};

tokio::task_local! {
    static OPERATION: RefCell<Option<(&'static str, String)>>;
}

/// Largest error text of axum's own rejections carried into the JSON message.
const MAX_REJECTION_TEXT: usize = 512;

/// Names the operation and target of the request being served, for its audit line.
pub fn note_operation(operation: &'static str, target: &str) {
    let _ = OPERATION.try_with(|slot| *slot.borrow_mut() = Some((operation, target.to_owned())));
}

/// Marks a request from a unix-socket peer that the allowlist refuses.
#[derive(Debug, Clone, Copy)]
pub struct PeerRefused;

/// The middleware (see the module docs).
pub async fn layer(State(m): State<Arc<Manager>>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let client = req
        .extensions()
        .get::<ClientIdentity>()
        .cloned()
        .unwrap_or(ClientIdentity::Signal("unknown"));
    let bytes_in = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let refused = req.extensions().get::<PeerRefused>().is_some();
    let (response, operation) = if refused {
        let e = ApiError::new(
            StatusCode::FORBIDDEN,
            "peer_not_allowed",
            "this uid/gid is not in the management socket's allowlist ([api] socket_uids, socket_gids)",
        );
        tracing::warn!(client = %client, %method, %path, "management socket peer refused");
        (e.into_response(), Some(("peer.refused", String::new())))
    } else {
        OPERATION
            .scope(RefCell::new(None), async {
                let response = next.run(req).await;
                let op = OPERATION.with(|slot| slot.borrow_mut().take());
                (response, op)
            })
            .await
    };
    let response = json_errors(response).await;
    let status = response.status();
    let result = if status.is_success() {
        "ok"
    } else {
        response
            .extensions()
            .get::<ErrorCode>()
            .map(|c| c.0)
            .unwrap_or_else(|| code_for(status))
    };
    let bytes_out = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .or_else(|| axum::body::HttpBody::size_hint(response.body()).exact())
        .unwrap_or(0);
    let (operation, target) = operation.unwrap_or(("http", String::new()));
    m.audit_log().record_request(
        &client,
        operation,
        &target,
        result,
        &HttpRequest {
            method,
            path,
            status: status.as_u16(),
            bytes_in,
            bytes_out,
        },
    );
    response
}

/// A stable code for an error answer that did not come from an [`ApiError`].
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "route_not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    }
}

/// Error answers that are not JSON (axum's own rejections: a body over the limit, a path
/// parameter that does not parse) become the API's JSON error shape.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if status.is_success()
        || status.is_informational()
        || status.is_redirection()
        || response.extensions().get::<ErrorCode>().is_some()
    {
        return response;
    }
    let (_, body) = response.into_parts();
    let text = match Body::new(http_body_util::Limited::new(body, MAX_REJECTION_TEXT))
        .collect()
        .await
    {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    ApiError::new(status, code_for(status), message).into_response()
}
