//! Each mode of `tlsgate-load` against a real rustls server on 127.0.0.1, checked from both ends:
//! the generator's report and the server's own handshake counters.

mod support;

use support::{error_count, load, load_ok, server, server_with, u, Resumption};

const BOUND_SECS: &str = "30"; // a safety net; the count bound ends every run first

#[test]
fn full_mode_makes_only_full_handshakes() {
    let srv = server(Resumption::Tickets);
    let addr = srv.addr.to_string();
    let pid = std::process::id().to_string();
    let ca = srv.pki.ca_pem.to_str().expect("utf-8 temp path");
    let r = load_ok(&[
        "--target",
        &addr,
        "--ca",
        ca,
        "--mode",
        "full",
        "--tls",
        "1.3",
        "--concurrency",
        "3",
        "--connections",
        "30",
        "--duration",
        BOUND_SECS,
        "--server-pid",
        &pid,
    ]);
    assert_eq!(u(&r, "connections_ok"), 30, "{r:#}");
    assert_eq!(u(&r, "full_handshakes"), 30);
    assert_eq!(u(&r, "resumed_handshakes"), 0);
    assert_eq!(u(&r, "errors_total"), 0, "{r:#}");
    assert_eq!(srv.counters.full(), 30, "server saw other handshakes");
    assert_eq!(srv.counters.resumed(), 0);
    // Even with tickets on offer, a full-mode client never resumes.
    assert_eq!(r["latency_us"]["count"], 30);
    assert!(r["latency_us"]["p50"].as_u64().is_some_and(|p| p > 0));
    assert_eq!(
        r["server"]["pids"][0].as_u64(),
        Some(u64::from(std::process::id()))
    );
    assert!(r["generator"]["us_per_unit"].is_number(), "{r:#}");
    let negotiated = r["negotiated"].as_object().expect("negotiated map");
    assert!(
        negotiated
            .keys()
            .all(|k| k.starts_with("TLSv1_3") && k.ends_with("X25519")),
        "{negotiated:?}"
    );
}

#[test]
fn resume_mode_tls13_resumes_every_connection() {
    let srv = server(Resumption::Tickets);
    let addr = srv.addr.to_string();
    let r = load_ok(&[
        "--target",
        &addr,
        "--ca",
        srv.pki.ca_pem.to_str().expect("utf-8"),
        "--mode",
        "resume",
        "--tls",
        "1.3",
        "--concurrency",
        "2",
        "--connections",
        "40",
        "--duration",
        BOUND_SECS,
    ]);
    assert_eq!(u(&r, "connections_ok"), 40, "{r:#}");
    assert_eq!(u(&r, "resumed_handshakes"), 40);
    assert_eq!(u(&r, "errors_total"), 0, "{r:#}");
    // One priming full handshake per slot, outside the measured window.
    assert_eq!(srv.counters.full(), 2);
    assert_eq!(srv.counters.resumed(), 40);
}

#[test]
fn resume_mode_tls12_session_ids() {
    let srv = server(Resumption::Stateful);
    let addr = srv.addr.to_string();
    let r = load_ok(&[
        "--target",
        &addr,
        "--ca",
        srv.pki.ca_pem.to_str().expect("utf-8"),
        "--mode",
        "resume",
        "--tls",
        "1.2",
        "--tls12-resumption",
        "ids",
        "--connections",
        "20",
        "--duration",
        BOUND_SECS,
    ]);
    assert_eq!(u(&r, "resumed_handshakes"), 20, "{r:#}");
    assert_eq!(u(&r, "errors_total"), 0, "{r:#}");
    assert_eq!(srv.counters.resumed(), 20);
    let negotiated = r["negotiated"].as_object().expect("negotiated map");
    assert!(
        negotiated.keys().all(|k| k.starts_with("TLSv1_2")),
        "{negotiated:?}"
    );
}

