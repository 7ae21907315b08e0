//! The operator's round trip through the management API of a running appliance on a SoftHSM2
//! token, with `tlsgate ctl` (unix socket) and plain `curl --cert` (HTTPS): generate a key, get
//! its CSR, have the lab CA sign it, upload the chain, bind it, see it served, rotate it; a bad
//! upload changes nothing; everything survives a restart and is in the audit log.

mod api_support;
mod common;

use anyhow::{ensure, Result};
use api_support::*;
use common::{demo_backend, Lab, Serve};

#[test]
fn operator_round_trip_with_ctl_and_curl() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "rt")?;
    let serve = Serve::start(&lab, &config)?;
    let port = api_port(&config)?;
    ensure!(served_fingerprint(serve.port)? == file_fingerprint(&boot)?);

    // The socket is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(lab.path("api.sock"))?
        .permissions()
        .mode()
        & 0o777;
    ensure!(mode == 0o600, "socket mode {mode:o}");

    // 1. key + CSR through ctl, signed by the lab CA.
    let chain1 = key_csr_chain(&lab, "web-2026")?;
    let keys = ctl_json(&lab, &["keys", "list"])?;
    let key = keys["items"]
        .as_array()
        .and_then(|a| a.iter().find(|k| k["label"] == "web-2026"))
        .cloned()
        .unwrap_or_default();
    ensure!(
        key["origin"] == "generated" && key["sensitive"] == true && key["extractable"] == false,
        "{key}"
    );
    ensure!(
        key["type"] == "ec-p256" && key["spki_sha256"].as_str().map_or(0, str::len) == 64,
        "{key}"
    );

    // 2. upload with plain curl over HTTPS and a client certificate.
    let body = serde_json::json!({
        "key": "web-2026",
        "chain_pem": std::fs::read_to_string(&chain1)?,
    })
    .to_string();
    let client = Some((pki.client_chain.as_path(), pki.client_key.as_path()));
    let (status, answer, _) = curl_https(
        &pki,
        port,
        client,
        "PUT",
        "/v1/certificates/web",
        Some(&body),
    )?;
    ensure!(status == 200, "{status} {answer}");
    let cert: serde_json::Value = serde_json::from_str(&answer)?;
    ensure!(
        cert["fingerprint_sha256"] == file_fingerprint(&chain1)?,
        "{cert}"
    );
    ensure!(
        cert["sans"] == serde_json::json!(["localhost"]) && cert["chain_length"] == 2,
        "{cert}"
    );
    // Uploaded but not bound: the listener still serves the file's certificate.
    ensure!(served_fingerprint(serve.port)? == file_fingerprint(&boot)?);

    // 3. bind with ctl; the next connection gets the new certificate, and traffic flows.
    ctl_ok(
        &lab,
        &[
            "listeners",
            "bind",
            "--listener",
            "web",
            "--cert",
            "web",
            "--default",
            "web",
        ],
    )?;
    ensure!(served_fingerprint(serve.port)? == file_fingerprint(&chain1)?);
    let out = common::check(
        common::curl(&lab, serve.port, "/hello", &[])?,
        "curl through the appliance",
    )?;
    ensure!(out.contains("hello from the tlsgate demo backend"), "{out}");

    // 4. rotate: a new key and chain under the same certificate id.
    let chain2 = key_csr_chain(&lab, "web-2027")?;
    ctl_ok(
        &lab,
        &[
            "certs",
            "upload",
            "--id",
            "web",
            "--key",
            "web-2027",
            "--chain",
            &chain2.display().to_string(),
        ],
    )?;
    ensure!(served_fingerprint(serve.port)? == file_fingerprint(&chain2)?);

    // 5. failures change nothing, each with its own code and exit code 1.
    ctl_refused(
        &lab,
        &[
            "certs",
            "upload",
            "--id",
            "web",
            "--key",
            "web-2026",
            "--chain",
            &chain2.display().to_string(),
        ],
        "key_mismatch",
    )?;
    let swapped = lab.path("swapped.pem");
    {
        let text = std::fs::read_to_string(&chain2)?;
        let blocks: Vec<&str> = text
            .split_inclusive("-----END CERTIFICATE-----\n")
            .collect();
        ensure!(blocks.len() == 2, "chain has two blocks");
        std::fs::write(&swapped, format!("{}{}", blocks[1], blocks[0]))?;
    }
    ctl_refused(
        &lab,
        &[
            "certs",
            "upload",
            "--id",
            "web",
            "--key",
            "web-2027",
            "--chain",
            &swapped.display().to_string(),
        ],
        "key_mismatch",
    )?;
    std::fs::write(lab.path("garbage.pem"), "not a certificate")?;
    ctl_refused(
        &lab,
        &[
            "certs",
            "upload",
            "--id",
            "web",
            "--key",
            "web-2027",
            "--chain",
            &lab.p("garbage.pem"),
        ],
        "chain_empty",
    )?;
    ctl_refused(
        &lab,
        &[
            "certs",
            "upload",
            "--id",
            "../x",
            "--key",
            "web-2027",
            "--chain",
            &chain2.display().to_string(),
        ],
        "name_invalid",
    )?;
    ctl_refused(
        &lab,
        &["keys", "delete", "--label", "web-2027"],
        "key_in_use",
    )?;
    ctl_refused(
        &lab,
        &["certs", "delete", "--id", "web"],
        "certificate_in_use",
    )?;
    ctl_refused(
        &lab,
        &["listeners", "bind", "--listener", "nope", "--cert", "web"],
        "listener_not_found",
    )?;
    ctl_refused(
        &lab,
        &[
            "listeners",
            "bind",
            "--listener",
            "web",
            "--cert",
            "web",
            "--names",
            "web=other.example",
        ],
        "name_not_in_certificate",
    )?;
    ensure!(
        served_fingerprint(serve.port)? == file_fingerprint(&chain2)?,
        "a refused change changed the served certificate"
    );
    // The old key is no longer bound: it may go.
    ctl_ok(&lab, &["keys", "delete", "--label", "web-2026"])?;

    // 6. HTTPS without a client certificate, or with one from another CA: only the TLS alert.
    for cert in [
        None,
        Some((pki.foreign_chain.as_path(), pki.foreign_key.as_path())),
    ] {
        let (status, answer, out) = curl_https(&pki, port, cert, "GET", "/v1/keys", None)?;
        ensure!(
            !out.status.success() && status == 0 && answer.is_empty(),
            "unauthenticated request answered {status}: {answer}"
        );
    }

    // 7. Every route the router serves answers (never the fallback).
    for (method, path) in tlsgate_mgmt::api::routes::served() {
        let path = path
            .replace("{label}", "nokey")
            .replace("{id}", "noid")
            .replace("{name}", "web");
        if method == "delete" && path == "/v1/listeners/web/binding" {
            continue; // would really unbind
        }
        if method == "post" && path == "/v1/reload" {
            continue; // exercised below
        }
        let (status, answer) = curl_unix(&lab, &method.to_uppercase(), &path, Some("{}"))?;
        let code = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        ensure!(
            code != "route_not_found" && code != "method_not_allowed" && status != 0,
            "{method} {path}: {status} {answer}"
        );
    }
    let (status, doc) = curl_unix(&lab, "GET", "/v1/openapi.json", None)?;
    ensure!(status == 200 && doc.contains("\"openapi\""), "{status}");
    let (status, answer) = curl_unix(&lab, "POST", "/v1/keys", Some("{\"label\": 5"))?;
    ensure!(
        status == 400 && answer.contains("\"bad_request\""),
        "{status} {answer}"
    );
    ctl_ok(&lab, &["reload"])?;
    ensure!(
        served_fingerprint(serve.port)? == file_fingerprint(&chain2)?,
        "reload keeps the binding"
    );

    // 8. The audit log names both clients and holds no secret.
    let audit = std::fs::read_to_string(lab.path("state/audit.log"))?;
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(lines
        .iter()
        .any(|l| l["client"] == "uid:0" && l["operation"] == "binding.put" && l["result"] == "ok"));
    ensure!(lines.iter().any(|l| l["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("cert:CN=ops-alice sha256:"))
        && l["operation"] == "certificate.put"
        && l["target"] == "web"));
    ensure!(lines
        .iter()
        .any(|l| l["operation"] == "certificate.put" && l["result"] == "key_mismatch"));
    let pin = std::fs::read_to_string(lab.path("token/user.pin"))?;
    ensure!(
        !audit.contains(pin.trim()) && !audit.contains("PRIVATE KEY") && !audit.contains("BEGIN"),
        "audit log holds a secret or a body"
    );

    // 9. Restart: the binding and the rotated certificate come back.
    drop(serve);
    let serve = Serve::start(&lab, &config)?;
    ensure!(
        served_fingerprint(serve.port)? == file_fingerprint(&chain2)?,
        "restart lost the rotation"
    );
    let certs = ctl_json(&lab, &["certs", "list"])?;
    ensure!(
        certs["items"][0]["id"] == "web"
            && certs["items"][0]["bound_to"] == serde_json::json!(["web"]),
        "{certs}"
    );

    // 10. Unbind: back to the configuration file's certificate; then the certificate may go.
    ctl_ok(&lab, &["listeners", "unbind", "--listener", "web"])?;
    ensure!(served_fingerprint(serve.port)? == file_fingerprint(&boot)?);
    ctl_ok(&lab, &["certs", "delete", "--id", "web"])?;
    ensure!(ctl_json(&lab, &["certs", "list"])?["items"] == serde_json::json!([]));
    Ok(())
}

