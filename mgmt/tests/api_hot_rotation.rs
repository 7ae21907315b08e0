//! Hot rotation: a long-running TLS connection keeps transferring while its listener's
//! certificate is rotated ten times through the API; each new connection sees the new
//! certificate as soon as the API call returns; a failing upload changes nothing; the live
//! connection keeps the certificate it negotiated. With several certificates bound, a rotation
//! changes what one of them serves (and its expiry gauge) and nothing else, as a rebuild would.

mod api_support;
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use api_support::*;
use common::{demo_backend, Lab, Serve};

/// One keep-alive connection that sends requests back to back until `stop`; counts answers.
fn long_connection(
    lab: &Lab,
    port: u16,
    stop: Arc<AtomicBool>,
    answers: Arc<AtomicU64>,
) -> Result<std::thread::JoinHandle<Result<String>>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(
        lab.path("ca/root.pem"),
    )?)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    Ok(std::thread::spawn(move || -> Result<String> {
        let mut first_cert = None;
        let mut reader_buf = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            tls.write_all(b"GET /long HTTP/1.1\r\nhost: localhost\r\n\r\n")?;
            tls.flush()?;
            // Head, then content-length bytes.
            let mut r = BufReader::new(&mut tls);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                ensure!(r.read_line(&mut line)? > 0, "connection closed mid-answer");
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse()?;
                }
            }
            reader_buf.resize(len, 0);
            r.read_exact(&mut reader_buf)?;
            ensure!(reader_buf.starts_with(b"hello from the tlsgate demo backend"));
            drop(r);
            if first_cert.is_none() {
                let der = tls
                    .conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .context("peer cert")?;
                first_cert = Some(hex::encode(aws_lc_rs::digest::digest(
                    &aws_lc_rs::digest::SHA256,
                    der.as_ref(),
                )));
            }
            answers.fetch_add(1, Ordering::Relaxed);
        }
        // The live connection still has what it negotiated.
        let der = tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .context("peer cert")?;
        let now = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            der.as_ref(),
        ));
        ensure!(Some(&now) == first_cert.as_ref());
        Ok(now)
    }))
}

