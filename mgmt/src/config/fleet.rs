//! `[fleet]`: the etcd cluster that holds the desired state several appliances share (see
//! [`crate::fleet`]).
//!
//! ```toml
//! [fleet]
//! endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]
//! prefix = "/tlsgate/prod"          # default "/tlsgate"
//! name = "edge-1"                   # default: the host name
//! ca = "/etc/tlsgate/etcd-ca.pem"   # TLS to etcd: the CA that signed etcd's certificates
//! cert = "/etc/tlsgate/etcd-client.pem"
//! key = "/etc/tlsgate/etcd-client.key"  # a 0600 file
//! ```

use std::path::PathBuf;

use serde::Deserialize;

/// `[fleet]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// etcd client URLs (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// Every key of this fleet lives under it.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This appliance's member name (its key under `<prefix>/members/`); the host name when
    /// absent.
    pub name: Option<String>,
    /// PEM file of the CA that signed etcd's server certificates.
    pub ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` (a file only the service user reads).
    pub key: Option<PathBuf>,
    /// How long a member key outlives a silent appliance (etcd lease TTL, seconds).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_s: i64,
}

fn default_prefix() -> String {
    "/tlsgate".to_owned()
}

fn default_lease_ttl() -> i64 {
    10
}

impl FleetConfig {
    /// The member name: `name`, else the host name.
    pub fn member_name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "tlsgate".to_owned()),
        }
    }

    /// The prefix without a trailing `/`.
    pub fn prefix(&self) -> &str {
        self.prefix.trim_end_matches('/')
    }
}

/// Checks `[fleet]`: `(key, why)` on the first problem.
pub fn check(fleet: &FleetConfig, has_state_dir: bool) -> Result<(), (&'static str, String)> {
    if fleet.endpoints.is_empty() {
        return Err((
            "fleet.endpoints",
            "list at least one etcd client URL, e.g. [\"http://127.0.0.1:2379\"]".into(),
        ));
    }
    for e in &fleet.endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err((
                "fleet.endpoints",
                format!("{e:?}: an etcd client URL starts with http:// or https://"),
            ));
        }
    }
    let tls = fleet.endpoints.iter().any(|e| e.starts_with("https://"));
    if !tls && (fleet.ca.is_some() || fleet.cert.is_some()) {
        return Err((
            "fleet.ca",
            "TLS files are set but no endpoint is https://".into(),
        ));
    }
    if fleet.cert.is_some() != fleet.key.is_some() {
        return Err((
            "fleet.cert",
            "a client certificate needs its key (set both cert and key, or neither)".into(),
        ));
    }
    let prefix = fleet.prefix();
    if !prefix.starts_with('/') || prefix.len() < 2 || prefix.contains("//") {
        return Err((
            "fleet.prefix",
            format!(
                "{:?}: use an absolute key prefix such as \"/tlsgate\"",
                fleet.prefix
            ),
        ));
    }
    crate::state::check_name("fleet member name", &fleet.member_name())
        .map_err(|e| ("fleet.name", format!("{e:#}")))?;
    if !(2..=3600).contains(&fleet.lease_ttl_s) {
        return Err(("fleet.lease_ttl_s", "use 2 to 3600 seconds".into()));
    }
    if !has_state_dir {
        return Err((
            "fleet",
            "fleet mode caches the last applied state in the state directory: set [state] dir"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(toml_text: &str) -> FleetConfig {
        toml::from_str(toml_text).expect("parses")
    }

    #[test]
    fn a_plain_fleet_section_passes() {
        let f = fleet("endpoints = [\"http://127.0.0.1:2379\"]\nname = \"a\"");
        assert_eq!(f.prefix(), "/tlsgate");
        assert!(check(&f, true).is_ok());
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("endpoints = []", true, "fleet.endpoints"),
            ("endpoints = [\"127.0.0.1:2379\"]", true, "fleet.endpoints"),
            ("endpoints = [\"http://a:1\"]\nca = \"x\"", true, "fleet.ca"),
            (
                "endpoints = [\"https://a:1\"]\ncert = \"x\"",
                true,
                "fleet.cert",
            ),
            (
                "endpoints = [\"http://a:1\"]\nprefix = \"tls\"",
                true,
                "fleet.prefix",
            ),
            (
                "endpoints = [\"http://a:1\"]\nname = \"a/b\"",
                true,
                "fleet.name",
            ),
            ("endpoints = [\"http://a:1\"]\nname = \"a\"", false, "fleet"),
        ];
        for (text, state, key) in cases {
            let err = check(&fleet(text), state).expect_err(text);
            assert_eq!(err.0, key, "{text}: {}", err.1);
        }
    }
}