#[test]
fn an_imported_key_is_never_stored_or_logged() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "imp")?;
    let _serve = Serve::start(&lab, &config)?;
    let (key, chain) = lab.software_key_with_chain("EC", "imported")?;
    ctl_ok(
        &lab,
        &[
            "keys",
            "import",
            "--label",
            "imp",
            "--key-file",
            &key.display().to_string(),
        ],
    )?;
    let keys = ctl_json(&lab, &["keys", "list"])?;
    let k = keys["items"]
        .as_array()
        .and_then(|a| a.iter().find(|k| k["label"] == "imp"))
        .cloned()
        .unwrap_or_default();
    ensure!(
        k["origin"] == "imported" && k["sensitive"] == true && k["extractable"] == false,
        "{k}"
    );
    // The imported key serves its certificate.
    ctl_ok(
        &lab,
        &[
            "certs",
            "upload",
            "--id",
            "imp",
            "--key",
            "imp",
            "--chain",
            &chain.display().to_string(),
        ],
    )?;
    let pem = std::fs::read_to_string(&key)?;
    let secret_line = pem.lines().nth(1).unwrap_or_default().to_owned();
    ensure!(secret_line.len() > 20);
    let mut seen = String::new();
    for entry in walk(&lab.path("state"))? {
        seen.push_str(&String::from_utf8_lossy(&std::fs::read(entry)?));
    }
    ensure!(
        !seen.is_empty() && !seen.contains(&secret_line) && !seen.contains("PRIVATE KEY"),
        "the key reached the state directory or the audit log"
    );
    Ok(())
}

