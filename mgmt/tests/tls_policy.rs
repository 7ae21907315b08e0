//! TLS policy profiles, certificate choice by SNI and client capability, and unknown-SNI refusal,
//! proven against the real `tlsgate` binary with real clients: `openssl s_client`, `gnutls-cli`,
//! and (for X25519MLKEM768, which Debian 12's OpenSSL 3.0 and GnuTLS 3.7 lack) a rustls client.

mod common;

use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::policy_support::{
    lab_cert, log_lines, metrics_addr, negotiated_cipher, run_cmd, s_client, wait_closed_reason,
    wait_log,
};
use common::{demo_backend, fail, tlsgate, uri, Lab, Serve};
use rustls::pki_types::pem::PemObject;

/// Every suite this product knows: (OpenSSL name, IANA name, TLS 1.3?).
const ALL_SUITES: &[(&str, &str, bool)] = &[
    ("TLS_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256", true),
    ("TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384", true),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256",
        true,
    ),
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        false,
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        false,
    ),
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        false,
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        false,
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        false,
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        false,
    ),
];

/// What each listener of the profile server must allow (the README's profile table).
struct Expect {
    listener: &'static str,
    tls12: bool,
    tls13: bool,
    /// OpenSSL names of the suites that must negotiate; every other one must fail.
    suites: &'static [&'static str],
    /// OpenSSL group names that must negotiate (X25519MLKEM768 is checked with rustls).
    groups: &'static [&'static str],
    pq: bool,
}

const EXPECT: &[Expect] = &[
    Expect {
        listener: "intermediate",
        tls12: true,
        tls13: true,
        suites: &[
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "ECDHE-RSA-CHACHA20-POLY1305",
        ],
        groups: &["X25519", "P-256", "P-384"],
        pq: true,
    },
    Expect {
        listener: "modern",
        tls12: false,
        tls13: true,
        suites: &[
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
        ],
        groups: &["X25519", "P-256", "P-384"],
        pq: true,
    },
    Expect {
        listener: "strict",
        tls12: true,
        tls13: true,
        suites: &["TLS_AES_256_GCM_SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384"],
        groups: &["X25519", "P-256", "P-384"],
        pq: true,
    },
    Expect {
        listener: "custom",
        tls12: true,
        tls13: false,
        suites: &[
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
        ],
        groups: &["P-384"],
        pq: false,
    },
];

struct ProfileServer {
    lab: Lab,
    _backend: common::ChildGuard,
    serve: Serve,
    ports: Vec<(String, u16)>,
}

impl ProfileServer {
    fn port(&self, listener: &str) -> u16 {
        self.ports
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, p)| *p)
            .unwrap_or(0)
    }
}

/// One `tlsgate serve` with a listener per profile: intermediate serves an ECDSA (token) and an
/// RSA (software) certificate for the same name, the others an ECDSA certificate.
fn profile_server() -> Result<ProfileServer> {
    let lab = Lab::new()?;
    let ecdsa_chain = lab.token_key_with_chain("ec-p256", "tok-ecdsa")?;
    let (rsa_key, rsa_chain) = lab_cert(&lab, "RSA", "sw-rsa", "localhost", &["localhost"])?;
    let (ec_key, ec_chain) = lab_cert(&lab, "EC", "sw-ec", "localhost", &["localhost"])?;
    let (backend, backend_addr) = demo_backend(lab.dir.path())?;
    let tok = |chain: &Path| {
        format!(
            "[[listener.certificate]]\nchain = \"{}\"\nkey = \"{}\"\n",
            chain.display(),
            uri("tok-ecdsa")
        )
    };
    let sw = |chain: &Path, key: &Path| {
        format!(
            "[[listener.certificate]]\nchain = \"{}\"\nkey = \"file:{}\"\n",
            chain.display(),
            key.display()
        )
    };
    let mut toml = format!(
        "[pkcs11]\ntoken = \"lab\"\npin = \"file:{}\"\n\n[dataplane]\ncores = [0]\nio = \"portable\"\n",
        lab.p("token/user.pin")
    );
    let head = |name: &str, policy: &str| {
        format!("\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend_addr}\"\npolicy = \"{policy}\"\n")
    };
    toml += &head("intermediate", "intermediate");
    toml += &tok(&ecdsa_chain);
    toml += &sw(&rsa_chain, &rsa_key);
    toml += &head("modern", "modern");
    toml += &sw(&ec_chain, &ec_key);
    toml += &head("strict", "strict");
    toml += &tok(&ecdsa_chain);
    toml += &head("custom", "custom");
    toml += &sw(&ec_chain, &ec_key);
    toml += "[listener.custom_policy]\nversions = [\"TLSv1.2\"]\nsuites = [\"ECDHE-ECDSA-CHACHA20-POLY1305\", \"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]\ngroups = [\"P-384\"]\n";
    let config = lab.path("profiles.toml");
    std::fs::write(&config, toml)?;
    let serve = Serve::start(&lab, &config)?;
    let ports = ready_ports(&config)?;
    Ok(ProfileServer {
        lab,
        _backend: backend,
        serve,
        ports,
    })
}