#[test]
fn resume_mode_tls12_tickets() {
    let srv = server(Resumption::Tickets);
    let addr = srv.addr.to_string();
    let r = load_ok(&[
        "--target",
        &addr,
        "--ca",
        srv.pki.ca_pem.to_str().expect("utf-8"),
        "--mode",
        "resume",
        "--tls",
        "1.2",
        "--tls12-resumption",
        "tickets",
        "--connections",
        "20",
        "--duration",
        BOUND_SECS,
    ]);
    assert_eq!(u(&r, "resumed_handshakes"), 20, "{r:#}");
    assert_eq!(srv.counters.resumed(), 20);
}

#[test]
fn resume_mode_counts_full_handshakes_as_not_resumed() {
    let srv = server(Resumption::Off);
    let addr = srv.addr.to_string();
    let (out, report) = load(&[
        "--target",
        &addr,
        "--ca",
        srv.pki.ca_pem.to_str().expect("utf-8"),
        "--mode",
        "resume",
        "--connections",
        "10",
        "--duration",
        BOUND_SECS,
    ]);
    let r = report.expect("report written even when every connection failed");
    assert!(!out.status.success(), "a run with no success must fail");
    assert_eq!(error_count(&r, "not_resumed"), 10, "{r:#}");
    assert_eq!(u(&r, "connections_ok"), 0);
    assert_eq!(srv.counters.resumed(), 0);
}

#[test]
fn bulk_mode_reuses_keep_alive_connections() {
    let srv = server(Resumption::Tickets);
    let addr = srv.addr.to_string();
    let r = load_ok(&[
        "--target",
        &addr,
        "--ca",
        srv.pki.ca_pem.to_str().expect("utf-8"),
        "--mode",
        "bulk",
        "--concurrency",
        "2",
        "--requests",
        "20",
        "--response-bytes",
        "200000",
        "--duration",
        BOUND_SECS,
    ]);
    assert_eq!(u(&r, "requests"), 20, "{r:#}");
    assert_eq!(u(&r, "body_bytes"), 20 * 200_000);
    assert_eq!(
        u(&r, "connections_ok"),
        2,
        "keep-alive should need one connection per slot"
    );
    assert_eq!(u(&r, "errors_total"), 0, "{r:#}");
    assert_eq!(srv.counters.full(), 2);
    assert_eq!(r["unit"], "request");
}

#[test]
fn bulk_mode_counts_a_wrong_body_size() {
    let srv = server(Resumption::Tickets);
    let addr = srv.addr.to_string();
    let (_, report) = load(&[
        "--target",
        &addr,
        "--ca",
        srv.pki.ca_pem.to_str().expect("utf-8"),
        "--mode",
        "bulk",
        "--requests",
        "3",
        "--response-bytes",
        "1000",
        "--path",
        "/bytes/999",
        "--duration",
        BOUND_SECS,
    ]);
    let r = report.expect("report");
    assert_eq!(error_count(&r, "body_size"), 3, "{r:#}");
}

#[test]
fn idle_mode_holds_connections_and_measures_server_memory() {
    let srv = server(Resumption::Tickets);
    let addr = srv.addr.to_string();
    let pid = std::process::id().to_string();
    let r = load_ok(&[
        "--target",
        &addr,
        "--ca",
        srv.pki.ca_pem.to_str().expect("utf-8"),
        "--mode",
        "idle",
        "--concurrency",
        "4",
        "--connections",
        "40",
        "--hold",
        "0.05",
        "--duration",
        BOUND_SECS,
        "--server-pid",
        &pid,
    ]);
    assert_eq!(u(&r, "idle_open"), 40, "{r:#}");
    assert_eq!(srv.counters.full(), 40);
    assert!(
        r["server"]["rss_kib_loaded"]
            .as_u64()
            .is_some_and(|k| k > 0),
        "{r:#}"
    );
    assert!(r["server"]["rss_bytes_per_connection"].is_number(), "{r:#}");
}

