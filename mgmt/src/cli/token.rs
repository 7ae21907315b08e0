//! `tlsgate token …`: offline commands that talk straight to a PKCS#11 module.
//!
//! They are the key ceremony: make a lab token, generate or import keys, list them, export public
//! keys, issue certificates for them from the lab CA, delete them. Private keys never leave the
//! token; the commands only ever print public material.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use tlsgate_keystore::{KeyInfo, KeySpec, PinSource, Pkcs11Uri, Token, TokenSelector};
use zeroize::Zeroizing;

use crate::files;

pub use crate::config::DEFAULT_MODULE;

/// Where to find the token and how to log in.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// PKCS#11 module (shared library) to load.
    #[arg(long, env = "TLSGATE_PKCS11_MODULE", default_value = DEFAULT_MODULE)]
    pub module: PathBuf,
    /// Label of the token to use (never a slot number: slots move).
    #[arg(long, env = "TLSGATE_TOKEN")]
    pub token: String,
    /// Where the user PIN comes from: `env:VAR` or `file:PATH` (mode 0600).
    #[arg(long, env = "TLSGATE_PIN")]
    pub pin: PinSource,
    /// SoftHSM2 configuration file (sets SOFTHSM2_CONF before the module loads).
    #[arg(long, env = "SOFTHSM2_CONF")]
    pub softhsm2_conf: Option<PathBuf>,
}

impl TokenArgs {
    /// Loads the module and logs in to the token.
    pub fn open(&self) -> Result<Arc<Token>> {
        set_softhsm2_conf(self.softhsm2_conf.as_deref());
        Token::open(
            &self.module,
            TokenSelector::Label(self.token.clone()),
            &self.pin,
        )
        .with_context(|| format!("cannot open token {:?}", self.token))
    }
}

/// SoftHSM2 reads `SOFTHSM2_CONF` when the module initialises, so it must be in the environment
/// before the first PKCS#11 call. The CLI is single-threaded at this point.
fn set_softhsm2_conf(conf: Option<&Path>) {
    if let Some(conf) = conf {
        std::env::set_var("SOFTHSM2_CONF", conf);
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a SoftHSM2 lab token in a directory of your choosing, with random PINs in 0600 files.
    InitLab(InitLabArgs),
    /// Generate a key pair on the token (private half sensitive, non-extractable, sign-only).
    Generate(GenerateArgs),
    /// Import a PKCS#8 private key into the token as sensitive and non-extractable.
    Import(ImportArgs),
    /// List the private keys on the token (and, in the table form, its secret keys).
    List(ListArgs),
    /// Export a key's public half as SPKI (PEM or DER).
    ExportPubkey(ExportArgs),
    /// Create a PKCS#10 certificate request signed by a token key.
    Csr(CsrArgs),
    /// Issue a certificate chain for a token key from the lab CA (`tlsgate ca init-lab`).
    IssueCert(IssueArgs),
    /// Delete a key pair (or, with type=secret-key in the URI, a ticket secret) from the token.
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct InitLabArgs {
    /// Directory for the token store, its SoftHSM2 configuration and the PIN files.
    #[arg(long)]
    pub dir: PathBuf,
    /// Token label.
    #[arg(long, default_value = "lab")]
    pub label: String,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub token: TokenArgs,
    /// Key type: ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096, ed25519, or ticket-secret (a
    /// 32-byte HMAC secret from which fleet session-ticket keys are derived).
    #[arg(long = "type")]
    pub key_type: GenerateType,
    /// Label (CKA_LABEL) of the new key pair.
    #[arg(long)]
    pub label: String,
    /// Id (CKA_ID) in hex; random when omitted.
    #[arg(long)]
    pub id: Option<String>,
}

/// What `token generate` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerateType {
    /// A signing key pair.
    Key(KeySpec),
    /// A generic secret for HMAC-SHA256 (sensitive, non-extractable, CKA_SIGN only).
    TicketSecret,
}

impl std::str::FromStr for GenerateType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "ticket-secret" {
            return Ok(GenerateType::TicketSecret);
        }
        s.parse::<KeySpec>()
            .map(GenerateType::Key)
            .map_err(|e| format!("{e}, or ticket-secret"))
    }
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub token: TokenArgs,
    /// PKCS#8 private key in PEM. Its bytes are wiped from memory after the import.
    #[arg(long)]
    pub key_file: PathBuf,
    /// Label (CKA_LABEL) of the imported key.
    #[arg(long)]
    pub label: String,
    /// Id (CKA_ID) in hex; random when omitted.
    #[arg(long)]
    pub id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub token: TokenArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub token: TokenArgs,
    /// The key: a PKCS#11 URI such as `pkcs11:token=lab;object=web-ecdsa;type=private`.
    #[arg(long)]
    pub key: Pkcs11Uri,
    /// Write DER instead of PEM.
    #[arg(long)]
    pub der: bool,
    /// Output file (standard output when omitted).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CsrArgs {
    #[command(flatten)]
    pub token: TokenArgs,
    /// The key: a PKCS#11 URI.
    #[arg(long)]
    pub key: Pkcs11Uri,
    /// Subject common name.
    #[arg(long)]
    pub cn: String,
    /// Subject alternative name (DNS name or IP address); repeat for more.
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// Output file (standard output when omitted).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    #[command(flatten)]
    pub token: TokenArgs,
    /// The key: a PKCS#11 URI.
    #[arg(long)]
    pub key: Pkcs11Uri,
    /// The lab CA directory (made by `tlsgate ca init-lab`).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Subject common name.
    #[arg(long)]
    pub cn: String,
    /// Subject alternative name (DNS name or IP address); repeat for more.
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 90)]
    pub days: u32,
    /// Where to write the chain (leaf, then intermediate) in PEM.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub token: TokenArgs,
    /// The key: a PKCS#11 URI.
    #[arg(long)]
    pub key: Pkcs11Uri,
}

