//! What Landlock allows this configuration (see [`crate::sandbox`]): the files and
//! directories it names, the state directory, the PKCS#11 module's paths and the TCP ports.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::Config;
use crate::sandbox::Plan;

/// Read-only files and directories every process needs (absent ones are skipped).
const SYSTEM_READ: &[&str] = &[
    "/usr/lib",
    "/lib",
    "/lib64",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/dev/urandom",
];

/// SoftHSM2's configuration when `SOFTHSM2_CONF` is not set.
const SOFTHSM2_DEFAULT_CONF: &str = "/etc/softhsm/softhsm2.conf";

/// The plan for `config`.
pub fn plan(config: &Config) -> Result<Plan> {
    let mut plan = Plan::default();
    let dir_of = |p: &Path| -> PathBuf {
        match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        }
    };
    // The file's own path is as given on the command line; the paths in it are relative
    // to its directory.
    plan.read.insert(config.base_dir.clone());
    for file in named_files(config)? {
        plan.read.insert(dir_of(&config.resolve(&file)));
    }
    plan.read.extend(SYSTEM_READ.iter().map(PathBuf::from));
    if let Some(dir) = super::management::state_dir(config) {
        plan.write.insert(dir);
    }
    if let Some(api) = &config.api {
        if let Some(log) = &api.audit_log {
            plan.write.insert(config.resolve(log));
        }
        if let Some(socket) = &api.socket {
            plan.remove.insert(dir_of(&config.resolve(socket)));
        }
    }
    match &config.process.landlock_paths {
        Some(paths) => plan.write.extend(paths.iter().map(|p| config.resolve(p))),
        None => plan.write.extend(module_defaults(config)),
    }
    plan.ports = config.tcp_bind_ports();
    Ok(plan)
}

/// Every file the configuration names that the process reads after start-up.
fn named_files(config: &Config) -> Result<Vec<PathBuf>> {
    use tlsgate_keystore::{KeyRef, PinSource};
    let mut files: Vec<PathBuf> = Vec::new();
    let mut key = |k: &str| {
        if let Ok(KeyRef::File(p)) = k.parse::<KeyRef>() {
            files.push(p);
        }
    };
    for l in &config.listeners {
        for c in &l.certificates {
            key(&c.key);
        }
        if let Some(bt) = &l.backend_tls {
            if let Some(k) = &bt.key {
                key(k);
            }
        }
    }
    for p in &config.pools {
        if let Some(k) = p.backend_tls.as_ref().and_then(|bt| bt.key.as_ref()) {
            key(k);
        }
    }
    if let Some(k) = config.api.as_ref().and_then(|a| a.key.as_ref()) {
        key(k);
    }
    for l in &config.listeners {
        for c in &l.certificates {
            files.push(c.chain.clone());
            files.extend(c.ocsp.clone());
        }
        if let Some(ca) = &l.client_auth {
            files.push(ca.ca.clone());
            files.extend(ca.crls.iter().cloned());
        }
        if let Some(bt) = &l.backend_tls {
            files.push(bt.ca.clone());
            files.extend(bt.chain.clone());
        }
    }
    for p in &config.pools {
        if let Some(bt) = &p.backend_tls {
            files.push(bt.ca.clone());
            files.extend(bt.chain.clone());
        }
    }
    if let Some(api) = &config.api {
        files.extend(api.cert.clone());
        files.extend(api.client_ca.clone());
    }
    for a in &config.acme {
        files.extend(a.directory_ca.clone());
        if let Some(Ok(PinSource::File(k))) =
            a.eab.as_ref().map(|e| e.hmac_key.parse::<PinSource>())
        {
            files.push(k);
        }
    }
    if let Some(p11) = &config.pkcs11 {
        files.push(p11.module.clone());
        if let Some(PinSource::File(pin)) = config.pin_source()? {
            files.push(pin);
        }
        for r in &p11.replica {
            files.push(r.module.clone());
            if let Ok(PinSource::File(pin)) = r.pin.parse::<PinSource>() {
                files.push(pin);
            }
        }
    }
    Ok(files)
}