#[test]
fn group_and_suite_are_what_is_offered() {
    let srv = server(Resumption::Tickets);
    let addr = srv.addr.to_string();
    for (group, suite, want) in [
        (
            "secp384r1",
            "TLS13_AES_128_GCM_SHA256",
            "TLSv1_3 TLS13_AES_128_GCM_SHA256 secp384r1",
        ),
        (
            "x25519mlkem768",
            "TLS13_CHACHA20_POLY1305_SHA256",
            "TLSv1_3 TLS13_CHACHA20_POLY1305_SHA256 X25519MLKEM768",
        ),
        (
            "secp256r1",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLSv1_2 TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 secp256r1",
        ),
    ] {
        let r = load_ok(&[
            "--target",
            &addr,
            "--ca",
            srv.pki.ca_pem.to_str().expect("utf-8"),
            "--group",
            group,
            "--suite",
            suite,
            "--connections",
            "2",
            "--duration",
            BOUND_SECS,
        ]);
        assert_eq!(r["negotiated"][want].as_u64(), Some(2), "{r:#}");
    }
}

#[test]
fn unknown_ca_fails_and_insecure_flag_skips_the_chain_check() {
    let srv = server(Resumption::Tickets);
    let other = support::pki();
    let addr = srv.addr.to_string();
    let (out, report) = load(&[
        "--target",
        &addr,
        "--ca",
        other.ca_pem.to_str().expect("utf-8"),
        "--connections",
        "3",
        "--duration",
        BOUND_SECS,
    ]);
    assert!(!out.status.success());
    let r = report.expect("report");
    assert_eq!(error_count(&r, "tls"), 3);
    let why = r["error_examples"]["tls"].as_str().unwrap_or_default();
    assert!(
        why.contains("invalid peer certificate"),
        "first tls error should say why: {r:#}"
    );

    let r = load_ok(&[
        "--target",
        &addr,
        "--insecure-skip-verify",
        "--sni",
        "not-the-cert-name.example",
        "--connections",
        "3",
        "--duration",
        BOUND_SECS,
    ]);
    assert_eq!(u(&r, "connections_ok"), 3, "{r:#}");
}

#[test]
fn insecure_flag_still_catches_a_signer_that_returns_garbage() {
    // The generator skips the handshake signature check on all but one handshake in 1024, the
    // first included: a broken signer must still fail the run, whatever the concurrency.
    let srv = server_with(Resumption::Off, true);
    let addr = srv.addr.to_string();
    for tls in ["1.3", "1.2"] {
        let (_, report) = load(&[
            "--target",
            &addr,
            "--insecure-skip-verify",
            "--tls",
            tls,
            "--connections",
            "4",
            "--duration",
            BOUND_SECS,
        ]);
        let r = report.expect("report");
        assert!(error_count(&r, "tls") >= 1, "TLS {tls}: {r:#}");
        let why = r["error_examples"]["tls"].as_str().unwrap_or_default();
        assert!(
            why.to_ascii_lowercase().contains("signature"),
            "TLS {tls}: {r:#}"
        );
    }
    // With the CA, every handshake is checked: all fail.
    let (out, report) = load(&[
        "--target",
        &addr,
        "--ca",
        srv.pki.ca_pem.to_str().expect("utf-8"),
        "--connections",
        "4",
        "--duration",
        BOUND_SECS,
    ]);
    assert!(!out.status.success());
    assert_eq!(error_count(&report.expect("report"), "tls"), 4);
}

#[test]
fn bad_options_are_refused_with_a_reason() {
    let (out, _) = load(&[
        "--target",
        "127.0.0.1:1",
        "--insecure-skip-verify",
        "--suite",
        "NOPE",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown --suite"));
    let (out, _) = load(&["--target", "127.0.0.1:1"]);
    assert!(
        !out.status.success(),
        "neither --ca nor --insecure-skip-verify must be refused"
    );
}

#[test]
fn connection_refused_is_counted_not_fatal_midway() {
    // Bind then drop a listener to get a port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let (out, report) = load(&[
        "--target",
        &format!("127.0.0.1:{port}"),
        "--insecure-skip-verify",
        "--connections",
        "5",
        "--duration",
        BOUND_SECS,
    ]);
    assert!(!out.status.success());
    assert_eq!(error_count(&report.expect("report"), "connect"), 5);
}