#[test]
fn ten_rotations_under_a_live_connection() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "hot")?;
    let serve = Serve::start(&lab, &config)?;

    // Two token keys; ten chains alternating between them (each signing is a new serial).
    let mut chains = Vec::new();
    for label in ["rot-a", "rot-b"] {
        let first = key_csr_chain(&lab, label)?;
        chains.push((label, first));
    }
    for i in 2..11 {
        let label = if i % 2 == 0 { "rot-a" } else { "rot-b" };
        let out = lab.path(&format!("rot-{i}.pem"));
        lab.sign_csr(&lab.path(&format!("{label}.csr")), &out, None)?;
        chains.push((label, out));
    }
    upload_cert(&lab, "web", chains[0].0, &chains[0].1)?;
    ctl_ok(
        &lab,
        &["listeners", "bind", "--listener", "web", "--cert", "web"],
    )?;
    ensure!(served_fingerprint(serve.port)? == file_fingerprint(&chains[0].1)?);

    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicU64::new(0));
    let live = long_connection(&lab, serve.port, stop.clone(), answers.clone())?;
    let wait_moving = |from: u64| -> Result<u64> {
        let start = std::time::Instant::now();
        loop {
            let n = answers.load(Ordering::Relaxed);
            if n > from {
                return Ok(n);
            }
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "the live connection stopped moving"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let mut seen = wait_moving(0)?;
    let mut took = Vec::new();
    for (i, (label, chain)) in chains.iter().enumerate().skip(1) {
        let t = std::time::Instant::now();
        upload_cert(&lab, "web", label, chain)?;
        took.push(t.elapsed());
        // Right after the call returns, a new connection gets the new certificate.
        ensure!(
            served_fingerprint(serve.port)? == file_fingerprint(chain)?,
            "rotation {i} not served at once"
        );
        if i == 5 {
            // A chain for the other key fails and changes nothing.
            let other = if *label == "rot-a" { "rot-b" } else { "rot-a" };
            ctl_refused(
                &lab,
                &[
                    "certs",
                    "upload",
                    "--id",
                    "web",
                    "--key",
                    other,
                    "--chain",
                    &chain.display().to_string(),
                ],
                "key_mismatch",
            )?;
            ensure!(
                served_fingerprint(serve.port)? == file_fingerprint(chain)?,
                "a failed upload changed the served certificate"
            );
        }
        seen = wait_moving(seen)?;
    }
    stop.store(true, Ordering::Relaxed);
    took.sort();
    eprintln!(
        "rotation through `tlsgate ctl` (process start, validate, persist, publish): median {:?}, max {:?}; {} answers on the live connection",
        took[took.len() / 2],
        took[took.len() - 1],
        answers.load(Ordering::Relaxed)
    );
    let first = live
        .join()
        .map_err(|_| anyhow::anyhow!("live connection thread panicked"))??;
    ensure!(
        first == file_fingerprint(&chains[0].1)?,
        "the live connection's certificate changed"
    );
    ensure!(
        answers.load(Ordering::Relaxed) >= 10,
        "the live connection moved {} times",
        answers.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Five certificates bound to one listener, each for its own name; rotating the middle one
/// (which the management plane patches into the last build instead of rebuilding the listener)
/// changes what that name serves and its expiry gauge, and nothing else; a reload (a full
/// rebuild) then serves exactly the same.
#[test]
fn a_rotation_among_many_bound_changes_only_its_own_names() -> Result<()> {
    let lab = Lab::new()?;
    let pki = MgmtPki::new(&lab)?;
    let boot = lab.token_key_with_chain("ec-p256", "boot")?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let config = write_config(&lab, &pki, &backend, &boot, &common::uri("boot"), "many")?;
    let text = std::fs::read_to_string(&config)?
        .replace("[api]", "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[api]");
    std::fs::write(&config, text)?;
    let serve = Serve::start(&lab, &config)?;
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    let metrics = ready
        .lines()
        .find_map(|l| l.strip_prefix("metrics "))
        .context("ready file names the metrics endpoint")?
        .trim()
        .to_owned();

    let names: Vec<String> = (0..5).map(|i| format!("h{i}.many.test")).collect();
    // `days`: another validity, so the rotated certificate's expiry differs from the old one's.
    let upload = |id: &str, name: &str, version: &str, days: Option<&str>| -> Result<PathBuf> {
        let label = format!("{id}-{version}");
        let (key, mut chain) = lab.software_cert("EC", &label, name, &format!("DNS:{name}"))?;
        if let Some(days) = days {
            chain = lab.path(&format!("certs/{label}-{days}d.pem"));
            lab.sign_csr(&lab.path(&format!("certs/{label}.csr")), &chain, Some(days))?;
        }
        upload_cert(&lab, id, &format!("file:{}", key.display()), &chain)?;
        Ok(chain)
    };
    let mut chains = Vec::new();
    for (i, name) in names.iter().enumerate() {
        chains.push(upload(&format!("c{i}"), name, "v1", None)?);
    }
    let mut bind = vec!["listeners", "bind", "--listener", "web", "--default", "c0"];
    let ids: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    for id in &ids {
        bind.extend(["--cert", id.as_str()]);
    }
    ctl_ok(&lab, &bind)?;
    let served = || -> Result<Vec<String>> {
        names
            .iter()
            .map(|n| served_fingerprint_for(serve.port, n))
            .collect()
    };
    let expected: Vec<String> = chains
        .iter()
        .map(|c| file_fingerprint(c))
        .collect::<Result<_>>()?;
    ensure!(served()? == expected, "before the rotation");

    // The rotation: a new key and chain for c2, valid for 30 days.
    let rotated = upload("c2", &names[2], "v2", Some("30"))?;
    let mut expected_after = expected.clone();
    expected_after[2] = file_fingerprint(&rotated)?;
    ensure!(expected_after[2] != expected[2]);
    let after = served()?;
    ensure!(
        after == expected_after,
        "after rotating c2:\n served   {after:?}\n expected {expected_after:?}"
    );

    // Each certificate's expiry gauge is its own (c2's the new chain's).
    let gauges = common::check(
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                &format!("http://{metrics}/metrics"),
            ])
            .output()?,
        "scrape",
    )?;
    for (i, name) in names.iter().enumerate() {
        let view = ctl_json(&lab, &["certs", "show", "--id", &format!("c{i}")])?;
        let not_after = view["not_after_unix"].as_f64().context("not_after_unix")?;
        let gauge = common::metric(
            &gauges,
            "tlsgate_certificate_not_after_seconds",
            &[
                "listener=\"web\"",
                &format!("certificate=\"c{i}\""),
                &format!("name=\"{name}\""),
            ],
        );
        ensure!(
            gauge == not_after,
            "c{i}: gauge {gauge}, certificate not after {not_after}\n{gauges}"
        );
    }

    // A reload builds every listener anew (`ctl reload` answers once it is live): it serves
    // what the patched build served.
    ctl_ok(&lab, &["reload"])?;
    let reloaded = served()?;
    ensure!(
        reloaded == expected_after,
        "after a reload: {reloaded:?}, expected {expected_after:?}"
    );
    Ok(())
}