/// Runs one token command.
pub fn run(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::InitLab(args) => init_lab(&args),
        TokenCommand::Generate(args) => {
            let token = args.token.open()?;
            let id = parse_id(args.id.as_deref())?;
            match args.key_type {
                GenerateType::Key(spec) => {
                    let info = token
                        .generate(spec, &args.label, id.as_deref())
                        .with_context(|| format!("cannot generate key {:?}", args.label))?;
                    print_key_made("generated", &info, token.label());
                }
                GenerateType::TicketSecret => {
                    let info = token
                        .generate_hmac_secret(&args.label, id.as_deref())
                        .with_context(|| {
                            format!("cannot generate ticket secret {:?}", args.label)
                        })?;
                    outln!(
                        "generated ticket secret {:?} id {} on token {:?} ({}, {} bytes, \
                         sensitive, non-extractable, sign-only)\n  uri: {}",
                        info.label,
                        hex::encode(&info.id),
                        token.label(),
                        info.key_type,
                        info.value_len.unwrap_or_default(),
                        info.uri(token.label())
                    );
                }
            }
            Ok(())
        }
        TokenCommand::Import(args) => {
            let token = args.token.open()?;
            let id = parse_id(args.id.as_deref())?;
            let der = files::read_pkcs8_pem(&args.key_file)?;
            let info = token
                .import_pkcs8(der, &args.label, id.as_deref())
                .with_context(|| format!("cannot import {}", args.key_file.display()))?;
            print_key_made("imported", &info, token.label());
            Ok(())
        }
        TokenCommand::List(args) => {
            let token = args.token.open()?;
            let keys = token.list().context("cannot list keys")?;
            print_keys(&keys, token.label(), args.json)?;
            if !args.json {
                let secrets = token.list_secrets().context("cannot list secret keys")?;
                print_secrets(&secrets, token.label())?;
            }
            Ok(())
        }
        TokenCommand::ExportPubkey(args) => {
            let token = args.token.open()?;
            let info = token.find(&args.key)?;
            if args.der {
                write_out(args.out.as_deref(), &info.spki_der)
            } else {
                write_out(args.out.as_deref(), info.spki_pem().as_bytes())
            }
        }
        TokenCommand::Csr(args) => {
            let token = args.token.open()?;
            let key = token.rcgen_key(&args.key)?;
            let csr = tlsgate_keystore::csr::create_csr(&key, &args.cn, &args.sans)?;
            write_out(args.out.as_deref(), csr.as_bytes())
        }
        TokenCommand::IssueCert(args) => {
            let token = args.token.open()?;
            let key = token.rcgen_key(&args.key)?;
            let csr = tlsgate_keystore::csr::create_csr(&key, &args.cn, &args.sans)?;
            let ca = tlsgate_keystore::labca::LabCa::load(&args.ca_dir)
                .with_context(|| format!("cannot load the lab CA in {}", args.ca_dir.display()))?;
            let chain = ca.issue_from_csr(&csr, args.days)?;
            files::write_atomic(&args.out, chain.as_bytes(), 0o644)?;
            outln!(
                "issued {} (valid {} days) for {} -> {}",
                args.cn,
                args.days,
                args.key,
                args.out.display()
            );
            Ok(())
        }
        TokenCommand::Delete(args) => {
            let token = args.token.open()?;
            if args.key.object_type == Some(tlsgate_keystore::ObjectType::SecretKey) {
                token.delete_secret(&args.key)?;
            } else {
                token.delete(&args.key)?;
            }
            outln!("deleted {}", args.key);
            Ok(())
        }
    }
}