fn ready_ports(config: &Path) -> Result<Vec<(String, u16)>> {
    let text = std::fs::read_to_string(config.with_extension("ready"))?;
    text.lines()
        .map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next().context("name")?.to_owned();
            let port = it
                .next()
                .and_then(|a| a.rsplit(':').next())
                .context("addr")?
                .parse()?;
            Ok((name, port))
        })
        .collect()
}

#[test]
fn each_profile_negotiates_exactly_its_suites_and_groups_with_openssl() -> Result<()> {
    let srv = profile_server()?;
    let mut failures = String::new();
    for e in EXPECT {
        let port = srv.port(e.listener);
        for (openssl, _, tls13) in ALL_SUITES {
            let args: Vec<&str> = if *tls13 {
                vec![
                    "-servername",
                    "localhost",
                    "-tls1_3",
                    "-ciphersuites",
                    openssl,
                ]
            } else {
                vec!["-servername", "localhost", "-tls1_2", "-cipher", openssl]
            };
            let r = s_client(port, &args)?;
            let got = negotiated_cipher(&r.text);
            let want = e.suites.contains(openssl);
            if want && got.as_deref() != Some(*openssl) {
                writeln!(
                    failures,
                    "{}: {openssl} should negotiate, got {got:?}",
                    e.listener
                )?;
            }
            if !want && got.is_some() {
                writeln!(
                    failures,
                    "{}: {openssl} must be refused, got {got:?}",
                    e.listener
                )?;
            }
        }
        for (flag, enabled) in [("-tls1_2", e.tls12), ("-tls1_3", e.tls13)] {
            let r = s_client(port, &["-servername", "localhost", flag])?;
            if negotiated_cipher(&r.text).is_some() != enabled {
                writeln!(
                    failures,
                    "{}: {flag} enabled={enabled} but s_client says:\n{}",
                    e.listener, r.text
                )?;
            }
            if !enabled && !r.text.contains("protocol version") {
                writeln!(
                    failures,
                    "{}: {flag} refusal should be a protocol_version alert:\n{}",
                    e.listener, r.text
                )?;
            }
        }
        // rustls answers a TLS 1.0/1.1-only ClientHello with a fatal alert (handshake_failure:
        // no version in common); nothing is negotiated.
        for old in ["-tls1", "-tls1_1"] {
            let r = s_client(
                port,
                &[
                    "-servername",
                    "localhost",
                    old,
                    "-cipher",
                    "DEFAULT@SECLEVEL=0",
                ],
            )?;
            if negotiated_cipher(&r.text).is_some() || !r.text.contains("SSL alert number") {
                writeln!(
                    failures,
                    "{}: {old} must end with an alert:\n{}",
                    e.listener, r.text
                )?;
            }
        }
        for group in ["X25519", "P-256", "P-384", "P-521", "ffdhe2048"] {
            let want = e.groups.contains(&group);
            let version = if e.tls13 { "-tls1_3" } else { "-tls1_2" };
            // In TLS 1.2 OpenSSL also applies its group list to the server's ECDSA (P-256)
            // certificate, so P-256 stays on the list after the group under test.
            let groups = if e.tls13 || group == "P-256" {
                group.to_owned()
            } else {
                format!("{group}:P-256")
            };
            let r = s_client(
                port,
                &["-servername", "localhost", version, "-groups", &groups],
            )?;
            let temp_key = r
                .text
                .lines()
                .find(|l| l.contains("Server Temp Key"))
                .unwrap_or("")
                .to_owned();
            let expect_in_key = match group {
                "X25519" => "X25519",
                "P-256" => "prime256v1",
                "P-384" => "secp384r1",
                _ => "-",
            };
            let ok = negotiated_cipher(&r.text).is_some() && temp_key.contains(expect_in_key);
            if want != ok {
                writeln!(
                    failures,
                    "{}: group {group} wanted={want} got ok={ok} ({temp_key:?})",
                    e.listener
                )?;
            }
        }
    }
    ensure!(failures.is_empty(), "profile mismatches:\n{failures}");
    drop(srv.serve);
    Ok(())
}

