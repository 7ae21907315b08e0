//! API errors: an HTTP status, a stable machine code and a human message, answered as
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tlsgate_keystore::{CertError, Error as KeyError};

use super::wire::{ErrorBody, ErrorDetail};

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, documented in the OpenAPI document; clients branch on it.
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The state directory could not be written: nothing changed.
    pub fn state_write(err: &anyhow::Error) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "state_write_failed",
            format!("the state directory could not be written, nothing changed: {err:#}"),
        )
    }
}

/// The code for each way a certificate chain can fail its checks.
pub fn cert_error(err: &CertError) -> ApiError {
    let code = match err {
        CertError::Pem { .. } => "chain_pem_invalid",
        CertError::Empty => "chain_empty",
        CertError::Parse { .. } => "certificate_unparsable",
        CertError::KeyMismatch { .. } => "key_mismatch",
        CertError::ChainOrder { .. } => "chain_order",
        CertError::Expired { .. } => "certificate_expired",
        CertError::NotYetValid { .. } => "certificate_not_yet_valid",
        CertError::BadSignature { .. } => "chain_bad_signature",
        CertError::UnsupportedSignature { .. } => "unsupported_signature",
        _ => "certificate_invalid",
    };
    ApiError::invalid(code, err.to_string())
}

/// Keystore (token) errors: the caller's fault where it is, else the HSM's.
pub fn key_error(err: &KeyError) -> ApiError {
    match err {
        KeyError::KeyNotFound { .. } => ApiError::not_found("key_not_found", err.to_string()),
        KeyError::AmbiguousKey { .. } => ApiError::conflict("key_ambiguous", err.to_string()),
        KeyError::KeyExists { .. } | KeyError::KeyIdExists { .. } => {
            ApiError::conflict("key_exists", err.to_string())
        }
        KeyError::Uri(_) => ApiError::invalid("key_reference_invalid", err.to_string()),
        KeyError::UnsupportedKey { .. } | KeyError::KeyParse { .. } => {
            ApiError::invalid("key_unsupported", err.to_string())
        }
        KeyError::Certificate(c) => cert_error(c),
        KeyError::CertGeneration { .. } => ApiError::invalid("csr_invalid", err.to_string()),
        KeyError::MechanismUnavailable { .. } => {
            ApiError::invalid("mechanism_unavailable", err.to_string())
        }
        KeyError::TokenUnavailable { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "hsm_unavailable",
            err.to_string(),
        ),
        KeyError::Timeout { .. } => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "hsm_timeout", err.to_string())
        }
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "hsm_error", err.to_string()),
    }
}

/// The error code of an answer, for the audit line.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        // For the request's audit line.
        response.extensions_mut().insert(ErrorCode(self.code));
        response
    }
}
