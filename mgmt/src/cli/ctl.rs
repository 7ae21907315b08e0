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
use serde_json::{json, Value};

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

/// What a command sends.
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
}

fn call(method: Method, path: impl Into<String>, body: Option<Value>) -> Call {
    Call {
        method,
        path: path.into(),
        body,
    }
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
            KeysCommand::List => call(Method::GET, "/v1/keys", None),
            KeysCommand::Generate { kind, label, id } => call(
                Method::POST,
                "/v1/keys",
                Some(json!({ "type": kind, "label": label, "id": id })),
            ),
            KeysCommand::Import {
                label,
                key_file,
                id,
            } => {
                let pem = zeroize::Zeroizing::new(read(key_file)?);
                call(
                    Method::POST,
                    "/v1/keys/import",
                    Some(json!({ "label": label, "id": id, "pkcs8_pem": pem.as_str() })),
                )
            }
            KeysCommand::Delete { label } => {
                call(Method::DELETE, format!("/v1/keys/{}", seg(label)), None)
            }
            KeysCommand::Csr {
                label,
                cn,
                sans,
                out,
            } => {
                csr_out = Some(out.clone());
                call(
                    Method::POST,
                    format!("/v1/keys/{}/csr", seg(label)),
                    Some(json!({ "common_name": cn, "sans": sans })),
                )
            }
        },
        CtlCommand::Certs(c) => match c {
            CertsCommand::List => call(Method::GET, "/v1/certificates", None),
            CertsCommand::Show { id } => {
                call(Method::GET, format!("/v1/certificates/{}", seg(id)), None)
            }
            CertsCommand::Upload { id, key, chain } => call(
                Method::PUT,
                format!("/v1/certificates/{}", seg(id)),
                Some(json!({ "key": key, "chain_pem": read(chain)? })),
            ),
            CertsCommand::Delete { id } => call(
                Method::DELETE,
                format!("/v1/certificates/{}", seg(id)),
                None,
            ),
        },
        CtlCommand::Listeners(l) => match l {
            ListenersCommand::List => call(Method::GET, "/v1/listeners", None),
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
                let list: Vec<Value> = certs
                    .iter()
                    .map(|id| {
                        let mut v = json!({ "cert": id, "default": default.as_deref() == Some(id.as_str()) });
                        if let Some(n) = named.get(id) {
                            v["names"] = json!(n);
                        }
                        v
                    })
                    .collect();
                call(
                    Method::PUT,
                    format!("/v1/listeners/{}/binding", seg(listener)),
                    Some(json!({ "certificates": list })),
                )
            }
            ListenersCommand::Unbind { listener } => call(
                Method::DELETE,
                format!("/v1/listeners/{}/binding", seg(listener)),
                None,
            ),
        },
        CtlCommand::Crls(c) => match c {
            CrlsCommand::List { listener } => call(
                Method::GET,
                format!("/v1/listeners/{}/crls", seg(listener)),
                None,
            ),
            CrlsCommand::Upload { listener, file } => call(
                Method::POST,
                format!("/v1/listeners/{}/crls", seg(listener)),
                Some(json!({ "pem": read(file)? })),
            ),
            CrlsCommand::Delete { listener, id } => call(
                Method::DELETE,
                format!("/v1/listeners/{}/crls/{}", seg(listener), seg(id)),
                None,
            ),
        },
        CtlCommand::Backends(b) => match b {
            BackendsCommand::List => call(Method::GET, "/v1/backends", None),
            BackendsCommand::SetState {
                pool,
                server,
                state,
            } => call(
                Method::PUT,
                format!("/v1/backends/{}/servers/{}/state", seg(pool), seg(server)),
                Some(json!({ "state": state })),
            ),
        },
        CtlCommand::Acme(AcmeCommand::Status) => call(Method::GET, "/v1/acme", None),
        CtlCommand::Acme(AcmeCommand::Renew { name }) => {
            call(Method::POST, format!("/v1/acme/{}/renew", seg(name)), None)
        }
        CtlCommand::Fleet(FleetCommand::Status) => call(Method::GET, "/v1/fleet", None),
        CtlCommand::Reload => call(Method::POST, "/v1/reload", None),
        CtlCommand::Openapi => call(Method::GET, "/v1/openapi.json", None),
    };
    Ok((c, csr_out))
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
    let value: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => {
                eprintln!(
                    "error: the answer ({status}) is not JSON: {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                );
                std::process::exit(EXIT_UNREACHABLE);
            }
        }
    };
    if !status.is_success() {
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&value)?);
        }
        let code = value["error"]["code"].as_str().unwrap_or("unknown");
        let message = value["error"]["message"].as_str().unwrap_or("");
        eprintln!("error: {code}: {message}");
        std::process::exit(EXIT_REFUSED);
    }
    if let Some(out) = csr_out {
        let pem = value["csr_pem"].as_str().unwrap_or_default();
        if !args.json {
            match out {
                Some(path) => crate::files::write_atomic(&path, pem.as_bytes(), 0o644)?,
                None => out!("{pem}"),
            }
            return Ok(());
        }
    }
    if args.json || matches!(args.command, CtlCommand::Openapi) {
        outln!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_text(c, status, &value);
    }
    Ok(())
}