/// X25519MLKEM768 is the first group of every built-in profile. OpenSSL 3.0 and GnuTLS 3.7 (Debian
/// 12) cannot offer it, so a rustls client offering only that group checks it.
#[test]
fn the_hybrid_post_quantum_group_negotiates_where_the_profile_allows_it() -> Result<()> {
    let srv = profile_server()?;
    let root = std::fs::read(srv.lab.path("ca/root.pem"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&root) {
        roots.add(c?)?;
    }
    let roots = Arc::new(roots);
    for e in EXPECT {
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768],
            ..rustls::crypto::aws_lc_rs::default_provider()
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
        let mut sock = TcpStream::connect(("127.0.0.1", srv.port(e.listener)))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let result = (|| -> Result<_> {
            while conn.is_handshaking() {
                conn.complete_io(&mut sock)?;
            }
            Ok(conn.negotiated_key_exchange_group().map(|g| g.name()))
        })();
        match (e.pq, result) {
            (true, Ok(Some(g))) => ensure!(
                g == rustls::NamedGroup::X25519MLKEM768,
                "{}: negotiated {g:?}",
                e.listener
            ),
            (true, other) => {
                anyhow::bail!("{}: X25519MLKEM768 should negotiate: {other:?}", e.listener)
            }
            (false, Ok(g)) => {
                anyhow::bail!("{}: X25519MLKEM768 must be refused, got {g:?}", e.listener)
            }
            (false, Err(_)) => {}
        }
    }
    Ok(())
}

fn gnutls(port: u16, ca: &Path, priority: &str) -> Result<common::policy_support::Run> {
    run_cmd(
        Command::new("gnutls-cli")
            .args(["--x509cafile"])
            .arg(ca)
            .args([
                "--sni-hostname",
                "localhost",
                "--verify-hostname",
                "localhost",
            ])
            .args(["--priority", priority, "-p", &port.to_string(), "127.0.0.1"]),
    )
}

