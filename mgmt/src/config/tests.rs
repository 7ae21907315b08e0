//! Unit tests of the configuration: parsing, defaults, unknown keys and the cross-field checks.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/tlsgate/tlsgate.toml"))
}

const GOOD: &str = r#"
        [pkcs11]
        token = "lab"
        pin = "env:TLSGATE_PIN"

        [[listener]]
        name = "web"
        bind = "127.0.0.1:8443"
        backend = "127.0.0.1:8080"

        [[listener.certificate]]
        chain = "web.pem"
        key = "pkcs11:token=lab;object=web-ecdsa;type=private"
    "#;

#[test]
fn a_good_file_parses_with_defaults() {
    let c = parse(GOOD).expect("valid");
    assert_eq!(c.listeners.len(), 1);
    assert!(!c.listeners[0].proxy_protocol);
    assert_eq!(
        c.resolve(Path::new("web.pem")),
        Path::new("/etc/tlsgate/web.pem")
    );
    assert!(!c.dataplane().cores.is_empty());
}

#[test]
fn hsm_budget_and_breaker_defaults_and_bad_values() {
    let c = parse(GOOD).expect("valid");
    let p = c.pkcs11.as_ref().expect("[pkcs11]");
    assert_eq!(
        p.breaker_errors,
        tlsgate_keystore::token::DEFAULT_BREAKER_ERRORS
    );
    assert_eq!(
        p.max_inflight,
        tlsgate_keystore::token::DEFAULT_MAX_INFLIGHT
    );
    assert!(!p.start_degraded);
    let with = |lines: &str| {
        GOOD.replace(
            "pin = \"env:TLSGATE_PIN\"",
            &format!("pin = \"env:TLSGATE_PIN\"\n{lines}"),
        )
    };
    for (lines, key) in [
        ("breaker_errors = 0", "pkcs11.breaker_errors"),
        ("max_inflight = 0", "pkcs11.max_inflight"),
        (
            "[[pkcs11.replica]]\ntoken = \"b\"\npin = \"env:P\"\nmax_inflight = 0",
            "pkcs11.replica[0].max_inflight",
        ),
        (
            "start_degraded = true\n[api]\nsocket = \"api.sock\"",
            "pkcs11.start_degraded",
        ),
    ] {
        let err = parse(&with(lines)).expect_err(lines);
        assert!(
            matches!(err, ConfigError::Invalid { key: ref k, .. } if k == key),
            "{lines}: {err}"
        );
    }
    assert!(
        parse(&with("breaker_K = 3")).is_err(),
        "unknown key accepted"
    );
    let c = parse(&with(
        "start_degraded = true\nmax_inflight = 4\nbreaker_errors = 2",
    ))
    .expect("valid");
    let p = c.pkcs11.as_ref().expect("[pkcs11]");
    assert!(p.start_degraded);
    assert_eq!((p.max_inflight, p.breaker_errors), (4, 2));
}

/// A `[dataplane.*]` table without `cores` (TOML makes `[dataplane]` for it) gets every core,
/// as documented, instead of "missing field cores".
#[test]
fn dataplane_sections_without_cores_get_every_core() {
    for extra in [
        "[dataplane.key_ops]\nworkers = 2\n",
        "[dataplane]\nio = \"portable\"\n",
        "[dataplane.limits]\nidle_timeout_ms = 1000\n",
    ] {
        let c = parse(&format!("{GOOD}\n{extra}")).unwrap_or_else(|e| panic!("{extra}: {e}"));
        assert_eq!(
            c.dataplane().cores,
            tlsgate_dataplane::config::all_cores(),
            "{extra}"
        );
    }
}

/// Every default the README's configuration block shows for `[dataplane]`,
/// `[dataplane.limits]` and `[dataplane.key_ops]` is what a file that omits the key gets.
#[test]
fn the_readme_shows_the_true_dataplane_defaults() {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("\n[dataplane]")
        .expect("README shows [dataplane]");
    let end = start
        + readme[start..]
            .find("\n[[listener]]")
            .expect("the block goes on to [[listener]]");
    let mut shown = String::new();
    for line in readme[start..end].lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        // `cores` defaults to every core of the machine the test runs on (tested above).
        if line.is_empty() || line.starts_with("cores") {
            continue;
        }
        shown.push_str(&line.replace("[dataplane.", "[").replace("[dataplane]", ""));
        shown.push('\n');
    }
    assert!(
        shown.lines().count() >= 15,
        "the README block was found:\n{shown}"
    );
    let documented: DataplaneConfig = toml::from_str(&shown).expect("the README block parses");
    let omitted: DataplaneConfig = toml::from_str("").expect("an empty table parses");
    assert_eq!(format!("{documented:?}"), format!("{omitted:?}"));
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let err = parse(&GOOD.replace("backend =", "bakend = \"x\"\n backend =")).expect_err("typo");
    assert!(err.to_string().contains("bakend"), "{err}");
}

