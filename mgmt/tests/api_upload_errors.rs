//! Each way a certificate upload can fail answers its own stable error code, and a refused
//! upload stores nothing.

mod api_support;
mod common;

use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Result};
use api_support::*;
use common::{demo_backend, Lab, Serve};
use tlsgate_keystore::labca::LabCa;

#[test]
fn each_upload_failure_has_its_own_code() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let (key, good) = lab.software_key_with_chain("EC", "sw")?;
    let (other_key, _) = lab.software_key_with_chain("EC", "other")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let key_ref = format!("file:{}", key.display());
    let config = write_config(&lab, &pki, &backend, &good, &key_ref, "errs")?;
    let _serve = Serve::start(&lab, &config)?;

    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()?;
    ensure!(out.status.success(), "openssl pkey -pubout failed");
    let spki = out.stdout;
    let ca = LabCa::load(&lab.path("ca"))?;
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    let sans = vec!["localhost".to_owned()];
    let expired = ca.issue_for_spki(&spki, "localhost", &sans, now - 10 * day, now - day)?;
    let future = ca.issue_for_spki(&spki, "localhost", &sans, now + day, now + 10 * day)?;
    let good_pem = std::fs::read_to_string(&good)?;
    let leaf = good_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap_or_default()
        .to_owned();
    // A foreign intermediate (other subject): chain order. A look-alike intermediate (same
    // subject, other key): bad signature.
    let foreign_int = std::fs::read_to_string(lab.path("mgmt-ca/intermediate.pem"))?;
    lab.run(&["ca", "init-lab", "--dir", &lab.p("ca2")])?;
    let lookalike_int = std::fs::read_to_string(lab.path("ca2/intermediate.pem"))?;

    let cases: Vec<(&str, String, String)> = vec![
        ("certificate_expired", key_ref.clone(), expired),
        ("certificate_not_yet_valid", key_ref.clone(), future),
        (
            "chain_order",
            key_ref.clone(),
            format!("{leaf}{foreign_int}"),
        ),
        (
            "chain_bad_signature",
            key_ref.clone(),
            format!("{leaf}{lookalike_int}"),
        ),
        (
            "key_mismatch",
            format!("file:{}", other_key.display()),
            good_pem.clone(),
        ),
        ("chain_empty", key_ref.clone(), "nothing here".into()),
        (
            "certificate_unparsable",
            key_ref.clone(),
            "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n".into(),
        ),
        (
            "key_reference_invalid",
            "pkcs11:tokn=x".into(),
            good_pem.clone(),
        ),
    ];
    for (code, key, chain) in &cases {
        let body = serde_json::json!({ "key": key, "chain_pem": chain }).to_string();
        let (status, answer) = curl_unix(&lab, "PUT", "/v1/certificates/x", Some(&body))?;
        let v: serde_json::Value = serde_json::from_str(&answer)?;
        ensure!(
            v["error"]["code"] == *code && (400..500).contains(&status),
            "expected {code}, got {status} {answer}"
        );
        ensure!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // The good one goes through; nothing of the refused ones was stored.
    let body = serde_json::json!({ "key": key_ref, "chain_pem": good_pem }).to_string();
    let (status, answer) = curl_unix(&lab, "PUT", "/v1/certificates/x", Some(&body))?;
    ensure!(status == 200, "{status} {answer}");
    let list = ctl_json(&lab, &["certs", "list"])?;
    ensure!(list["items"].as_array().map(Vec::len) == Some(1), "{list}");
    ensure!(list["items"][0]["fingerprint_sha256"] == file_fingerprint(&good)?);
    Ok(())
}