/// gnutls-cli: every suite and group of each profile negotiates, and what the profile leaves
/// out does not.
#[test]
fn gnutls_cli_negotiates_each_profile_suite_and_group() -> Result<()> {
    if !common::require("gnutls-cli", "gnutls-bin") {
        return Ok(());
    }
    let srv = profile_server()?;
    let ca = srv.lab.path("ca/root.pem");
    // (OpenSSL name, gnutls version, cipher, key exchange)
    let table: &[(&str, &str, &str, &str)] = &[
        ("TLS_AES_128_GCM_SHA256", "TLS1.3", "AES-128-GCM", ""),
        ("TLS_AES_256_GCM_SHA384", "TLS1.3", "AES-256-GCM", ""),
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS1.3",
            "CHACHA20-POLY1305",
            "",
        ),
        (
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "TLS1.2",
            "AES-128-GCM",
            "ECDHE-ECDSA",
        ),
        (
            "ECDHE-RSA-AES128-GCM-SHA256",
            "TLS1.2",
            "AES-128-GCM",
            "ECDHE-RSA",
        ),
        (
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "TLS1.2",
            "AES-256-GCM",
            "ECDHE-ECDSA",
        ),
        (
            "ECDHE-RSA-AES256-GCM-SHA384",
            "TLS1.2",
            "AES-256-GCM",
            "ECDHE-RSA",
        ),
        (
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "TLS1.2",
            "CHACHA20-POLY1305",
            "ECDHE-ECDSA",
        ),
        (
            "ECDHE-RSA-CHACHA20-POLY1305",
            "TLS1.2",
            "CHACHA20-POLY1305",
            "ECDHE-RSA",
        ),
    ];
    let mut failures = String::new();
    for e in EXPECT {
        let port = srv.port(e.listener);
        for (openssl, version, cipher, kx) in table {
            let mut priority = format!("NORMAL:-VERS-ALL:+VERS-{version}:-CIPHER-ALL:+{cipher}");
            if !kx.is_empty() {
                priority += &format!(":-KX-ALL:+{kx}");
            }
            let r = gnutls(port, &ca, &priority)?;
            let described = r
                .text
                .lines()
                .find(|l| l.contains("- Description:"))
                .unwrap_or("")
                .to_owned();
            let ok =
                r.ok && described.contains(&format!("({version}")) && described.contains(cipher);
            let want = e.suites.contains(openssl);
            if want != ok {
                writeln!(
                    failures,
                    "{}: {openssl} via gnutls wanted={want} ok={ok}: {described:?}\n{}",
                    e.listener,
                    if want { &r.text } else { "" }
                )?;
            }
        }
        let version = if e.tls13 { "TLS1.3" } else { "TLS1.2" };
        for (group, gname) in [
            ("X25519", "X25519"),
            ("P-256", "SECP256R1"),
            ("P-384", "SECP384R1"),
            ("P-521", "SECP521R1"),
            ("ffdhe2048", "FFDHE2048"),
        ] {
            // A TLS 1.2 client must also list the curve of the ECDSA (P-256) certificate
            // (RFC 8422 §5.3); tlsgate refuses one that does not. rustls takes the first
            // group of the client's list that the listener allows, so the probed group still
            // decides the key exchange wherever the listener allows it.
            let also = if e.tls13 || gname == "SECP256R1" {
                String::new()
            } else {
                ":+GROUP-SECP256R1".to_owned()
            };
            let priority =
                format!("NORMAL:-VERS-ALL:+VERS-{version}:-GROUP-ALL:+GROUP-{gname}{also}");
            let r = gnutls(port, &ca, &priority)?;
            let ok = r.ok
                && r.text
                    .lines()
                    .any(|l| l.contains("- Description:") && l.contains(gname));
            let want = e.groups.contains(&group);
            if want != ok {
                writeln!(
                    failures,
                    "{}: group {group} via gnutls wanted={want} ok={ok}",
                    e.listener
                )?;
            }
        }
    }
    ensure!(failures.is_empty(), "gnutls mismatches:\n{failures}");
    Ok(())
}

#[test]
fn strict_with_an_rsa_certificate_is_refused_at_start_saying_why() -> Result<()> {
    let lab = Lab::new()?;
    let (key, chain) = lab_cert(&lab, "RSA", "rsa", "localhost", &["localhost"])?;
    let config = lab.path("strict-rsa.toml");
    std::fs::write(
        &config,
        format!(
            "[dataplane]\ncores = [0]\n\n[[listener]]\nname = \"s\"\nbind = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:9\"\npolicy = \"strict\"\n[[listener.certificate]]\nchain = \"{}\"\nkey = \"file:{}\"\n",
            chain.display(),
            key.display()
        ),
    )?;
    let out = lab
        .cmd(&["serve", "--config", &config.display().to_string()])
        .output()?;
    let err = fail(out, "serve with strict + RSA")?;
    ensure!(
        err.contains("strict")
            && err.contains("ECDSA certificates only")
            && err.contains("listener[0].certificate[0]"),
        "{err}"
    );
    // And a TLS 1.1 custom policy never starts either.
    std::fs::write(
        &config,
        "[[listener]]\nname = \"c\"\nbind = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:9\"\npolicy = \"custom\"\n[[listener.certificate]]\nchain = \"x.pem\"\nkey = \"file:x.key\"\n[listener.custom_policy]\nversions = [\"TLSv1.1\"]\n",
    )?;
    let out = tlsgate()
        .args(["serve", "--config"])
        .arg(&config)
        .output()?;
    let err = fail(out, "serve with TLS 1.1")?;
    ensure!(
        err.contains("listener[0].custom_policy") && err.contains("RFC 8996"),
        "{err}"
    );
    Ok(())
}

