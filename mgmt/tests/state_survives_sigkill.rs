//! Killing the appliance with SIGKILL in the middle of a stream of uploads always leaves a state
//! directory that loads, each object at its old or its new version, and the appliance starts
//! from it.

mod api_support;
mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use api_support::*;
use common::{demo_backend, Lab, Serve};
use tlsgate_mgmt::state::StateStore;

fn leaf_fingerprint(pem: &str) -> Result<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).context("leaf")?;
    Ok(hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        der.as_ref(),
    )))
}

#[test]
fn sigkill_during_uploads_leaves_old_or_new_objects() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    // Software keys: this test is about the state directory, not the token.
    let (key, v1) = lab.software_key_with_chain("EC", "sw")?;
    let v2 = lab.path("certs/sw-v2.pem");
    lab.run(&[
        "ca",
        "sign",
        "--dir",
        &lab.p("ca"),
        "--csr",
        &lab.p("certs/sw.csr"),
        "--out",
        &v2.display().to_string(),
    ])?;
    let versions: HashSet<String> = [file_fingerprint(&v1)?, file_fingerprint(&v2)?].into();
    ensure!(versions.len() == 2);
    let key_ref = format!("file:{}", key.display());
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &v1, &key_ref, "crash")?;
    let bodies: Vec<String> = [&v1, &v2]
        .iter()
        .map(|c| -> Result<String> {
            Ok(
                serde_json::json!({ "key": key_ref, "chain_pem": std::fs::read_to_string(c)? })
                    .to_string(),
            )
        })
        .collect::<Result<_>>()?;

    let mut total = 0;
    for round in 0..4u64 {
        let serve = Serve::start(&lab, &config)?;
        let stop = Arc::new(AtomicBool::new(false));
        let uploader = {
            let stop = stop.clone();
            let bodies = bodies.clone();
            let sock = lab.p("api.sock");
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("c{}", n % 4);
                    let body = &bodies[(n / 4 % 2) as usize];
                    let path = if n % 5 == 4 {
                        // Bindings too: these publish a snapshot.
                        let b = serde_json::json!({ "certificates": [{ "cert": format!("c{}", n % 2), "default": true }] }).to_string();
                        ("PUT", "/v1/listeners/web/binding".to_owned(), b)
                    } else {
                        ("PUT", format!("/v1/certificates/{id}"), body.clone())
                    };
                    let ok = std::process::Command::new("curl")
                        .args([
                            "-s",
                            "-o",
                            "/dev/null",
                            "--max-time",
                            "5",
                            "--unix-socket",
                            &sock,
                            "-X",
                            path.0,
                        ])
                        .args([
                            "-H",
                            "content-type: application/json",
                            "--data-binary",
                            &path.2,
                        ])
                        .arg(format!("http://localhost{}", path.1))
                        .status()
                        .map(|s| s.success())
                        .unwrap_or(false);
                    if !ok {
                        break;
                    }
                    n += 1;
                }
                n
            })
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos() as u64;
        std::thread::sleep(Duration::from_millis(300 + (nanos + round * 97) % 500));
        let mut guard = serve.guard;
        guard.child.kill()?; // SIGKILL
        guard.child.wait()?;
        stop.store(true, Ordering::Relaxed);
        total += uploader
            .join()
            .map_err(|_| anyhow::anyhow!("uploader panicked"))?;

        // The state loads, and every object is one of the two versions.
        let state = StateStore::open(&lab.path("state"))?.load()?;
        for (id, c) in &state.certs {
            ensure!(
                versions.contains(&leaf_fingerprint(&c.chain_pem)?),
                "certificate {id} is neither version"
            );
        }
        if let Some(b) = state.bindings.get("web") {
            ensure!(
                b.certificates.len() == 1
                    && ["c0", "c1"].contains(&b.certificates[0].cert.as_str()),
                "{b:?}"
            );
            ensure!(
                state.certs.contains_key(&b.certificates[0].cert),
                "binding names a missing certificate"
            );
        }
    }
    ensure!(
        total > 20,
        "only {total} uploads before the kills: the test did not exercise anything"
    );
    // The appliance starts from what is left and serves the bound version.
    let serve = Serve::start(&lab, &config)?;
    let state = StateStore::open(&lab.path("state"))?.load()?;
    if let Some(b) = state.bindings.get("web") {
        let stored = &state.certs[&b.certificates[0].cert];
        ensure!(served_fingerprint(serve.port)? == leaf_fingerprint(&stored.chain_pem)?);
    }
    eprintln!("{total} uploads across 4 SIGKILLs");
    Ok(())
}