/// `[process] landlock_paths` when not set: for a SoftHSM2 module (or `SOFTHSM2_CONF` set),
/// its configuration file and the token directory it names.
fn module_defaults(config: &Config) -> Vec<PathBuf> {
    let Some(p11) = &config.pkcs11 else {
        return Vec::new();
    };
    let mut modules = std::iter::once(&p11.module).chain(p11.replica.iter().map(|r| &r.module));
    let set = std::env::var_os("SOFTHSM2_CONF");
    // `SOFTHSM2_CONF` in the environment also counts: a module that wraps SoftHSM2 (p11-kit,
    // a test shim) loads it under another name.
    if set.is_none() && !modules.any(|m| m.to_string_lossy().contains("softhsm")) {
        return Vec::new();
    }
    let conf = set
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SOFTHSM2_DEFAULT_CONF));
    let mut paths = vec![conf.clone()];
    if let Some(dir) = std::fs::read_to_string(&conf)
        .ok()
        .as_deref()
        .and_then(softhsm2_token_dir)
    {
        paths.push(dir);
    }
    paths
}

/// `directories.tokendir` of a SoftHSM2 configuration.
fn softhsm2_token_dir(conf: &str) -> Option<PathBuf> {
    conf.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "directories.tokendir")
        .map(|(_, v)| PathBuf::from(v.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn softhsm2_token_dir_is_read_from_its_configuration() {
        let conf = "# comment\ndirectories.tokendir = /var/lib/softhsm/tokens/\nobjectstore.backend = file\n";
        assert_eq!(
            softhsm2_token_dir(conf),
            Some(PathBuf::from("/var/lib/softhsm/tokens/"))
        );
        assert_eq!(softhsm2_token_dir("#directories.tokendir = /x\n"), None);
    }

    #[test]
    fn the_plan_holds_the_files_directories_and_ports_the_configuration_names() {
        let text = r#"
            [process]
            landlock_paths = ["/var/lib/hsm", "tokens"]
            [pkcs11]
            module = "/opt/hsm/lib/libhsm.so"
            token = "lab"
            pin = "file:/etc/tlsgate/secrets/pin"
            [metrics]
            listen = "127.0.0.1:9100"
            [api]
            socket = "/run/tlsgate/api.sock"
            listen = "127.0.0.1:9443"
            cert = "api/api.pem"
            key = "file:api/api.key"
            client_ca = "/etc/mgmt-ca/root.pem"
            [state]
            dir = "/var/lib/tlsgate"
            [[listener]]
            name = "web"
            bind = "0.0.0.0:443"
            backend = "127.0.0.1:8080"
            [[listener.certificate]]
            chain = "/etc/certs/web.pem"
            key = "pkcs11:token=lab;object=web;type=private"
        "#;
        let config = Config::parse(text, Path::new("/etc/tlsgate/tlsgate.toml")).expect("valid");
        let plan = plan(&config).expect("plan");
        assert_eq!(plan.ports, BTreeSet::from([443, 9100, 9443]));
        for dir in [
            "/etc/tlsgate",
            "/etc/tlsgate/secrets",
            "/etc/tlsgate/api",
            "/etc/mgmt-ca",
            "/etc/certs",
            "/opt/hsm/lib",
            "/usr/lib",
        ] {
            assert!(plan.read.contains(Path::new(dir)), "{dir} not readable");
        }
        assert_eq!(
            plan.write,
            BTreeSet::from([
                PathBuf::from("/var/lib/tlsgate"),
                PathBuf::from("/var/lib/hsm"),
                PathBuf::from("/etc/tlsgate/tokens"),
            ])
        );
        assert_eq!(plan.remove, BTreeSet::from([PathBuf::from("/run/tlsgate")]));
    }
}
