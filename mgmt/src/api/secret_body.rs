//! Request bodies that carry a private key (`POST /v1/keys/import`), read so that no unwiped
//! copy of the key stays in the process:
//!
//! ```text
//! hyper read buffer ─ Bytes chunk ─► SecretBuf (body) ─► JSON: the pem field borrowed (RawValue),
//!        │                                                 unescaped into a SecretBuf
//!        └─ chunk held until hyper lets go of it,          ─► PEM base64 decoded into a SecretBuf
//!           then wiped in place (Bytes::try_into_mut)      ─► keystore import (template wiped)
//! ```
//!
//! Every `SecretBuf` is out of core dumps, locked and wiped on drop (`tlsgate_keystore::secret`).
//! hyper parses requests in a buffer of its own and hands the body out as slices of it; the
//! slice cannot be written while hyper still holds the buffer, so it is kept (not freed) until
//! hyper drops its share — when the connection closes or reads its next request; the import
//! answers `Connection: close` so that is at once — and then wiped where it lies.
//!
//! Limit: over HTTPS the bytes would also pass through rustls's record buffers, which are
//! rustls's own and freed unwiped; so an import over HTTPS is refused before its body is read
//! (`routes::import_key`) unless `[api] danger_allow_key_import_over_https`. Import keys over
//! the unix socket (`tlsgate ctl` on the appliance).

use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tlsgate_keystore::secret::SecretBuf;
use zeroize::Zeroize;

use super::error::ApiError;

/// The largest key import body (an RSA-4096 PKCS#8 PEM in JSON is about 3.5 KiB).
pub const MAX_IMPORT_BODY_BYTES: usize = 64 * 1024;

/// How often a held chunk is checked for being released by hyper, and for how long at most.
const WIPE_POLL: Duration = Duration::from_millis(20);
const WIPE_MAX_WAIT: Duration = Duration::from_secs(3600);

/// Reads the whole body into a [`SecretBuf`] of `limit` bytes; a larger body is refused with
/// 413. Every chunk of the body is wiped once hyper has released it, also when the read fails.
pub async fn read(body: Body, limit: usize) -> Result<SecretBuf, ApiError> {
    let mut buf = SecretBuf::with_capacity(limit)
        .map_err(|e| ApiError::internal(format!("no memory for the request body: {e}")))?;
    let mut held = Vec::new();
    let mut body = body;
    let result = loop {
        match body.frame().await {
            None => break Ok(()),
            Some(Err(e)) => break Err(ApiError::bad_request(format!("request body: {e}"))),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let fits = buf.extend_from_slice(&data).is_ok();
                held.push(data);
                if !fits {
                    break Err(too_large(limit));
                }
            }
        }
    };
    drop(body);
    wipe_when_released(held);
    result.map(|()| buf)
}

/// The 413 answer.
pub fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is larger than {limit} bytes"),
    )
}

/// Keeps `chunks` alive until nothing else shares their memory, then wipes it in place.
pub fn wipe_when_released(chunks: Vec<Bytes>) {
    if chunks.is_empty() {
        return;
    }
    let mut pending = wipe_released(chunks);
    if pending.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + WIPE_MAX_WAIT;
        while !pending.is_empty() {
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!(
                    chunks = pending.len(),
                    "request body still shared after an hour; released unwiped"
                );
                return;
            }
            tokio::time::sleep(WIPE_POLL).await;
            pending = wipe_released(pending);
        }
    });
}

/// Wipes every chunk nobody else holds; returns the others.
fn wipe_released(chunks: Vec<Bytes>) -> Vec<Bytes> {
    chunks
        .into_iter()
        .filter_map(|b| match b.try_into_mut() {
            Ok(mut owned) => {
                owned[..].zeroize();
                None
            }
            Err(shared) => Some(shared),
        })
        .collect()
}