/// Names: www.example.test has an ECDSA (token) and an RSA certificate; *.wild.example.test a
/// wildcard; default.example.test is the default. `unknown_sni = "refuse"`.
fn sni_server(lab: &Lab, metrics: bool) -> Result<(common::ChildGuard, Serve, PathBuf)> {
    lab.token_key_with_chain("ec-p256", "tok-www")?;
    let (rsa_key, rsa_chain) = lab_cert(
        lab,
        "RSA",
        "www-rsa",
        "www.example.test",
        &["www.example.test"],
    )?;
    let (wild_key, wild_chain) = lab_cert(
        lab,
        "EC",
        "wild",
        "*.wild.example.test",
        &["*.wild.example.test"],
    )?;
    let (def_key, def_chain) = lab_cert(
        lab,
        "EC",
        "default",
        "default.example.test",
        &["default.example.test"],
    )?;
    let (backend, backend_addr) = demo_backend(lab.dir.path())?;
    let metrics = if metrics {
        "[metrics]\nlisten = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    let toml = format!(
        "[pkcs11]\ntoken = \"lab\"\npin = \"file:{pin}\"\n{metrics}\n[dataplane]\ncores = [0]\nio = \"portable\"\n\n\
         [[listener]]\nname = \"sni\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend_addr}\"\nunknown_sni = \"refuse\"\n\
         [[listener.certificate]]\nchain = \"{tok}\"\nkey = \"{tok_uri}\"\nnames = [\"www.example.test\"]\n\
         [[listener.certificate]]\nchain = \"{rsa_chain}\"\nkey = \"file:{rsa_key}\"\n\
         [[listener.certificate]]\nchain = \"{wild_chain}\"\nkey = \"file:{wild_key}\"\n\
         [[listener.certificate]]\nchain = \"{def_chain}\"\nkey = \"file:{def_key}\"\ndefault = true\n",
        pin = lab.p("token/user.pin"),
        tok = lab.p("certs/tok-www.pem"),
        tok_uri = uri("tok-www"),
        rsa_chain = rsa_chain.display(),
        rsa_key = rsa_key.display(),
        wild_chain = wild_chain.display(),
        wild_key = wild_key.display(),
        def_chain = def_chain.display(),
        def_key = def_key.display(),
    );
    let config = lab.path("sni.toml");
    std::fs::write(&config, toml)?;
    let serve = Serve::start(lab, &config)?;
    Ok((backend, serve, config))
}

fn subject_cn(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("subject=").map(|s| s.trim().to_owned()))
        .unwrap_or_default()
}

fn peer_sig_type(text: &str) -> String {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Peer signature type: ")
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default()
}

#[test]
fn unknown_sni_is_refused_with_unrecognized_name_and_counted() -> Result<()> {
    let lab = Lab::new()?;
    let (_backend, serve, config) = sni_server(&lab, true)?;
    let port = serve.port;
    let r = s_client(port, &["-servername", "nobody.example.test"])?;
    ensure!(
        negotiated_cipher(&r.text).is_none(),
        "unknown name was served:\n{}",
        r.text
    );
    ensure!(
        r.text.contains("unrecognized name") && r.text.contains("alert number 112"),
        "expected an unrecognized_name alert:\n{}",
        r.text
    );
    // TLS 1.2 clients get the same alert.
    let r = s_client(port, &["-servername", "nobody.example.test", "-tls1_2"])?;
    ensure!(r.text.contains("alert number 112"), "{}", r.text);
    // Known names, the wildcard and no SNI at all are served.
    let r = s_client(port, &["-servername", "a.wild.example.test"])?;
    ensure!(
        subject_cn(&r.text).contains("*.wild.example.test"),
        "{}",
        r.text
    );
    let r = s_client(port, &["-servername", "b.a.wild.example.test"])?;
    ensure!(
        r.text.contains("alert number 112"),
        "wildcards match one label only:\n{}",
        r.text
    );
    let r = s_client(port, &["-noservername"])?;
    ensure!(
        subject_cn(&r.text).contains("default.example.test"),
        "no SNI gets the default:\n{}",
        r.text
    );
    // The refusals are counted under their own close reason.
    let (seen, last) = wait_closed_reason(&metrics_addr(&config)?, "unknown_sni", 3.0)?;
    ensure!(seen, "no unknown_sni count of 3 in /metrics:\n{last}");
    Ok(())
}

