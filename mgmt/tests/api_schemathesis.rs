//! schemathesis (PyPI; scripts/test.sh installs a pinned version and sets TLSGATE_SCHEMATHESIS)
//! against the live management API of a real `tlsgate serve` on a SoftHSM2 token, over HTTPS
//! with a client certificate, driven by the document the server itself serves: every answer
//! must match the document (status, content type, schema), nothing may answer 5xx, what the
//! document allows must be accepted and what it forbids refused. Zero findings.
//!
//! `positive_data_acceptance` also takes 403, 404, 409 and 422 as an answer to a request the
//! document allows: 403 for a key import over HTTPS (refused before its body is read), 404 for a
//! name that does not exist (a random key label, listener or certificate id), 409 for one that
//! exists already or a missing `[[acme]]`, 422 for content no schema can describe (a PEM that is
//! not a certificate, a CSR name the token's CSR builder refuses).

mod api_support;
mod common;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use api_support::*;
use common::{demo_backend, Lab, Serve};

/// The pinned schemathesis; set by scripts/test.sh.
fn schemathesis() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("TLSGATE_SCHEMATHESIS")?);
    p.exists().then_some(p)
}

const CONFIG: &str = r#"
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "403", "404", "409", "422"]
"#;

#[test]
fn schemathesis_finds_nothing_against_the_live_api() -> Result<()> {
    let Some(st) = schemathesis() else {
        tlsgate_hw_tests::skip::missing(
            "schemathesis not found (TLSGATE_SCHEMATHESIS unset; scripts/test.sh installs it)",
        );
        return Ok(());
    };
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "st")?;
    // A key generation (rsa-4096 on SoftHSM2 takes seconds) holds the manager's lock; the
    // requests behind it must wait for it, not answer hsm_timeout.
    let text = std::fs::read_to_string(&config)?;
    std::fs::write(
        &config,
        text.replacen("[pkcs11]\n", "[pkcs11]\ncall_timeout_ms = 120000\n", 1),
    )?;
    // Connection-level events (hyper giving up on a connection, a handshake timing out) are
    // debug lines: kept for the failure report below.
    let mut serve = Serve::start_with_env(
        &lab,
        &config,
        &[(
            "TLSGATE_LOG",
            "info,tlsgate_mgmt::api::server=debug".to_owned(),
        )],
    )?;
    // Every request is logged: hundreds of them overflow a pipe nobody reads.
    serve.log_to(&lab.path("serve.log"))?;
    let port = api_port(&config)?;

    // The document as the server serves it.
    let (status, doc) = curl_unix(&lab, "GET", "/v1/openapi.json", None)?;
    ensure!(status == 200, "{status} {doc}");
    let doc_path = lab.path("openapi.json");
    std::fs::write(&doc_path, &doc)?;
    let config_path = lab.path("schemathesis.toml");
    std::fs::write(&config_path, CONFIG)?;

    let out = Command::new(&st)
        .current_dir(lab.dir.path())
        .env("SCHEMATHESIS_HOOKS", "")
        .arg("--config-file")
        .arg(&config_path)
        .arg("run")
        .arg(&doc_path)
        .arg("--url")
        .arg(format!("https://localhost:{port}"))
        .arg("--tls-verify")
        .arg(&pki.ca_root)
        .arg("--request-cert")
        .arg(&pki.client_chain)
        .arg("--request-cert-key")
        .arg(&pki.client_key)
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_schema_conformance,negative_data_rejection,positive_data_acceptance",
            "--phases",
            "examples,coverage,fuzzing",
            // Without --max-time the fuzzing phase runs this many cases per operation once and
            // the run ends by itself (a run cut off by --max-time can end in the middle of a
            // request, which schemathesis reports as a network error).
            "--max-examples",
            "300",
            "--seed",
            "1",
            "--workers",
            "1",
            "--request-timeout",
            "120",
            // Refused over HTTPS by design before its body is read (it is for the unix socket,
            // which schemathesis cannot reach); api_round_trip covers both.
            "--exclude-path",
            "/v1/keys/import",
            // Every request and answer, for the failure report below.
            "--report",
            "har",
            "--report-dir",
        ])
        .arg(lab.path("report"))
        .output()
        .context("running schemathesis")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The summary, for the log of scripts/test.sh.
    for line in stdout.lines() {
        println!("schemathesis: {line}");
    }
    if !out.status.success() {
        failure_report(&lab);
    }
    ensure!(
        out.status.success(),
        "schemathesis reported findings ({}):\n{stdout}\n{stderr}",
        out.status
    );
    ensure!(
        stdout.contains("passed") && !stdout.contains("failed"),
        "no summary or a failure in it:\n{stdout}"
    );
    // "N generated, N passed": the run reached the API with thousands of cases, not a handful.
    let generated = stdout
        .lines()
        .find_map(|l| l.trim().split_once(" generated, "))
        .and_then(|(n, rest)| Some((n.parse::<u64>().ok()?, rest.to_owned())))
        .context("no \"N generated, N passed\" line")?;
    ensure!(
        generated.0 >= 1000 && generated.1.starts_with(&format!("{} passed", generated.0)),
        "schemathesis ran {} cases ({})",
        generated.0,
        generated.1
    );
    Ok(())
}

/// What a failed run leaves to go on: the requests that got no answer (with the one before
/// each) from schemathesis's HAR report, and the server's own lines about its connections and
/// its warnings.
fn failure_report(lab: &Lab) {
    let entries: Vec<serde_json::Value> = std::fs::read_dir(lab.path("report"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .filter_map(|doc| doc["log"]["entries"].as_array().cloned())
        .flatten()
        .collect();
    let unanswered =
        (0..entries.len()).filter(|&i| entries[i]["response"]["status"].as_u64() == Some(0));
    for i in unanswered {
        // The request and the one before it.
        for (j, e) in entries
            .iter()
            .enumerate()
            .take(i + 1)
            .skip(i.saturating_sub(1))
        {
            let r = &e["request"];
            let body: String = r["postData"]["text"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(120)
                .collect();
            println!(
                "har #{j}: {} {} {} {body} -> {}",
                e["startedDateTime"].as_str().unwrap_or("?"),
                r["method"].as_str().unwrap_or("?"),
                r["url"].as_str().unwrap_or("?"),
                e["response"]["status"]
            );
        }
    }
    let log = std::fs::read_to_string(lab.path("serve.log")).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("api::server")
                || (l.contains(" WARN ") || l.contains(" ERROR "))
                    && !l.contains("management operation refused")
        })
        .collect();
    for line in &lines[lines.len().saturating_sub(60)..] {
        println!("serve.log: {line}");
    }
}
