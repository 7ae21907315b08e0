//! The management API's wire types: every request body and every answer of `/v1/…`, and the
//! error shape. This file is where the server, `tlsgate ctl` and the OpenAPI document meet: the
//! handlers parse requests into these types and answer with them, `ctl` builds its requests from
//! them and reads the answers back into them, and the document (`GET /v1/openapi.json`, built by
//! [`super::openapi`]) is generated from their `utoipa` schemas. A constraint the server
//! enforces on a field (an enum, a length, a pattern) is declared here next to the field, so a
//! client can see it before sending.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::state::BoundCert;

/// What a `GenerateKey` request may ask the token for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum KeyType {
    #[serde(rename = "ec-p256")]
    EcP256,
    #[serde(rename = "ec-p384")]
    EcP384,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    #[serde(rename = "rsa-4096")]
    Rsa4096,
    #[serde(rename = "ed25519")]
    Ed25519,
}

/// A key label: 1 to 64 characters, none of them a control character (checked by
/// `manager::keys::check_label`).
pub const LABEL_PATTERN: &str = r"^[^\u0000-\u001f\u007f-\u009f]{1,64}$";
/// A CKA_ID: non-empty hex, whole bytes.
pub const KEY_ID_PATTERN: &str = "^([0-9a-fA-F]{2})+$";
/// A stored object name (certificate id): `state::check_name`.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$";

/// `{"error": {"code", "message"}}`: every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A stable machine `code` (clients branch on it) and a human `message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `POST /v1/keys`: generate a key pair on the token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateKey {
    /// Parsed by the manager, which answers `422 key_type_invalid` for another value.
    #[serde(rename = "type")]
    #[schema(value_type = KeyType)]
    pub kind: String,
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]{1,64}$"
    )]
    pub label: String,
    /// CKA_ID in hex; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 2, pattern = "^([0-9a-fA-F]{2})+$")]
    pub id: Option<String>,
}

/// `POST /v1/keys/import`: import a PKCS#8 key. The server never parses this type (the PEM
/// goes only into secret memory, see `secret_body`); it is the document's and `ctl`'s shape,
/// and borrows the PEM so `ctl` makes no copy of it.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportKey<'a> {
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]{1,64}$"
    )]
    pub label: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 2, pattern = "^([0-9a-fA-F]{2})+$")]
    pub id: Option<&'a str>,
    /// `-----BEGIN PRIVATE KEY-----` (PKCS#8, unencrypted).
    #[schema(min_length = 1)]
    pub pkcs8_pem: &'a str,
}

impl std::fmt::Debug for ImportKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportKey")
            .field("label", &self.label)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/keys/{label}/csr`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CsrRequest {
    #[schema(min_length = 1)]
    pub common_name: String,
    #[serde(default)]
    pub sans: Vec<String>,
}

/// The answer to a CSR request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CsrResponse {
    pub csr_pem: String,
}

/// `PUT /v1/certificates/{id}`: upload a certificate chain.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutCert {
    /// A key label on the configured token, a `pkcs11:` URI, or `file:PATH`.
    #[schema(min_length = 1)]
    pub key: String,
    /// The chain, leaf first.
    #[schema(min_length = 1)]
    pub chain_pem: String,
}

/// `PUT /v1/listeners/{name}/binding`: the certificates a listener serves.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutBinding {
    pub certificates: Vec<BoundCert>,
}

/// `POST /v1/listeners/{name}/crls`: upload a CRL.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutCrl {
    #[schema(min_length = 1)]
    pub pem: String,
}

/// `PUT /v1/listeners/{name}/client-ca`: the CA certificates (PEM) this listener trusts for
/// client certificates, in place of its configuration's `client_auth.ca` bundle.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutClientCa {
    #[schema(min_length = 1)]
    pub pem: String,
}

/// A listener's client CA bundle uploaded through the API.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClientCaView {
    pub listener: String,
    pub certificates: Vec<ClientCaCert>,
    /// When it was uploaded (Unix seconds).
    pub updated_unix: u64,
}

/// One CA certificate of a client CA bundle.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClientCaCert {
    pub subject: String,
    pub not_after: String,
    /// Hex SHA-256 of the certificate (DER).
    pub sha256: String,
}

/// `PUT /v1/fleet/config`: the fleet's share of the configuration, a TOML document of
/// `[[backend]]` pools and `[[listener]]` entries (name plus backend, default_backend, route,
/// session) merged over every appliance's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutFleetConfig {
    #[schema(min_length = 1)]
    pub toml: String,
}

/// The fleet's share of the configuration, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetConfigView {
    pub toml: String,
}

/// An operator's state for a backend server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    Ready,
    Drain,
    Maint,
}

/// `PUT /v1/backends/{name}/servers/{id}/state`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetState {
    pub state: AdminState,
}

/// The answer to [`SetState`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerState {
    pub pool: String,
    pub server: String,
    pub state: AdminState,
}

/// A certificate as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertView {
    pub id: String,
    pub key: String,
    pub subject: String,
    pub issuer: String,
    pub sans: Vec<String>,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub not_after_unix: i64,
    pub chain_not_after: String,
    pub fingerprint_sha256: String,
    pub chain_length: u64,
    pub updated_unix: u64,
    /// Listeners whose binding names it.
    pub bound_to: Vec<String>,
}

/// A stored certificate that no longer loads, with why.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertProblem {
    pub id: String,
    pub problem: ErrorDetail,
}

/// One entry of the certificate list.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // a short list, built once per request
pub enum CertListItem {
    Ok(CertView),
    Problem(CertProblem),
}

/// A key as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    pub label: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub uri: String,
    pub sensitive: bool,
    pub extractable: bool,
    pub always_sensitive: bool,
    pub never_extractable: bool,
    /// `generated` on the token or `imported`.
    pub origin: String,
    pub spki_sha256: String,
    /// Certificates (state directory ids, or `config:<listener>`) that use it.
    pub used_by: Vec<String>,
}

/// Where a listener's certificates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    /// A binding set through the API replaces the configuration file's certificates.
    Api,
    /// The configuration file's `[[listener.certificate]]` entries.
    Config,
}

/// A listener and what it serves.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListenerView {
    pub name: String,
    /// The address it listens on (the configured one until the data plane has bound it).
    pub bind: String,
    /// How many `[[listener.certificate]]` entries the configuration file gives it.
    pub config_certificates: u64,
    pub source: CertSource,
    /// The API binding; `null` while there is none (the configuration file's certificates
    /// serve), which is not the same as a binding of no certificates.
    pub binding: Option<Vec<BoundCert>>,
    pub crls: Vec<CrlView>,
    /// The client CA bundle uploaded for it (`null`: its configuration's `client_auth.ca`).
    pub client_ca: Option<ClientCaView>,
}

/// A CRL as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CrlView {
    pub id: String,
    pub issuer: String,
    pub this_update: String,
    pub next_update: Option<String>,
    pub revoked: u64,
}

// The ACME client's status (kept in its state, shown by `GET /v1/acme`).

/// One `[[acme]]` entry as `tlsgate ctl acme status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct AcmeStatus {
    pub name: String,
    pub names: Vec<String>,
    /// `pending` (nothing issued yet), `ordering`, `valid`, `renewing`, `retrying`; in a
    /// fleet, `standby` on the appliances that do not order.
    pub state: String,
    /// In a fleet: the member that orders for the fleet (`None` while nobody holds the role,
    /// and outside a fleet).
    pub orderer: Option<String>,
    pub not_after: Option<String>,
    pub not_after_unix: Option<i64>,
    pub issuer: Option<String>,
    pub serial: Option<String>,
    /// The token key of the served certificate.
    pub key: Option<String>,
    /// When the client next tries to issue or renew (Unix seconds).
    pub next_renewal_unix: Option<u64>,
    pub next_renewal: Option<String>,
    /// The order in flight, resumed after a restart.
    pub order_url: Option<String>,
    pub orders_placed: u64,
    pub failures: u32,
    pub last_error: Option<ProblemView>,
    /// Whether the CA offers ACME Renewal Information (RFC 9773); `None` until asked.
    pub ari: Option<bool>,
}