/// `POST /v1/keys/import`: the PEM stays a borrowed, still-escaped JSON string until it is
/// unescaped into a [`SecretBuf`] (serde_json would otherwise unescape it in a scratch buffer
/// of its own that is freed unwiped).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportKeyRaw<'a> {
    label: String,
    id: Option<String>,
    #[serde(borrow)]
    pkcs8_pem: &'a RawValue,
}

/// A parsed import request; the PEM is in secret memory.
#[derive(Debug)]
pub struct ImportKey {
    pub label: String,
    pub id: Option<String>,
    pub pkcs8_pem: SecretBuf,
}

/// Parses the import body. Error messages name the position, never the content.
pub fn parse_import(body: &SecretBuf) -> Result<ImportKey, ApiError> {
    let raw: ImportKeyRaw<'_> = serde_json::from_slice(body.as_bytes()).map_err(|e| {
        ApiError::bad_request(format!(
            "request body: not a valid import request ({:?} error at line {} column {}); \
             expected {{\"label\": ..., \"id\": ..., \"pkcs8_pem\": ...}}",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let pkcs8_pem = unescape_json_string(raw.pkcs8_pem.get().as_bytes()).ok_or_else(|| {
        ApiError::bad_request("request body: pkcs8_pem must be a JSON string".to_owned())
    })?;
    Ok(ImportKey {
        label: raw.label,
        id: raw.id,
        pkcs8_pem,
    })
}

/// The value of a JSON string literal (quotes included in `raw`, as serde_json validated it),
/// written straight into a [`SecretBuf`].
fn unescape_json_string(raw: &[u8]) -> Option<SecretBuf> {
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let mut out = SecretBuf::with_capacity(inner.len()).ok()?;
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        i += 1;
        if c != b'\\' {
            out.push(c).ok()?;
            continue;
        }
        let e = *inner.get(i)?;
        i += 1;
        let byte = match e {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let hex = std::str::from_utf8(inner.get(i..i + 4)?).ok()?;
                i += 4;
                let code = u32::from_str_radix(hex, 16).ok()?;
                // A PEM is ASCII: other characters cannot be part of a key.
                u8::try_from(code).ok().filter(u8::is_ascii)?
            }
            _ => return None,
        };
        out.push(byte).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretBuf {
        SecretBuf::from_slice(s.as_bytes()).expect("map")
    }

    #[test]
    fn import_body_unescapes_the_pem() {
        let body = secret(
            r#"{"label":"k","pkcs8_pem":"-----BEGIN PRIVATE KEY-----\nAB\/c\u0041\n-----END"}"#,
        );
        let req = parse_import(&body).expect("parses");
        assert_eq!(req.label, "k");
        assert_eq!(req.id, None);
        assert_eq!(
            req.pkcs8_pem.as_bytes(),
            b"-----BEGIN PRIVATE KEY-----\nAB/cA\n-----END"
        );
    }

    #[test]
    fn import_errors_never_echo_the_body() {
        for body in [
            r#"{"label":"k","pkcs8_pem":"SECRETSECRET","extra":1}"#,
            r#"{"label":"k","pkcs8_pem":12345678}"#,
            r#"{"label":"SECRETSECRET"#,
            r#"{"label":"k","pkcs8_pem":"SECRET\u00e9SECRET"}"#,
        ] {
            let err = parse_import(&secret(body)).expect_err(body);
            assert_eq!(err.code, "bad_request");
            assert!(!err.message.contains("SECRET"), "{}", err.message);
            assert!(!err.message.contains("12345678"), "{}", err.message);
        }
    }

    #[test]
    fn a_chunk_is_wiped_only_once_nothing_else_shares_it() {
        let chunk = Bytes::from(b"key material".to_vec());
        let hypers_share = chunk.clone();
        let pending = wipe_released(vec![chunk]);
        assert_eq!(pending.len(), 1, "still shared: kept, not freed");
        drop(hypers_share);
        assert!(
            wipe_released(pending).is_empty(),
            "released: wiped and let go"
        );
    }
}
