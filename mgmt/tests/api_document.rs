//! The served OpenAPI document states what the server enforces: a request the hand-written
//! document used to allow and the server refuses is one the generated document now marks
//! invalid, and an answer the server gives (`"binding": null`) is one the document allows.
//! Against a running appliance on a SoftHSM2 token, over the unix socket with curl.

mod api_support;
mod common;

use anyhow::{ensure, Context, Result};
use api_support::*;
use common::{demo_backend, Lab, Serve};
use serde_json::Value;

/// Follows `$ref`s within the document.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        v = &doc["components"]["schemas"][name];
    }
    v
}

/// Whether `value` may stand where `schema` is, as far as the keywords this test looks at go
/// (enum, minLength, type including `null`): enough to show which keyword refuses it.
fn allowed(doc: &Value, schema: &Value, value: &Value) -> bool {
    let schema = resolve(doc, schema);
    if let Some(one_of) = schema.get("oneOf").and_then(Value::as_array) {
        return one_of.iter().any(|s| allowed(doc, s, value));
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(value) {
            return false;
        }
    }
    if let (Some(min), Some(s)) = (
        schema.get("minLength").and_then(Value::as_u64),
        value.as_str(),
    ) {
        if (s.chars().count() as u64) < min {
            return false;
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => return true,
    };
    let kind = match value {
        Value::Null => "null",
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Object(_) => "object",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
    };
    types.contains(&kind) || (kind == "number" && types.contains(&"integer"))
}

#[test]
fn the_generated_document_marks_what_the_server_refuses() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "doc")?;
    let _serve = Serve::start(&lab, &config)?;

    let (status, text) = curl_unix(&lab, "GET", "/v1/openapi.json", None)?;
    ensure!(status == 200, "{status} {text}");
    let doc: Value = serde_json::from_str(&text).context("the document is JSON")?;

    // The request the hand-written document allowed (it declared no enum, no length): the
    // server refuses it, and the document now says so, field by field.
    let bad = serde_json::json!({ "type": "", "label": "" });
    let (status, answer) = curl_unix(&lab, "POST", "/v1/keys", Some(&bad.to_string()))?;
    ensure!(status == 422, "POST /v1/keys {bad}: {status} {answer}");
    let op = &doc["paths"]["/v1/keys"]["post"];
    let schema = resolve(
        &doc,
        &op["requestBody"]["content"]["application/json"]["schema"],
    );
    let props = &schema["properties"];
    ensure!(
        !allowed(&doc, &props["type"], &bad["type"]),
        "the document allows type \"\": {}",
        props["type"]
    );
    ensure!(
        !allowed(&doc, &props["label"], &bad["label"]),
        "the document allows label \"\": {}",
        props["label"]
    );
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    ensure!(
        required.contains(&"type") && required.contains(&"label") && !required.contains(&"id"),
        "required: {required:?}"
    );
    // A good request is still allowed.
    ensure!(allowed(&doc, &props["type"], &serde_json::json!("ec-p256")));
    ensure!(allowed(&doc, &props["label"], &serde_json::json!("web")));

    // The listener answers `"binding": null` while it has no API binding; the document allows
    // exactly that, and still an array.
    let (status, answer) = curl_unix(&lab, "GET", "/v1/listeners", None)?;
    ensure!(status == 200, "{status} {answer}");
    let listeners: Value = serde_json::from_str(&answer)?;
    let binding = &listeners["items"][0]["binding"];
    ensure!(binding.is_null(), "{answer}");
    let view = resolve(&doc, &doc["components"]["schemas"]["ListenerView"]);
    ensure!(
        allowed(&doc, &view["properties"]["binding"], binding),
        "the document does not allow binding null: {}",
        view["properties"]["binding"]
    );
    ensure!(allowed(
        &doc,
        &view["properties"]["binding"],
        &serde_json::json!([])
    ));
    Ok(())
}