fn walk(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let (p, kind) = (e.path(), e.file_type()?);
        if kind.is_dir() {
            out.extend(walk(&p)?);
        } else if kind.is_file() {
            // Files only: the state directory also holds the upgrade's handover socket.
            out.push(p);
        }
    }
    Ok(out)
}

#[test]
fn a_listener_without_certificates_serves_once_bound() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "empty")?;
    let text = std::fs::read_to_string(&config)?;
    let without = text
        .split("[[listener.certificate]]")
        .next()
        .unwrap_or_default()
        .to_owned();
    std::fs::write(&config, without)?;
    let serve = Serve::start(&lab, &config)?;
    // No certificate yet: the handshake fails.
    ensure!(
        served_fingerprint(serve.port).is_err(),
        "a listener without certificates completed a handshake"
    );
    let chain = key_csr_chain(&lab, "first")?;
    ctl_ok(
        &lab,
        &[
            "certs",
            "upload",
            "--id",
            "first",
            "--key",
            "first",
            "--chain",
            &chain.display().to_string(),
        ],
    )?;
    ctl_ok(
        &lab,
        &["listeners", "bind", "--listener", "web", "--cert", "first"],
    )?;
    ensure!(served_fingerprint(serve.port)? == file_fingerprint(&chain)?);
    let out = common::check(common::curl(&lab, serve.port, "/first", &[])?, "curl")?;
    ensure!(out.contains("hello from the tlsgate demo backend"), "{out}");
    Ok(())
}

