//! The audit log of the management API: one JSON object per line, appended and flushed to disk
//! for every operation, successful or not.
//!
//! A line holds the time, the client's identity (`uid:N` on the unix socket, the certificate's
//! subject and SHA-256 fingerprint over HTTPS), the operation, its target and the result (`ok`
//! or the error code); for an API request also the method, the path, the HTTP status and the
//! bytes of the request and answer bodies. Every API request gets exactly one line, whatever its
//! status (an unknown route, a refused peer, a body too large included). It never holds a
//! request body: no PIN, key or secret can reach it.

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

/// Who called the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdentity {
    /// A local process on the unix socket (SO_PEERCRED).
    Uid(u32),
    /// A local process on the unix socket refused by the allowlist (`[api] socket_uids` /
    /// `socket_gids`).
    Peer { uid: u32, gid: u32 },
    /// An HTTPS client, by its certificate.
    Cert {
        subject: String,
        fingerprint_sha256: String,
    },
    /// The process itself, on a signal (`SIGHUP` reload).
    Signal(&'static str),
    /// A task of the process acting on its own (`acme`: issuance, key deletion).
    Internal(&'static str),
}

impl std::fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientIdentity::Uid(uid) => write!(f, "uid:{uid}"),
            ClientIdentity::Peer { uid, gid } => write!(f, "uid:{uid} gid:{gid}"),
            ClientIdentity::Cert {
                subject,
                fingerprint_sha256,
            } => write!(f, "cert:{subject} sha256:{fingerprint_sha256}"),
            ClientIdentity::Signal(name) => write!(f, "signal:{name}"),
            ClientIdentity::Internal(name) => write!(f, "internal:{name}"),
        }
    }
}

#[derive(Debug, Serialize)]
struct Line<'a> {
    time: String,
    client: String,
    operation: &'a str,
    target: &'a str,
    result: &'a str,
    /// In fleet mode: this appliance's member name, so that lines gathered from every member
    /// say which appliance acted.
    #[serde(skip_serializing_if = "Option::is_none")]
    appliance: Option<&'a str>,
    #[serde(flatten)]
    http: Option<&'a HttpRequest>,
}

/// The HTTP side of an API request's audit line.
#[derive(Debug, Clone, Serialize)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Request body bytes (as announced by `content-length`; 0 without one).
    pub bytes_in: u64,
    /// Answer body bytes.
    pub bytes_out: u64,
}

/// The audit log file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
    appliance: Option<String>,
}

impl AuditLog {
    /// Opens `path` for appending (created 0600).
    pub fn open(path: &Path) -> Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("[api] audit_log: cannot open {}", path.display()))?;
        Ok(AuditLog {
            path: path.to_owned(),
            file: Mutex::new(file),
            appliance: None,
        })
    }

    /// Every line names `appliance` (a fleet member) from now on.
    pub fn naming(mut self, appliance: String) -> AuditLog {
        self.appliance = Some(appliance);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line. A failure to write is logged, never hidden.
    pub fn record(&self, client: &ClientIdentity, operation: &str, target: &str, result: &str) {
        self.write(Line {
            time: now_rfc3339(),
            client: client.to_string(),
            operation,
            target,
            result,
            appliance: self.appliance.as_deref(),
            http: None,
        });
    }

    /// Appends the one line of an API request.
    pub fn record_request(
        &self,
        client: &ClientIdentity,
        operation: &str,
        target: &str,
        result: &str,
        http: &HttpRequest,
    ) {
        self.write(Line {
            time: now_rfc3339(),
            client: client.to_string(),
            operation,
            target,
            result,
            appliance: self.appliance.as_deref(),
            http: Some(http),
        });
    }

    fn write(&self, line: Line<'_>) {
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(b) => b,
            Err(err) => {
                tracing::error!(error = %err, "cannot encode an audit line");
                return;
            }
        };
        bytes.push(b'\n');
        let mut file = self.file.lock();
        if let Err(err) = file.write_all(&bytes).and_then(|()| file.sync_data()) {
            tracing::error!(error = %err, path = %self.path.display(), "cannot write the audit log");
        }
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_every_field() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let log = AuditLog::open(&tmp.path().join("audit.log"))?;
        log.record(&ClientIdentity::Uid(7), "certificate.put", "web", "ok");
        log.record(
            &ClientIdentity::Cert {
                subject: "CN=ops".into(),
                fingerprint_sha256: "ab".into(),
            },
            "key.delete",
            "web",
            "key_in_use",
        );
        let text = std::fs::read_to_string(log.path())?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["client"], "uid:7");
        assert_eq!(lines[1]["client"], "cert:CN=ops sha256:ab");
        assert_eq!(lines[1]["result"], "key_in_use");
        assert!(lines[0]["time"].as_str().is_some_and(|t| t.contains('T')));
        assert!(lines[0].get("appliance").is_none(), "{}", lines[0]);
        Ok(())
    }

    #[test]
    fn a_fleet_member_names_itself_in_every_line() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let log = AuditLog::open(&tmp.path().join("audit.log"))?.naming("edge-1".into());
        log.record(&ClientIdentity::Uid(7), "certificate.put", "web", "ok");
        let text = std::fs::read_to_string(log.path())?;
        let line: serde_json::Value = serde_json::from_str(text.trim())?;
        assert_eq!(line["appliance"], "edge-1");
        assert_eq!(line["client"], "uid:7");
        Ok(())
    }
}
