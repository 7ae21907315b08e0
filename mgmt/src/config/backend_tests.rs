//! Pools and routes in the configuration: what parses, and every bad input named by its key.

use std::path::Path;

use crate::config::{Config, ConfigError};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/tlsgate/tlsgate.toml"))
}

/// A listener with pools `web` and `api`, then `extra` (more TOML) appended.
fn with(listener_extra: &str, pools_extra: &str) -> String {
    format!(
        r#"
        [[backend]]
        name = "web"
        servers = [{{ address = "127.0.0.1:8081" }}, {{ address = "127.0.0.1:8082", weight = 2 }}]
        alpn = ["h2", "http/1.1"]

        [[backend]]
        name = "api"
        servers = [{{ address = "127.0.0.1:8083" }}]
        {pools_extra}

        [[listener]]
        name = "edge"
        bind = "127.0.0.1:8443"
        default_backend = "web"
        {listener_extra}

        [[listener.certificate]]
        chain = "web.pem"
        key = "file:web.key"
        "#
    )
}

fn err_key(text: &str) -> (String, String) {
    match parse(text) {
        Err(ConfigError::Invalid { key, why, .. }) => (key, why),
        Err(e) => panic!("expected an invalid key, got {e}"),
        Ok(_) => panic!("expected an error for:\n{text}"),
    }
}

#[test]
fn pools_and_routes_parse_with_defaults() {
    let c = parse(&with(
        r#"
        [[listener.route]]
        sni = "api.example.com"
        backend = "api"
        [[listener.route]]
        sni = "*.example.com"
        alpn = "h2"
        backend = "web"
        "#,
        "",
    ))
    .expect("valid");
    assert_eq!(c.pools.len(), 2);
    assert_eq!(c.pools[0].servers[0].weight, 1);
    assert_eq!(c.pools[0].retries, super::DEFAULT_RETRIES);
    assert!(c.pools[0].alpn_required);
    assert_eq!(c.listeners[0].routes.len(), 2);
    assert!(c.listeners[0].backend.is_none());
}

#[test]
fn the_plain_backend_address_stays_valid() {
    let text = r#"
        [[listener]]
        name = "web"
        bind = "127.0.0.1:8443"
        backend = "127.0.0.1:8080"
        proxy_protocol = true
        [[listener.certificate]]
        chain = "web.pem"
        key = "file:web.key"
    "#;
    let c = parse(text).expect("valid");
    assert_eq!(
        c.listeners[0].backend,
        Some("127.0.0.1:8080".parse().expect("literal"))
    );
}

#[test]
fn a_route_to_an_unknown_pool_names_the_key() {
    let (key, why) = err_key(&with(
        "[[listener.route]]\nsni = \"a.test\"\nbackend = \"nope\"",
        "",
    ));
    assert_eq!(key, "listener[0].route[0].backend");
    assert!(why.contains("nope"), "{why}");
    let (key, _) =
        err_key(&with("", "").replace("default_backend = \"web\"", "default_backend = \"gone\""));
    assert_eq!(key, "listener[0].default_backend");
}

#[test]
fn the_same_sni_in_two_routes_names_the_key() {
    let routes = "[[listener.route]]\nsni = \"a.test\"\nbackend = \"api\"\n[[listener.route]]\nsni = \"A.test.\"\nbackend = \"web\"";
    let (key, why) = err_key(&with(routes, ""));
    assert_eq!(key, "listener[0].route[1].sni");
    assert!(why.contains("a.test"), "{why}");
    // The same name for another protocol is a different route.
    let routes = "[[listener.route]]\nsni = \"a.test\"\nbackend = \"api\"\n[[listener.route]]\nsni = \"a.test\"\nalpn = \"h2\"\nbackend = \"web\"";
    parse(&with(routes, "")).expect("valid");
}

#[test]
fn a_pool_without_servers_names_the_key() {
    let text = with("", "").replace(
        "servers = [{ address = \"127.0.0.1:8083\" }]",
        "servers = []",
    );
    let (key, _) = err_key(&text);
    assert_eq!(key, "backend[1].servers");
}

#[test]
fn an_alpn_id_longer_than_255_bytes_names_the_key() {
    let long = "x".repeat(256);
    let (key, why) = err_key(&with("", &format!("alpn = [\"h2\", \"{long}\"]")));
    assert_eq!(key, "backend[1].alpn[1]");
    assert!(why.contains("256"), "{why}");
    let (key, _) = err_key(&with(
        &format!("[[listener.route]]\nalpn = \"{long}\"\nbackend = \"api\""),
        "",
    ));
    assert_eq!(key, "listener[0].route[0].alpn");
    parse(&with("", &format!("alpn = [\"{}\"]", "x".repeat(255))))
        .expect("255 bytes is the most, and allowed");
}

#[test]
fn weights_of_zero_everywhere_name_the_key() {
    let text = with("", "").replace(
        "servers = [{ address = \"127.0.0.1:8083\" }]",
        "servers = [{ address = \"127.0.0.1:8083\", weight = 0 }, { address = \"127.0.0.1:8084\", weight = 0 }]",
    );
    let (key, why) = err_key(&text);
    assert_eq!(key, "backend[1].servers");
    assert!(why.contains("weight"), "{why}");
}

#[test]
fn a_health_check_path_without_a_slash_names_the_key() {
    let check = "[backend.health_check]\nkind = \"http\"\npath = \"health\"";
    let (key, why) = err_key(&with("", check));
    assert_eq!(key, "backend[1].health_check.path");
    assert!(why.contains('/'), "{why}");
    parse(&with(
        "",
        "[backend.health_check]\nkind = \"http\"\npath = \"/health\"",
    ))
    .expect("valid");
    let (key, _) = err_key(&with("", "[backend.health_check]\nkind = \"tls\""));
    assert_eq!(
        key, "backend[1].health_check.kind",
        "tls checks need backend_tls"
    );
    let (key, _) = err_key(&with(
        "",
        "[backend.health_check]\nkind = \"tcp\"\nrise = 0",
    ));
    assert_eq!(key, "backend[1].health_check.rise");
}

#[test]
fn backend_and_pools_and_listener_wide_settings_do_not_mix() {
    let (key, _) = err_key(&with("backend = \"127.0.0.1:9\"", ""));
    assert_eq!(key, "listener[0].default_backend");
    let (key, _) = err_key(&with("proxy_protocol = true", ""));
    assert_eq!(key, "listener[0].proxy_protocol");
    let none = with("", "").replace("default_backend = \"web\"", "");
    let (key, _) = err_key(&none);
    assert_eq!(key, "listener[0].backend");
    let (key, _) = err_key(&with("", "").replace("name = \"api\"", "name = \"web\""));
    assert_eq!(key, "backend[1].name");
    let (key, _) = err_key(&with(
        "[[listener.route]]\nsni = \"a.*.test\"\nbackend = \"api\"",
        "",
    ));
    assert_eq!(key, "listener[0].route[0].sni");
}