/// An ACME problem document as kept for status (RFC 7807 / RFC 8555 §6.7).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProblemView {
    /// `urn:ietf:params:acme:error:...`, or `tlsgate:...` for errors that are not the CA's.
    #[serde(rename = "type")]
    pub kind: String,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subproblems: Vec<SubproblemView>,
    /// When it happened (Unix seconds).
    pub at_unix: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubproblemView {
    pub identifier: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub detail: Option<String>,
}

/// How a pool picks a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BalanceKind {
    RoundRobin,
    LeastConnections,
    ConsistentHash,
}

/// A server's health as the data plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
    Ejected,
}

/// A backend server of a published pool.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerView {
    pub address: String,
    pub weight: u32,
    pub max_connections: u64,
    pub state: AdminState,
    pub health: Health,
    pub active: u64,
    pub total: u64,
    pub connect_errors: u64,
}

/// A published backend pool.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PoolView {
    pub name: String,
    pub balance: BalanceKind,
    pub alpn: Vec<String>,
    pub health_check: bool,
    pub servers: Vec<ServerView>,
}

/// `{"items": [...]}`: the list answers, one named type per item type so the document names
/// each.
macro_rules! list {
    ($($name:ident of $item:ty),* $(,)?) => {$(
        #[doc = concat!("`{\"items\": [...]}` of [`", stringify!($item), "`].")]
        #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
        pub struct $name {
            pub items: Vec<$item>,
        }
    )*};
}

list!(
    KeyList of KeyView,
    CertList of CertListItem,
    ListenerList of ListenerView,
    CrlList of CrlView,
    AcmeList of AcmeStatus,
    PoolList of PoolView,
);

/// One appliance of a fleet as `GET /v1/fleet` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetMember {
    pub name: String,
    /// etcd revision of the state this appliance serves (0: none from etcd yet).
    pub applied_revision: i64,
    /// The newest revision it read (greater than `applied_revision` when that state was refused).
    pub seen_revision: i64,
    /// How many revisions the served state is behind the newest one.
    pub lag: i64,
    /// Why the newest state was refused; null when it serves it.
    pub error: Option<String>,
    /// Certificates of the state whose key this appliance's HSM does not hold: the others serve
    /// them, this one leaves them out of its bindings until its HSM has the key.
    pub missing_keys: Vec<String>,
    pub updated_unix: u64,
}

/// The answer to `GET /v1/fleet`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetStatus {
    /// This appliance's member name.
    pub this: String,
    /// The newest revision of the fleet's state in etcd.
    pub state_revision: i64,
    pub members: Vec<FleetMember>,
}

/// The answer to `POST /v1/reload`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Reloaded {
    pub reloaded: bool,
}

/// The answer to `POST /v1/acme/{name}/renew`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Renewing {
    pub renewing: bool,
}
