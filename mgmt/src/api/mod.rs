//! The management API: keys, CSRs, certificates, bindings, CRLs and reload over JSON/HTTP
//! (`/v1/…`), on a unix socket (client = peer uid) and/or HTTPS with client certificates from
//! the management CA. Never on a data-plane listener.
//!
//! ```toml
//! [api]
//! socket = "/run/tlsgate/api.sock"    # unix socket; mode below, client identity = peer uid
//! socket_mode = 0o600                 # 0o600 or 0o660 (group operators); never for others
//! listen = "10.0.0.5:9443"            # HTTPS; needs cert, key and client_ca
//! cert = "mgmt/api-chain.pem"         # the API's own chain (leaf first)
//! key = "file:mgmt/api-key.pem"       # or a pkcs11: URI
//! client_ca = "mgmt/ops-ca.pem"       # clients must present a certificate issued by this CA
//! audit_log = "/var/log/tlsgate/audit.log"   # default: <state dir>/audit.log
//!
//! [state]
//! dir = "/var/lib/tlsgate"            # default
//! ```

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tlsgate_dataplane::Snapshot;

use crate::config::Config;

pub mod access;
pub mod backends;
mod closing;
pub mod error;
pub mod manager;
pub mod openapi;
pub mod routes;
pub mod secret_body;
pub mod server;
pub mod wire;

pub use manager::{FleetStore, Manager, Publisher};
// `[api]` and `[state]` are parsed and checked with the rest of the configuration.
pub use crate::config::management::{
    state_dir, validate, ApiConfig, StateConfig, DEFAULT_SOCKET_MODE, DEFAULT_STATE_DIR,
};

/// Who may talk on the unix socket, checked with SO_PEERCRED on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAllowlist {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl PeerAllowlist {
    /// From `[api]`, with the defaults: uid 0 and our own uid; our own (effective) gid.
    pub fn from_config(api: &ApiConfig) -> PeerAllowlist {
        let own_uid = rustix::process::geteuid().as_raw();
        let own_gid = rustix::process::getegid().as_raw();
        let mut default_uids = vec![0, own_uid];
        default_uids.dedup();
        PeerAllowlist {
            uids: api.socket_uids.clone().unwrap_or(default_uids),
            gids: api.socket_gids.clone().unwrap_or_else(|| vec![own_gid]),
        }
    }

    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// Opens the state directory and the audit log and builds the first snapshot.
pub fn start_manager(
    config: Config,
    builder: Arc<crate::snapshot::Builder>,
    publish: Publisher,
    prefetch: &dyn Fn() -> bool,
) -> Result<(Manager, Snapshot)> {
    let dir = state_dir(&config).context("no [state] or [api] section")?;
    let store = crate::state::StateStore::open(&dir)?;
    let audit_path = config
        .api
        .as_ref()
        .and_then(|a| a.audit_log.as_deref())
        .map(|p| config.resolve(p))
        .unwrap_or_else(|| dir.join("audit.log"));
    let mut audit = crate::audit::AuditLog::open(&audit_path)?;
    if let Some(fleet) = &config.fleet {
        audit = audit.naming(fleet.member_name());
    }
    tracing::info!(state_dir = %dir.display(), audit_log = %audit_path.display(), "management state");
    Manager::start(config, builder, store, audit, publish, prefetch)
}

/// Binds the API socket, setting its mode before anyone can connect: the socket is bound under a
/// temporary name and renamed into place once its mode is set. What is at `path` already is
/// replaced only when it is a stale socket (nobody answers a connect); a live socket (another
/// process serves it) or anything that is not a socket is a start error, and stays as it is.
pub fn bind_unix(path: &Path, mode: u32) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("[api] socket: cannot inspect {}", path.display()))
        }
        Ok(m) if !m.file_type().is_socket() => bail!(
            "[api] socket: {} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "[api] socket: another process answers on {}; refusing to take it over",
                    path.display()
                );
            }
            // A socket nobody answers on: left by a process that ended. The rename below
            // replaces it.
        }
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("[api] socket: {} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)
        .with_context(|| format!("[api] socket: cannot bind {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("[api] socket: cannot set the mode of {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("[api] socket: cannot move it to {}", path.display()))?;
    Ok(listener)
}

pub use crate::tls::no_certificate_config;