#[test]
fn a_token_key_without_pkcs11_section_is_an_error() {
    let text = GOOD.replace(
        "[pkcs11]\n        token = \"lab\"\n        pin = \"env:TLSGATE_PIN\"",
        "",
    );
    let err = parse(&text).expect_err("needs [pkcs11]");
    assert!(
        matches!(err, ConfigError::Invalid { ref key, .. } if key == "pkcs11"),
        "{err}"
    );
}

#[test]
fn a_pin_in_clear_is_refused() {
    let err = parse(&GOOD.replace("env:TLSGATE_PIN", "1234")).expect_err("clear PIN");
    assert!(
        matches!(err, ConfigError::Invalid { ref key, .. } if key == "pkcs11.pin"),
        "{err}"
    );
}

#[test]
fn a_bad_key_reference_names_its_key() {
    let err = parse(&GOOD.replace(
        "pkcs11:token=lab;object=web-ecdsa;type=private",
        "pkcs11:tokn=lab",
    ))
    .expect_err("bad uri");
    assert!(
        matches!(err, ConfigError::Invalid { ref key, .. } if key == "listener[0].certificate[0].key"),
        "{err}"
    );
}

#[test]
fn policy_profiles_parse_and_default_to_intermediate() {
    let c = parse(GOOD).expect("valid");
    assert_eq!(
        c.listeners[0].policy,
        crate::tls::policy::Profile::Intermediate
    );
    for p in ["modern", "strict", "intermediate"] {
        let text = GOOD.replace(
            "backend = \"127.0.0.1:8080\"",
            &format!("backend = \"127.0.0.1:8080\"\npolicy = \"{p}\""),
        );
        let c = parse(&text).expect(p);
        assert_eq!(c.listeners[0].policy.as_str(), p);
    }
    let err = parse(&GOOD.replace(
        "backend = \"127.0.0.1:8080\"",
        "backend = \"127.0.0.1:8080\"\npolicy = \"old\"",
    ))
    .expect_err("unknown profile");
    assert!(err.to_string().contains("intermediate"), "{err}");
}

#[test]
fn a_bad_custom_policy_names_its_key_and_the_allowed_values() {
    let with = |table: &str| {
        format!(
            "{}\n[listener.custom_policy]\n{table}\n",
            GOOD.replace(
                "backend = \"127.0.0.1:8080\"",
                "backend = \"127.0.0.1:8080\"\npolicy = \"custom\"",
            )
        )
    };
    let c = parse(&with("versions = [\"TLSv1.3\"]\ngroups = [\"X25519\"]")).expect("valid");
    assert_eq!(
        c.listeners[0].tls_policy().expect("policy").group_names(),
        ["X25519"]
    );
    let err = parse(&with("versions = [\"TLSv1.1\", \"TLSv1.2\"]")).expect_err("tls 1.1");
    assert!(
        matches!(err, ConfigError::Invalid { ref key, .. } if key == "listener[0].custom_policy"),
        "{err}"
    );
    assert!(err.to_string().contains("RFC 8996"), "{err}");
    let err = parse(&with("versions = [\"TLSv1.2\"]\nsuites = [\"AES128-SHA\"]")).expect_err("cbc");
    assert!(
        err.to_string().contains("allowed: TLS_AES_128_GCM_SHA256"),
        "{err}"
    );
    let err = parse(&with("versions = [\"TLSv1.3\"]\nciphers = []")).expect_err("typo");
    assert!(err.to_string().contains("ciphers"), "{err}");
    let err = parse(&GOOD.replace(
        "backend = \"127.0.0.1:8080\"",
        "backend = \"127.0.0.1:8080\"\npolicy = \"custom\"",
    ))
    .expect_err("custom without table");
    assert!(
        matches!(err, ConfigError::Invalid { ref key, .. } if key == "listener[0].policy"),
        "{err}"
    );
}

