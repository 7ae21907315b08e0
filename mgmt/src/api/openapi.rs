//! The OpenAPI document served at `GET /v1/openapi.json`, generated: the schemas come from the
//! wire types ([`super::wire`], derived with `utoipa`), the paths from the route table
//! ([`super::routes::routes`]), so neither can drift from what the server serves and parses.
//! Every error answer (any status the operation does not list) has the [`ErrorBody`] shape.

use std::sync::OnceLock;

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, Ref, Required, ResponseBuilder};
use utoipa::OpenApi;

#[allow(unused_imports)] // named by the derive below
use super::wire::*;

/// What the document says about one route, next to the route in the table.
#[derive(Debug, Clone, Copy)]
pub struct Doc {
    pub summary: &'static str,
    /// The request body's schema, if it takes one.
    pub request: Option<&'static str>,
    /// The success status.
    pub status: u16,
    /// The success answer's schema; `None` for an empty answer (204) or a plain object.
    pub answer: Option<&'static str>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tlsgate management API",
        version = "1",
        description = "Served on the unix socket ([api] socket; client = peer uid) and on HTTPS \
                       ([api] listen; client certificate from [api] client_ca required). Every \
                       request is written to the audit log. Errors: {\"error\": {\"code\", \
                       \"message\"}}. Generated from mgmt/src/api/wire.rs."
    ),
    components(schemas(
        ErrorBody, ErrorDetail, KeyType, GenerateKey, ImportKey<'_>, CsrRequest, CsrResponse,
        PutCert, PutBinding, BoundCert, PutCrl, AdminState, SetState, ServerState, CertView,
        CertProblem, CertListItem, KeyView, CertSource, ListenerView, CrlView, BalanceKind,
        Health, ServerView, PoolView, KeyList, CertList, ListenerList, CrlList, AcmeList,
        PoolList, AcmeStatus, ProblemView, SubproblemView, Reloaded, Renewing,
        FleetMember, FleetStatus, PutClientCa, ClientCaView, ClientCaCert, PutFleetConfig,
        FleetConfigView
    ))
)]
struct Schemas;

/// The path parameters of `path` (`{name}` segments), with the constraint the server puts on
/// each: a certificate id is a stored object name.
fn parameters(path: &str) -> Vec<utoipa::openapi::path::Parameter> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            let mut schema = ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1));
            if path.starts_with("/v1/certificates/") && name == "id" {
                schema = schema.pattern(Some(NAME_PATTERN)).max_length(Some(64));
            }
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(schema))
                .build()
        })
        .collect()
}

fn json_content(schema: Option<&str>) -> utoipa::openapi::Content {
    match schema {
        Some(name) => ContentBuilder::new().schema(Some(Ref::from_schema_name(name))),
        None => ContentBuilder::new().schema(Some(ObjectBuilder::new().schema_type(Type::Object))),
    }
    .build()
}

fn method(m: &str) -> HttpMethod {
    match m {
        "get" => HttpMethod::Get,
        "post" => HttpMethod::Post,
        "put" => HttpMethod::Put,
        _ => HttpMethod::Delete,
    }
}

/// Builds the document from the route table.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = Schemas::openapi();
    for r in super::routes::routes() {
        let d = r.doc;
        let ok = if d.status == 204 {
            ResponseBuilder::new().description("Done").build()
        } else {
            ResponseBuilder::new()
                .description("Success")
                .content("application/json", json_content(d.answer))
                .build()
        };
        let error = ResponseBuilder::new()
            .description("An error: a stable code and a message")
            .content("application/json", json_content(Some("ErrorBody")))
            .build();
        let mut op = OperationBuilder::new()
            .summary(Some(d.summary))
            .operation_id(Some(operation_id(r.method, r.path)))
            .parameters(Some(parameters(r.path)))
            .response(d.status.to_string(), ok)
            .response("default", error);
        if let Some(req) = d.request {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content("application/json", json_content(Some(req)))
                    .build(),
            ));
        }
        doc.paths
            .add_path_operation(r.path, vec![method(r.method)], op.build());
    }
    doc
}

/// `get /v1/keys/{label}/csr` → `get_keys_label_csr`.
fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_owned();
    for seg in path.split('/').skip(2) {
        id.push('_');
        id.extend(
            seg.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_'),
        );
    }
    id
}

/// The document as served, rendered once.
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        // Serialising plain maps and strings cannot fail; an empty object would fail the
        // route-listing test.
        document()
            .to_pretty_json()
            .unwrap_or_else(|_| "{}".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every schema the route table names exists in the document: a typo would leave a
    /// dangling `$ref` that no client can resolve.
    #[test]
    fn every_named_schema_exists() {
        let doc: serde_json::Value = serde_json::from_str(json()).expect("valid JSON");
        if std::env::var_os("TLSGATE_PRINT_OPENAPI").is_some() {
            println!("{}", json());
        }
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for r in super::super::routes::routes() {
            for name in [r.doc.request, r.doc.answer].into_iter().flatten() {
                assert!(
                    schemas.contains_key(name),
                    "{} {}: {name}",
                    r.method,
                    r.path
                );
            }
        }
        assert!(schemas.contains_key("ErrorBody"));
    }
}
