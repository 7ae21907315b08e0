//! `tlsgate ctl …`: a thin client of the management API, over the unix socket (default) or over
//! HTTPS with a client certificate (`--url`, `--cert`, `--key`, `--cacert`).
//!
//! Exit codes: 0 done; 1 the API refused (its error code and message on stderr); 2 bad command
//! line or local input (a file that cannot be read); 3 the API could not be reached or answered
//! something that is not the API.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::api::wire;

mod text;
use text::Text;

/// Where the CLI looks for the API socket when neither `--socket` nor `--url` is given.
pub const DEFAULT_SOCKET: &str = "/run/tlsgate/api.sock";

/// Exit code: the API answered with an error.
pub const EXIT_REFUSED: i32 = 1;
/// Exit code: bad command line or local input (as clap's own usage errors).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: the API could not be reached.
pub const EXIT_UNREACHABLE: i32 = 3;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The API's unix socket.
    #[arg(long, env = "TLSGATE_API_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The API over HTTPS instead, e.g. `https://10.0.0.5:9443` (needs --cert, --key, --cacert).
    #[arg(long, env = "TLSGATE_API_URL")]
    pub url: Option<String>,
    /// Client certificate chain (PEM) for HTTPS.
    #[arg(long, requires = "url")]
    pub cert: Option<PathBuf>,
    /// Client private key (PKCS#8 PEM) for HTTPS.
    #[arg(long, requires = "url")]
    pub key: Option<PathBuf>,
    /// CA (PEM) that issued the API's server certificate.
    #[arg(long, requires = "url")]
    pub cacert: Option<PathBuf>,
    /// Print the API's JSON answer instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Keys on the token.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Certificate chains in the state directory.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Listeners and which certificates they serve.
    #[command(subcommand)]
    Listeners(ListenersCommand),
    /// CRLs of a listener (checked when it verifies client certificates).
    #[command(subcommand)]
    Crls(CrlsCommand),
    /// The CAs a listener trusts for client certificates (in place of `client_auth.ca`).
    #[command(subcommand)]
    ClientCa(ClientCaCommand),
    /// Backend pools and their servers' state.
    #[command(subcommand)]
    Backends(BackendsCommand),
    /// Certificates issued and renewed by an ACME CA (`[[acme]]`).
    #[command(subcommand)]
    Acme(AcmeCommand),
    /// Fleet mode (`[fleet]`): the appliances sharing the state in etcd.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Re-read the configuration file.
    Reload,
    /// Print the API's OpenAPI document.
    Openapi,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List the private keys (type, label, id, flags, origin, SPKI SHA-256, users).
    List,
    /// Generate a key pair on the token.
    Generate {
        /// ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096 or ed25519.
        #[arg(long = "type")]
        kind: String,
        #[arg(long)]
        label: String,
        /// CKA_ID in hex; random when omitted.
        #[arg(long)]
        id: Option<String>,
    },
    /// Import a PKCS#8 PEM key into the token (sensitive, non-extractable).
    Import {
        #[arg(long)]
        label: String,
        /// The PKCS#8 PEM file.
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        id: Option<String>,
    },
    /// Delete a key (refused while a bound certificate uses it).
    Delete {
        #[arg(long)]
        label: String,
    },
    /// Create a PKCS#10 request signed by the key.
    Csr {
        #[arg(long)]
        label: String,
        /// Subject common name.
        #[arg(long)]
        cn: String,
        /// Subject alternative name; repeat for more.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Write the PEM here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// List certificates (subject, issuer, SANs, serial, validity, fingerprint, bindings).
    List,
    /// Show one certificate.
    Show {
        #[arg(long)]
        id: String,
    },
    /// Upload a PEM chain for a key; replaces the certificate of that id (a rotation when bound).
    Upload {
        /// Name of the certificate in the state directory.
        #[arg(long)]
        id: String,
        /// Key label on the token, a pkcs11: URI, or file:PATH.
        #[arg(long)]
        key: String,
        /// PEM chain file: leaf first, then intermediates.
        #[arg(long)]
        chain: PathBuf,
    },
    /// Delete a certificate (refused while bound).
    Delete {
        #[arg(long)]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ListenersCommand {
    /// List listeners, their bindings and CRLs.
    List,
    /// Serve these certificates on a listener (instead of the configuration file's).
    Bind {
        #[arg(long)]
        listener: String,
        /// Certificate id; repeat for more (the first that suits a client wins).
        #[arg(long = "cert", required = true)]
        certs: Vec<String>,
        /// The certificate id that answers clients without (or with unknown) SNI.
        #[arg(long)]
        default: Option<String>,
        /// `ID=name1,name2`: SNI names for a certificate (default: its DNS SANs).
        #[arg(long = "names")]
        names: Vec<String>,
    },
    /// Remove a listener's binding: it serves the configuration file's certificates again.
    Unbind {
        #[arg(long)]
        listener: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackendsCommand {
    /// List pools and servers: state, health, connections, weight.
    List,
    /// Set a server's state: ready, drain (no new connections; open ones finish) or maint.
    SetState {
        /// Pool name.
        pool: String,
        /// Server address as configured (host:port).
        server: String,
        /// ready | drain | maint
        state: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AcmeCommand {
    /// Per entry: state, expiry, next renewal, last error.
    Status,
    /// Renew an entry's certificate now.
    Renew { name: String },
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Every member: the state revision it serves, its lag, the error that refused a newer one.
    Status,
    /// The fleet's share of the configuration: pools, routes, session policy (TOML).
    #[command(subcommand)]
    Config(FleetConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum FleetConfigCommand {
    /// Print it.
    Show,
    /// Set it from a TOML file ([[backend]] pools, [[listener]] name + backend,
    /// default_backend, route, session).
    Set {
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove it: each appliance's file alone again.
    Clear,
}

#[derive(Debug, Subcommand)]
pub enum CrlsCommand {
    /// List a listener's CRLs.
    List {
        #[arg(long)]
        listener: String,
    },
    /// Upload a PEM CRL for a listener.
    Upload {
        #[arg(long)]
        listener: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Delete a CRL by id.
    Delete {
        #[arg(long)]
        listener: String,
        #[arg(long)]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientCaCommand {
    /// The bundle uploaded for a listener.
    Show {
        #[arg(long)]
        listener: String,
    },
    /// Upload a PEM bundle of CA certificates for a listener.
    Set {
        #[arg(long)]
        listener: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove the uploaded bundle: the configuration's `client_auth.ca` serves again.
    Clear {
        #[arg(long)]
        listener: String,
    },
}

/// What a command sends: a [`wire`] request type, serialised (wiped after, as it may hold a
/// key), and the [`wire`] type its answer is read into.
struct Call {
    method: Method,
    path: String,
    body: Option<Zeroizing<Vec<u8>>>,
    answer: Answer,
}

/// Which [`wire`] type a command's success answer is.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// 204: no body.
    Empty,
    Keys,
    Key,
    Csr,
    Certs,
    Cert,
    Listeners,
    Crls,
    Crl,
    ClientCa,
    FleetConfig,
    Pools,
    ServerState,
    Acme,
    Renewing,
    Fleet,
    Reloaded,
    /// The OpenAPI document, printed as it came.
    Document,
}

fn call(method: Method, path: impl Into<String>, answer: Answer) -> Call {
    Call {
        method,
        path: path.into(),
        body: None,
        answer,
    }
}

fn call_with(
    method: Method,
    path: impl Into<String>,
    body: &impl Serialize,
    answer: Answer,
) -> Result<Call> {
    let body = Zeroizing::new(serde_json::to_vec(body).context("cannot encode the request")?);
    Ok(Call {
        body: Some(body),
        ..call(method, path, answer)
    })
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn seg(s: &str) -> String {
    // Path segments: percent-encode everything outside the unreserved set.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Runs one `ctl` command; exits the process with the codes in the module docs.
pub fn run(args: CtlArgs) -> Result<()> {
    let (c, csr_out) = match request(&args) {
        Ok(x) => x,
        Err(err) => {
            // Local input (a file to send, an option) is wrong: nothing was sent.
            eprintln!("error: {err:#}");
            std::process::exit(EXIT_USAGE);
        }
    };
    send_and_print(&args, &c, csr_out)
}

/// The request a command sends, and where a CSR goes.
#[allow(clippy::type_complexity)]
fn request(args: &CtlArgs) -> Result<(Call, Option<Option<PathBuf>>)> {
    let mut csr_out = None;
    let c = match &args.command {
        CtlCommand::Keys(k) => match k {
            KeysCommand::List => call(Method::GET, "/v1/keys", Answer::Keys),
            KeysCommand::Generate { kind, label, id } => call_with(
                Method::POST,
                "/v1/keys",
                &wire::GenerateKey {
                    kind: kind.clone(),
                    label: label.clone(),
                    id: id.clone(),
                },
                Answer::Key,
            )?,
            KeysCommand::Import {
                label,
                key_file,
                id,
            } => {
                let pem = Zeroizing::new(read(key_file)?);
                call_with(
                    Method::POST,
                    "/v1/keys/import",
                    &wire::ImportKey {
                        label,
                        id: id.as_deref(),
                        pkcs8_pem: &pem,
                    },
                    Answer::Key,
                )?
            }
            KeysCommand::Delete { label } => call(
                Method::DELETE,
                format!("/v1/keys/{}", seg(label)),
                Answer::Empty,
            ),
            KeysCommand::Csr {
                label,
                cn,
                sans,
                out,
            } => {
                csr_out = Some(out.clone());
                call_with(
                    Method::POST,
                    format!("/v1/keys/{}/csr", seg(label)),
                    &wire::CsrRequest {
                        common_name: cn.clone(),
                        sans: sans.clone(),
                    },
                    Answer::Csr,
                )?
            }
        },
        CtlCommand::Certs(c) => match c {
            CertsCommand::List => call(Method::GET, "/v1/certificates", Answer::Certs),
            CertsCommand::Show { id } => call(
                Method::GET,
                format!("/v1/certificates/{}", seg(id)),
                Answer::Cert,
            ),
            CertsCommand::Upload { id, key, chain } => call_with(
                Method::PUT,
                format!("/v1/certificates/{}", seg(id)),
                &wire::PutCert {
                    key: key.clone(),
                    chain_pem: read(chain)?,
                },
                Answer::Cert,
            )?,
            CertsCommand::Delete { id } => call(
                Method::DELETE,
                format!("/v1/certificates/{}", seg(id)),
                Answer::Empty,
            ),
        },
        CtlCommand::Listeners(l) => match l {
            ListenersCommand::List => call(Method::GET, "/v1/listeners", Answer::Listeners),
            ListenersCommand::Bind {
                listener,
                certs,
                default,
                names,
            } => {
                let mut named = std::collections::HashMap::new();
                for n in names {
                    let Some((id, list)) = n.split_once('=') else {
                        bail!("--names {n:?}: use ID=name1,name2");
                    };
                    named.insert(
                        id.to_owned(),
                        list.split(',').map(str::to_owned).collect::<Vec<_>>(),
                    );
                }
                if let Some(d) = default {
                    if !certs.contains(d) {
                        bail!("--default {d:?} must be one of the --cert ids");
                    }
                }
                let certificates = certs
                    .iter()
                    .map(|id| wire::BoundCert {
                        cert: id.clone(),
                        names: named.get(id).cloned(),
                        default: default.as_deref() == Some(id.as_str()),
                    })
                    .collect();
                call_with(
                    Method::PUT,
                    format!("/v1/listeners/{}/binding", seg(listener)),
                    &wire::PutBinding { certificates },
                    Answer::Empty,
                )?
            }
            ListenersCommand::Unbind { listener } => call(
                Method::DELETE,
                format!("/v1/listeners/{}/binding", seg(listener)),
                Answer::Empty,
            ),
        },
        CtlCommand::Crls(c) => match c {
            CrlsCommand::List { listener } => call(
                Method::GET,
                format!("/v1/listeners/{}/crls", seg(listener)),
                Answer::Crls,
            ),
            CrlsCommand::Upload { listener, file } => call_with(
                Method::POST,
                format!("/v1/listeners/{}/crls", seg(listener)),
                &wire::PutCrl { pem: read(file)? },
                Answer::Crl,
            )?,
            CrlsCommand::Delete { listener, id } => call(
                Method::DELETE,
                format!("/v1/listeners/{}/crls/{}", seg(listener), seg(id)),
                Answer::Empty,
            ),
        },
        CtlCommand::ClientCa(c) => match c {
            ClientCaCommand::Show { listener } => call(
                Method::GET,
                format!("/v1/listeners/{}/client-ca", seg(listener)),
                Answer::ClientCa,
            ),
            ClientCaCommand::Set { listener, file } => call_with(
                Method::PUT,
                format!("/v1/listeners/{}/client-ca", seg(listener)),
                &wire::PutClientCa { pem: read(file)? },
                Answer::ClientCa,
            )?,
            ClientCaCommand::Clear { listener } => call(
                Method::DELETE,
                format!("/v1/listeners/{}/client-ca", seg(listener)),
                Answer::Empty,
            ),
        },
        CtlCommand::Backends(b) => match b {
            BackendsCommand::List => call(Method::GET, "/v1/backends", Answer::Pools),
            BackendsCommand::SetState {
                pool,
                server,
                state,
            } => {
                let state = match state.as_str() {
                    "ready" => wire::AdminState::Ready,
                    "drain" => wire::AdminState::Drain,
                    "maint" => wire::AdminState::Maint,
                    other => bail!("state {other:?}: use ready, drain or maint"),
                };
                call_with(
                    Method::PUT,
                    format!("/v1/backends/{}/servers/{}/state", seg(pool), seg(server)),
                    &wire::SetState { state },
                    Answer::ServerState,
                )?
            }
        },
        CtlCommand::Acme(AcmeCommand::Status) => call(Method::GET, "/v1/acme", Answer::Acme),
        CtlCommand::Acme(AcmeCommand::Renew { name }) => call(
            Method::POST,
            format!("/v1/acme/{}/renew", seg(name)),
            Answer::Renewing,
        ),
        CtlCommand::Fleet(FleetCommand::Status) => call(Method::GET, "/v1/fleet", Answer::Fleet),
        CtlCommand::Fleet(FleetCommand::Config(c)) => match c {
            FleetConfigCommand::Show => call(Method::GET, "/v1/fleet/config", Answer::FleetConfig),
            FleetConfigCommand::Set { file } => call_with(
                Method::PUT,
                "/v1/fleet/config",
                &wire::PutFleetConfig { toml: read(file)? },
                Answer::FleetConfig,
            )?,
            FleetConfigCommand::Clear => call(Method::DELETE, "/v1/fleet/config", Answer::Empty),
        },
        CtlCommand::Reload => call(Method::POST, "/v1/reload", Answer::Reloaded),
        CtlCommand::Openapi => call(Method::GET, "/v1/openapi.json", Answer::Document),
    };
    Ok((c, csr_out))
}

/// Exits with [`EXIT_UNREACHABLE`]: what answered is not the API (or not this version of it).
fn not_the_api(status: StatusCode, body: &[u8], err: &serde_json::Error) -> ! {
    eprintln!(
        "error: the answer ({status}) is not the API's ({err}): {}",
        String::from_utf8_lossy(body)
            .chars()
            .take(200)
            .collect::<String>()
    );
    std::process::exit(EXIT_UNREACHABLE);
}

/// Reads the answer into its [`wire`] type.
fn parse<T: DeserializeOwned>(status: StatusCode, body: &[u8]) -> T {
    serde_json::from_slice(body).unwrap_or_else(|e| not_the_api(status, body, &e))
}

/// Prints an answer: its JSON with `--json`, else its text form.
fn show<T: DeserializeOwned + Serialize + Text>(
    args: &CtlArgs,
    status: StatusCode,
    body: &[u8],
) -> Result<()> {
    let v: T = parse(status, body);
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!("{}", v.text());
    }
    Ok(())
}

fn send_and_print(args: &CtlArgs, c: &Call, csr_out: Option<Option<PathBuf>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let (status, body) = match rt.block_on(send(args, c)) {
        Ok(x) => x,
        Err(err) => {
            eprintln!("error: cannot reach the management API: {err:#}");
            std::process::exit(EXIT_UNREACHABLE);
        }
    };
    if !status.is_success() {
        let e: wire::ErrorBody = parse(status, &body);
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&e)?);
        }
        eprintln!("error: {}: {}", e.error.code, e.error.message);
        std::process::exit(EXIT_REFUSED);
    }
    match c.answer {
        Answer::Empty => {
            if args.json {
                outln!("null");
            } else {
                outln!("ok ({} {})", c.method, c.path);
            }
            Ok(())
        }
        Answer::Csr => {
            let v: wire::CsrResponse = parse(status, &body);
            match (args.json, csr_out.flatten()) {
                (true, _) => outln!("{}", serde_json::to_string_pretty(&v)?),
                (false, Some(path)) => {
                    crate::files::write_atomic(&path, v.csr_pem.as_bytes(), 0o644)?
                }
                (false, None) => out!("{}", v.csr_pem),
            }
            Ok(())
        }
        Answer::Document => {
            // Printed as served (pretty); ctl does not read it.
            let doc: serde::de::IgnoredAny = parse(status, &body);
            let _ = doc;
            outln!("{}", String::from_utf8_lossy(&body));
            Ok(())
        }
        Answer::Keys => show::<wire::KeyList>(args, status, &body),
        Answer::Key => show::<wire::KeyView>(args, status, &body),
        Answer::Certs => show::<wire::CertList>(args, status, &body),
        Answer::Cert => show::<wire::CertView>(args, status, &body),
        Answer::Listeners => show::<wire::ListenerList>(args, status, &body),
        Answer::Crls => show::<wire::CrlList>(args, status, &body),
        Answer::Crl => show::<wire::CrlView>(args, status, &body),
        Answer::ClientCa => show::<wire::ClientCaView>(args, status, &body),
        Answer::FleetConfig => show::<wire::FleetConfigView>(args, status, &body),
        Answer::Pools => show::<wire::PoolList>(args, status, &body),
        Answer::ServerState => show::<wire::ServerState>(args, status, &body),
        Answer::Acme => show::<wire::AcmeList>(args, status, &body),
        Answer::Renewing => show::<wire::Renewing>(args, status, &body),
        Answer::Fleet => show::<wire::FleetStatus>(args, status, &body),
        Answer::Reloaded => show::<wire::Reloaded>(args, status, &body),
    }
}

/// One request; returns the status and the body.
async fn send(args: &CtlArgs, c: &Call) -> Result<(StatusCode, Vec<u8>)> {
    let body = match &c.body {
        Some(v) => Bytes::copy_from_slice(v),
        None => Bytes::new(),
    };
    let (host, stream): (String, Box<dyn Io>) = match &args.url {
        None => {
            let s = tokio::net::UnixStream::connect(&args.socket)
                .await
                .with_context(|| format!("{} (set --socket or --url)", args.socket.display()))?;
            ("localhost".to_owned(), Box::new(s))
        }
        Some(url) => {
            let (host, port) = parse_url(url)?;
            let tls = client_tls(args)?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .with_context(|| format!("cannot connect to {host}:{port}"))?;
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .with_context(|| format!("{host:?} is not a server name"))?;
            let s = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .context("TLS handshake with the API")?;
            (host, Box::new(s))
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(c.method.clone())
        .uri(c.path.as_str())
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, bytes.to_vec()))
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

fn parse_url(url: &str) -> Result<(String, u16)> {
    let Some(rest) = url.strip_prefix("https://") else {
        bail!("--url {url:?}: only https:// URLs (the API always authenticates clients)");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse()
                .with_context(|| format!("--url {url:?}: bad port"))?,
        ),
        None => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("--url {url:?}: no host");
    }
    Ok((host.to_owned(), port))
}

fn client_tls(args: &CtlArgs) -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(cert), Some(key), Some(ca)) = (&args.cert, &args.key, &args.cacert) else {
        bail!("--url needs --cert, --key and --cacert");
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("--cacert {}", ca.display()))?
    {
        roots.add(c.with_context(|| format!("--cacert {}", ca.display()))?)?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("--cert {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--cert {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("--key {}", key.display()))?;
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("--cert/--key")?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_segments() {
        assert_eq!(
            parse_url("https://10.0.0.5:9443").expect("ok"),
            ("10.0.0.5".into(), 9443)
        );
        assert_eq!(
            parse_url("https://[::1]:9443/x").expect("ok"),
            ("::1".into(), 9443)
        );
        assert!(parse_url("http://x:1").is_err());
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
    }
}