fn print_text(c: &Call, status: StatusCode, v: &Value) {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    if let Some(members) = v["members"].as_array() {
        println!(
            "state revision {}; this appliance {}",
            s(&v["state_revision"]),
            s(&v["this"])
        );
        println!("{:<16} {:>8} {:>5}  error", "member", "applied", "lag");
        for m in members {
            println!(
                "{:<16} {:>8} {:>5}  {}",
                s(&m["name"]),
                s(&m["applied_revision"]),
                s(&m["lag"]),
                s(&m["error"])
            );
        }
        return;
    }
    if let Some(items) = v["items"].as_array() {
        for item in items {
            let line = if let Some(servers) = item["servers"].as_array() {
                let mut out = format!(
                    "pool {} balance={} alpn={}",
                    s(&item["name"]),
                    s(&item["balance"]),
                    s(&item["alpn"])
                );
                for sv in servers {
                    out.push_str(&format!(
                        "\n  {:<22} state={:<5} health={:<7} active={} total={} weight={} connect_errors={}",
                        s(&sv["address"]),
                        s(&sv["state"]),
                        s(&sv["health"]),
                        s(&sv["active"]),
                        s(&sv["total"]),
                        s(&sv["weight"]),
                        s(&sv["connect_errors"])
                    ));
                }
                out
            } else if item.get("spki_sha256").is_some() {
                format!(
                    "{:<20} {:<9} {:<9} {} used_by={}",
                    s(&item["label"]),
                    s(&item["type"]),
                    s(&item["origin"]),
                    s(&item["spki_sha256"]),
                    s(&item["used_by"])
                )
            } else if item.get("next_renewal").is_some() {
                let mut out = format!(
                    "{:<12} {:<9} not_after={} next_renewal={} orders={} failures={} key={} issuer={}",
                    s(&item["name"]),
                    s(&item["state"]),
                    s(&item["not_after"]),
                    s(&item["next_renewal"]),
                    s(&item["orders_placed"]),
                    s(&item["failures"]),
                    s(&item["key"]),
                    s(&item["issuer"])
                );
                let e = &item["last_error"];
                if !e.is_null() {
                    out.push_str(&format!(
                        "\n  last_error: {} {}",
                        s(&e["type"]),
                        s(&e["detail"])
                    ));
                    for sp in e["subproblems"].as_array().into_iter().flatten() {
                        let sp = [&sp["identifier"], &sp["type"], &sp["detail"]].map(s);
                        out.push_str(&format!("\n    {}: {} {}", sp[0], sp[1], sp[2]));
                    }
                }
                out
            } else if item.get("problem").is_some() {
                format!(
                    "{:<20} PROBLEM {}: {}",
                    s(&item["id"]),
                    s(&item["problem"]["code"]),
                    s(&item["problem"]["message"])
                )
            } else if item.get("fingerprint_sha256").is_some() {
                format!(
                    "{:<20} not_after={} subject={} sans={} bound_to={}",
                    s(&item["id"]),
                    s(&item["not_after"]),
                    s(&item["subject"]),
                    s(&item["sans"]),
                    s(&item["bound_to"])
                )
            } else if item.get("source").is_some() {
                let certs = item["binding"]
                    .as_array()
                    .map(|b| {
                        b.iter()
                            .map(|c| {
                                format!(
                                    "{}{}",
                                    s(&c["cert"]),
                                    if c["default"] == json!(true) {
                                        "(default)"
                                    } else {
                                        ""
                                    }
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_else(|| {
                        format!(
                            "{} from the configuration file",
                            s(&item["config_certificates"])
                        )
                    });
                format!(
                    "{:<16} {:<22} source={} certs={} crls={}",
                    s(&item["name"]),
                    s(&item["bind"]),
                    s(&item["source"]),
                    certs,
                    item["crls"].as_array().map_or(0, Vec::len)
                )
            } else {
                format!(
                    "{} issuer={} next_update={} revoked={}",
                    s(&item["id"]),
                    s(&item["issuer"]),
                    s(&item["next_update"]),
                    s(&item["revoked"])
                )
            };
            outln!("{line}");
        }
        if items.is_empty() {
            outln!("(none)");
        }
        return;
    }
    match v {
        Value::Null => outln!("ok ({} {})", c.method, c.path),
        Value::Object(o) if o.contains_key("fingerprint_sha256") => outln!(
            "certificate {} subject={} not_after={} sha256={} bound_to={}",
            s(&v["id"]),
            s(&v["subject"]),
            s(&v["not_after"]),
            s(&v["fingerprint_sha256"]),
            s(&v["bound_to"])
        ),
        Value::Object(o) if o.contains_key("pool") => outln!(
            "{} {} state={}",
            s(&v["pool"]),
            s(&v["server"]),
            s(&v["state"])
        ),
        Value::Object(o) if o.contains_key("spki_sha256") => outln!(
            "key {} ({}, {}) uri={} spki_sha256={}",
            s(&v["label"]),
            s(&v["type"]),
            s(&v["origin"]),
            s(&v["uri"]),
            s(&v["spki_sha256"])
        ),
        other => outln!("{status}: {other}"),
    }
}

/// One request; returns the status and the body.
async fn send(args: &CtlArgs, c: &Call) -> Result<(StatusCode, Vec<u8>)> {
    let body = match &c.body {
        Some(v) => Bytes::from(serde_json::to_vec(v)?),
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