#[test]
fn key_import_over_https_is_refused_before_its_body_unless_allowed() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "imh")?;
    let (key, _chain) = lab.software_key_with_chain("EC", "imported")?;
    let pem = std::fs::read_to_string(&key)?;
    let body = |label: &str| serde_json::json!({ "label": label, "pkcs8_pem": pem }).to_string();
    let client = Some((pki.client_chain.as_path(), pki.client_key.as_path()));
    let labels = |lab: &Lab| -> Result<Vec<String>> {
        Ok(ctl_json(lab, &["keys", "list"])?["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k["label"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    };

    // By default: a valid management client over HTTPS is refused, and nothing reaches the token.
    let serve = Serve::start(&lab, &config)?;
    let port = api_port(&config)?;
    let (status, answer, _) = curl_https(
        &pki,
        port,
        client,
        "POST",
        "/v1/keys/import",
        Some(&body("over-https")),
    )?;
    let code = serde_json::from_str::<serde_json::Value>(&answer)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
    ensure!(
        status == 403 && code.as_deref() == Some("key_import_needs_local_socket"),
        "{status} {answer}"
    );
    ensure!(
        answer.contains("unix socket"),
        "the answer says what to do: {answer}"
    );
    ensure!(!labels(&lab)?.iter().any(|l| l == "over-https"));
    let audit = std::fs::read_to_string(lab.path("state/audit.log"))?;
    ensure!(
        audit
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|l| l["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("cert:CN=ops-alice sha256:"))
                && l["operation"] == "key.import"
                && l["status"] == 403
                && l["result"] == "key_import_needs_local_socket"),
        "the refusal is audited:\n{audit}"
    );
    ensure!(!audit.contains("PRIVATE KEY"), "no body in the audit log");

    // Over the unix socket the same import works.
    ctl_ok(
        &lab,
        &[
            "keys",
            "import",
            "--label",
            "over-socket",
            "--key-file",
            &key.display().to_string(),
        ],
    )?;
    ensure!(labels(&lab)?.iter().any(|l| l == "over-socket"));
    drop(serve);

    // An operator who accepts the risk opts in.
    let text = std::fs::read_to_string(&config)?.replace(
        "\n[state]",
        "danger_allow_key_import_over_https = true\n\n[state]",
    );
    std::fs::write(&config, text)?;
    let _ = std::fs::remove_file(config.with_extension("ready"));
    let _serve = Serve::start(&lab, &config)?;
    let port = api_port(&config)?;
    let (status, answer, _) = curl_https(
        &pki,
        port,
        client,
        "POST",
        "/v1/keys/import",
        Some(&body("opted-in")),
    )?;
    ensure!(status == 201, "{status} {answer}");
    ensure!(labels(&lab)?.iter().any(|l| l == "opted-in"));
    Ok(())
}