/// Secret keys (ticket secrets) in the table form of `token list`; never their values.
fn print_secrets(secrets: &[tlsgate_keystore::token::SecretInfo], token: &str) -> Result<()> {
    if secrets.is_empty() {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "\nsecret keys:")?;
    writeln!(
        out,
        "{:<16} {:<16} {:<15} {:<5} {:<9} {:<11} {:<9} URI",
        "LABEL", "ID", "TYPE", "BYTES", "SENSITIVE", "EXTRACTABLE", "SIGN-ONLY"
    )?;
    for s in secrets {
        writeln!(
            out,
            "{:<16} {:<16} {:<15} {:<5} {:<9} {:<11} {:<9} {}",
            s.label,
            hex::encode(&s.id),
            s.key_type,
            s.value_len
                .map_or_else(|| "?".to_owned(), |n| n.to_string()),
            s.sensitive,
            s.extractable,
            s.sign && !s.other_uses,
            s.uri(token)
        )?;
    }
    Ok(())
}

fn parse_id(id: Option<&str>) -> Result<Option<Vec<u8>>> {
    match id {
        None => Ok(None),
        Some(hex_id) => {
            let bytes = hex::decode(hex_id)
                .with_context(|| format!("--id {hex_id:?} is not hex (e.g. --id 01a2)"))?;
            if bytes.is_empty() {
                bail!("--id must not be empty");
            }
            Ok(Some(bytes))
        }
    }
}

fn print_key_made(verb: &str, info: &KeyInfo, token: &str) {
    outln!(
        "{verb} {} key {:?} id {} on token {token:?}\n  uri: {}\n  spki sha256: {}",
        info.kind,
        info.label,
        hex::encode(&info.id),
        info.uri(token),
        info.fingerprint_sha256()
    );
}

/// One listed key, as printed by `token list --json`.
#[derive(Debug, Serialize)]
struct KeyRow {
    label: String,
    id: String,
    kind: String,
    uri: String,
    sensitive: bool,
    extractable: bool,
    always_sensitive: bool,
    never_extractable: bool,
    origin: String,
    spki_sha256: String,
}

fn print_keys(keys: &[KeyInfo], token: &str, json: bool) -> Result<()> {
    let rows: Vec<KeyRow> = keys
        .iter()
        .map(|k| KeyRow {
            label: k.label.clone(),
            id: hex::encode(&k.id),
            kind: k.kind.to_string(),
            uri: k.uri(token).to_string(),
            sensitive: k.sensitive,
            extractable: k.extractable,
            always_sensitive: k.always_sensitive,
            never_extractable: k.never_extractable,
            origin: format!("{:?}", k.origin).to_lowercase(),
            spki_sha256: k.fingerprint_sha256(),
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<16} {:<8} {:<10} {:<9} {:<11} {:<9} {:<64}",
        "LABEL", "ID", "TYPE", "SENSITIVE", "EXTRACTABLE", "ORIGIN", "SPKI SHA-256"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<16} {:<8} {:<10} {:<9} {:<11} {:<9} {:<64}",
            r.label, r.id, r.kind, r.sensitive, r.extractable, r.origin, r.spki_sha256
        )?;
    }
    if rows.is_empty() {
        writeln!(out, "(no private keys on token {token:?})")?;
    }
    Ok(())
}

fn write_out(path: Option<&Path>, bytes: &[u8]) -> Result<()> {
    match path {
        Some(path) => files::write_atomic(path, bytes, 0o644),
        None => {
            std::io::stdout().lock().write_all(bytes)?;
            Ok(())
        }
    }
}

fn init_lab(args: &InitLabArgs) -> Result<()> {
    let dir = &args.dir;
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)
        .with_context(|| format!("cannot create {}", tokens.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let tokens = dir.join("tokens");
    let conf = dir.join("softhsm2.conf");
    files::write_atomic(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        )
        .as_bytes(),
        0o644,
    )?;
    let user_pin = files::random_pin()?;
    let so_pin = files::random_pin()?;
    let user_pin_path = dir.join("user.pin");
    let so_pin_path = dir.join("so.pin");
    files::write_atomic(&user_pin_path, user_pin.as_bytes(), 0o600)?;
    files::write_atomic(&so_pin_path, so_pin.as_bytes(), 0o600)?;
    set_softhsm2_conf(Some(&conf));
    tlsgate_keystore::token::init_token(
        Path::new(DEFAULT_MODULE),
        &args.label,
        &Zeroizing::new(so_pin.to_string()),
        &Zeroizing::new(user_pin.to_string()),
    )
    .with_context(|| format!("cannot initialise token {:?}", args.label))?;
    outln!(
        "lab token {:?} initialised in {}",
        args.label,
        dir.display()
    );
    outln!("  export SOFTHSM2_CONF={}", conf.display());
    outln!("  export TLSGATE_TOKEN={}", args.label);
    outln!("  export TLSGATE_PIN=file:{}", user_pin_path.display());
    Ok(())
}