#[test]
fn ecdsa_and_rsa_certificates_for_one_name_are_chosen_by_client_capability() -> Result<()> {
    let lab = Lab::new()?;
    let (_backend, serve, _) = sni_server(&lab, false)?;
    let port = serve.port;
    let www = ["-servername", "www.example.test"];
    let cases: &[(&[&str], &str, &str)] = &[
        (&["-sigalgs", "ECDSA+SHA256"], "ECDSA", "CN = localhost"),
        (
            &["-sigalgs", "rsa_pss_rsae_sha256"],
            "RSA-PSS",
            "www.example.test",
        ),
        (
            &["-tls1_2", "-sigalgs", "RSA+SHA256"],
            "RSA",
            "www.example.test",
        ),
        // A TLS 1.2 client offering ECDSA signatures but only ECDHE-RSA suites gets the RSA one.
        (
            &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"],
            "RSA",
            "www.example.test",
        ),
        (
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
            "ECDSA",
            "CN = localhost",
        ),
        // Both possible: the first listed (ECDSA, on the token) is preferred.
        (&[], "ECDSA", "CN = localhost"),
    ];
    for (args, sig, subject) in cases {
        let mut all: Vec<&str> = www.to_vec();
        all.extend_from_slice(args);
        let r = s_client(port, &all)?;
        ensure!(
            negotiated_cipher(&r.text).is_some(),
            "{args:?}: no handshake:\n{}",
            r.text
        );
        let got = peer_sig_type(&r.text);
        ensure!(
            got.starts_with(sig),
            "{args:?}: peer signature {got:?}, wanted {sig:?}:\n{}",
            r.text
        );
        ensure!(
            subject_cn(&r.text).contains(subject),
            "{args:?}: subject {:?}",
            subject_cn(&r.text)
        );
    }
    Ok(())
}

#[test]
fn a_policy_change_applies_on_reload_and_a_refused_one_keeps_the_running_policy() -> Result<()> {
    let lab = Lab::new()?;
    let (ec_key, ec_chain) = lab_cert(&lab, "EC", "ec", "localhost", &["localhost"])?;
    let (rsa_key, rsa_chain) = lab_cert(&lab, "RSA", "rsa", "localhost", &["localhost"])?;
    let (_backend, backend_addr) = demo_backend(lab.dir.path())?;
    let config = lab.path("reload.toml");
    let write = |policy: &str, chain: &Path, key: &Path| {
        std::fs::write(
            &config,
            format!(
                "[dataplane]\ncores = [0]\nio = \"portable\"\n\n[[listener]]\nname = \"r\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend_addr}\"\npolicy = \"{policy}\"\n[[listener.certificate]]\nchain = \"{}\"\nkey = \"file:{}\"\n",
                chain.display(),
                key.display()
            ),
        )
    };
    write("intermediate", &ec_chain, &ec_key)?;
    let mut serve = Serve::start(&lab, &config)?;
    let logs = log_lines(&mut serve)?;
    let tls12 = |port: u16| -> Result<bool> {
        Ok(
            negotiated_cipher(&s_client(port, &["-servername", "localhost", "-tls1_2"])?.text)
                .is_some(),
        )
    };
    ensure!(tls12(serve.port)?, "intermediate serves TLS 1.2");

    write("modern", &ec_chain, &ec_key)?;
    serve.signal("HUP")?;
    wait_log(&logs, "reloaded")?;
    ensure!(
        !tls12(serve.port)?,
        "modern (after reload) must refuse TLS 1.2"
    );

    // strict with an RSA certificate is refused; the running (modern) policy stays.
    write("strict", &rsa_chain, &rsa_key)?;
    serve.signal("HUP")?;
    let line = wait_log(&logs, "reload refused")?;
    ensure!(line.contains("ECDSA certificates only"), "{line}");
    ensure!(!tls12(serve.port)?, "still modern");
    let r = s_client(serve.port, &["-servername", "localhost", "-tls1_3"])?;
    ensure!(negotiated_cipher(&r.text).is_some(), "{}", r.text);
    Ok(())
}