#[test]
fn client_auth_modes_parse_and_bad_ones_are_refused() {
    let with = |mode: &str| {
        format!("{GOOD}\n[listener.client_auth]\nmode = \"{mode}\"\nca = \"zone-a.pem\"\ncrls = [\"zone-a.crl\"]\n")
    };
    let c = parse(&with("required")).expect("valid");
    let ca = c.listeners[0].client_auth.as_ref().expect("client_auth");
    assert_eq!(ca.mode, crate::tls::client_auth::ClientAuthMode::Required);
    assert_eq!(ca.crls.len(), 1);
    assert!(parse(&with("optional")).is_ok());
    let err = parse(&with("sometimes")).expect_err("bad mode");
    assert!(err.to_string().contains("required"), "{err}");
}

#[test]
fn session_settings_have_defaults_and_bad_ones_name_their_key() {
    let c = parse(GOOD).expect("valid");
    assert_eq!(
        c.listeners[0].session,
        crate::tls::session::SessionConfig::default()
    );
    let with = |session: &str| {
        parse(&GOOD.replace(
            "[[listener.certificate]]",
            &format!("[listener.session]\n{session}\n[[listener.certificate]]"),
        ))
    };
    let c = with("tickets = false\ncache_size = 0").expect("valid");
    assert!(!c.listeners[0].session.tickets);
    for (session, key) in [
        ("lifetime_secs = 0", "listener[0].session.lifetime_secs"),
        (
            "lifetime_secs = 604801",
            "listener[0].session.lifetime_secs",
        ),
        (
            "ticket_rotation_secs = 1",
            "listener[0].session.ticket_rotation_secs",
        ),
        (
            "fleet_secret = \"pkcs11:token=lab;object=t;type=private\"",
            "listener[0].session.fleet_secret",
        ),
        (
            "fleet_secret = \"file:x\"",
            "listener[0].session.fleet_secret",
        ),
    ] {
        let err = with(session).expect_err(session);
        assert!(
            matches!(err, ConfigError::Invalid { key: ref k, .. } if k == key),
            "{session}: {err}"
        );
    }
    let err = with("tikets = true").expect_err("typo");
    assert!(err.to_string().contains("tikets"), "{err}");
    // A fleet secret needs the token even when every key is in software.
    let text = GOOD
            .replace(
                "[pkcs11]\n        token = \"lab\"\n        pin = \"env:TLSGATE_PIN\"",
                "",
            )
            .replace("pkcs11:token=lab;object=web-ecdsa;type=private", "file:k.pem")
            .replace(
                "[[listener.certificate]]",
                "[listener.session]\nfleet_secret = \"pkcs11:token=lab;object=t\"\n[[listener.certificate]]",
            );
    let err = parse(&text).expect_err("needs [pkcs11]");
    assert!(
        matches!(err, ConfigError::Invalid { ref key, .. } if key == "pkcs11"),
        "{err}"
    );
}

#[test]
fn duplicate_listener_names_are_refused() {
    let twice = format!("{GOOD}\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:9443\"\nbackend = \"127.0.0.1:8080\"\n[[listener.certificate]]\nchain = \"a\"\nkey = \"file:k.pem\"\n");
    let err = parse(&twice).expect_err("duplicate");
    assert!(err.to_string().contains("used twice"), "{err}");
}

/// `[tls] require_fips` in a build without the FIPS module: a start error naming the key and
/// the way out, never a silent start on non-validated cryptography. (The FIPS build's own test
/// is `mgmt/tests/fips.rs`.)
#[cfg(not(feature = "fips"))]
#[test]
fn require_fips_refuses_a_build_without_the_fips_module() {
    let c = parse(GOOD).expect("valid");
    assert!(!c.tls.require_fips, "off by default");
    let text = format!("[tls]\nrequire_fips = true\n{GOOD}");
    match parse(&text) {
        Err(ConfigError::Invalid { key, why, .. }) => {
            assert_eq!(key, "tls.require_fips");
            assert!(why.contains("not a FIPS build"), "{why}");
        }
        other => panic!("expected a tls.require_fips error, got {other:?}"),
    }
    assert!(!crate::policy::fips_active());
}
