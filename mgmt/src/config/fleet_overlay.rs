//! The fleet's share of the configuration (fleet mode): one TOML document in etcd
//! (`<prefix>/state/config`) that every appliance merges over its own configuration file —
//! backend pools, and per listener its backends, routes and session (ticket) policy. What is
//! local to a box stays in its file: listener addresses, cores, the token, TLS to etcd, paths
//! of its own.
//!
//! ```toml
//! [[backend]]                     # replaces the file's [[backend]] pools, all of them
//! name = "app"
//! servers = ["10.0.1.10:8080", "10.0.1.11:8080"]
//!
//! [[listener]]
//! name = "web"                    # a listener of every appliance's file
//! default_backend = "app"         # replaces that listener's backend / default_backend / routes
//! [[listener.route]]
//! sni = ["api.example.com"]
//! backend = "app"
//! [listener.session]              # replaces that listener's [listener.session] as a whole
//! lifetime_secs = 3600
//! ```
//!
//! The merged text is parsed and checked as a configuration file is ([`super::Config::parse`]):
//! a document that does not make a valid configuration with this appliance's file is refused.

use toml::{Table, Value};

/// What a `[[listener]]` of the fleet configuration may set.
pub const LISTENER_KEYS: &[&str] = &["name", "backend", "default_backend", "route", "session"];

/// The keys of a listener that decide where its traffic goes: set one, and the fleet's replace
/// all three (`backend` and `default_backend` exclude each other).
const ROUTING_KEYS: &[&str] = &["backend", "default_backend", "route"];

/// The configuration file's text with the fleet configuration `fleet` merged over it.
pub fn merge(file: &str, fleet: &str) -> Result<String, String> {
    let mut base: Table = file
        .parse()
        .map_err(|e| format!("the configuration file does not parse: {e}"))?;
    let overlay: Table = fleet.parse().map_err(|e| format!("not TOML: {e}"))?;
    for (key, value) in overlay {
        match key.as_str() {
            "backend" => {
                if !value.is_array() {
                    return Err("`backend` must be [[backend]] tables (pools)".into());
                }
                base.insert(key, value);
            }
            "listener" => merge_listeners(&mut base, &value)?,
            other => {
                return Err(format!(
                    "`{other}`: the fleet configuration holds only [[backend]] pools and \
                     [[listener]] entries (their {})",
                    LISTENER_KEYS[1..].join(", ")
                ))
            }
        }
    }
    toml::to_string(&base).map_err(|e| format!("cannot write the merged configuration: {e}"))
}

fn merge_listeners(base: &mut Table, value: &Value) -> Result<(), String> {
    let list = value
        .as_array()
        .ok_or("`listener` must be [[listener]] tables")?;
    let locals = base
        .get_mut("listener")
        .and_then(Value::as_array_mut)
        .ok_or("this appliance's configuration file has no [[listener]]")?;
    for (i, l) in list.iter().enumerate() {
        let fleet = l
            .as_table()
            .ok_or_else(|| format!("listener[{i}]: not a table"))?;
        let name = fleet
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("listener[{i}]: `name` is required"))?;
        if let Some(k) = fleet.keys().find(|k| !LISTENER_KEYS.contains(&k.as_str())) {
            return Err(format!(
                "listener[{i}] ({name}): `{k}` is local to each appliance's configuration file; \
                 the fleet configuration sets only {}",
                LISTENER_KEYS[1..].join(", ")
            ));
        }
        let local = locals
            .iter_mut()
            .filter_map(Value::as_table_mut)
            .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            .ok_or_else(|| {
                format!(
                    "listener[{i}]: no listener {name:?} in this appliance's configuration file"
                )
            })?;
        if ROUTING_KEYS.iter().any(|k| fleet.contains_key(*k)) {
            for k in ROUTING_KEYS {
                local.remove(*k);
            }
        }
        for (k, v) in fleet.iter().filter(|(k, _)| k.as_str() != "name") {
            local.insert(k.clone(), v.clone());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[listener]]
name = "web"
bind = "127.0.0.1:8443"
backend = "127.0.0.1:8080"

[listener.session]
lifetime_secs = 100
"#;

    #[test]
    fn pools_routes_and_session_replace_the_files_and_local_keys_are_refused() {
        let fleet = r#"
[[backend]]
name = "app"
servers = ["127.0.0.1:9000"]

[[listener]]
name = "web"
default_backend = "app"
[listener.session]
lifetime_secs = 3600
"#;
        let merged: Table = merge(FILE, fleet).expect("merges").parse().expect("TOML");
        let web = &merged["listener"][0];
        assert_eq!(
            web["bind"].as_str(),
            Some("127.0.0.1:8443"),
            "local keys stay"
        );
        assert!(
            web.get("backend").is_none(),
            "the fleet's routing replaces the file's"
        );
        assert_eq!(web["default_backend"].as_str(), Some("app"));
        assert_eq!(web["session"]["lifetime_secs"].as_integer(), Some(3600));
        assert_eq!(merged["backend"][0]["name"].as_str(), Some("app"));

        for (bad, why) in [
            (
                "[[listener]]\nname = \"web\"\nbind = \"0.0.0.0:1\"\n",
                "`bind` is local",
            ),
            ("[[listener]]\nname = \"api\"\n", "no listener \"api\""),
            (
                "[[listener]]\nbackend = \"127.0.0.1:1\"\n",
                "`name` is required",
            ),
            ("[pkcs11]\ntoken = \"x\"\n", "`pkcs11`"),
            ("backend = \"x\"\n", "[[backend]] tables"),
            ("[[listener\n", "not TOML"),
        ] {
            let err = merge(FILE, bad).expect_err(bad);
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
