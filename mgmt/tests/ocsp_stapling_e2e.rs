//! OCSP stapling through the real binary with responses made by `openssl ocsp` (a real
//! responder's signing code) from an index file: a good response is stapled and seen by
//! `openssl s_client -status`; a revoked one and one signed by the wrong CA are not stapled,
//! and the refusals are counted; the checks themselves refuse stale and future responses and a
//! response for another certificate.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use common::ocsp_support::{openssl, response, s_client_status};
use common::{uri, Lab, Serve};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tlsgate_mgmt::ocsp::{self, OcspError};

fn openssl_available() -> bool {
    common::require("openssl", "openssl")
}

fn scrape(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn good_responses_are_stapled_and_bad_ones_refused_and_counted() -> Result<()> {
    if !openssl_available() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let chain = lab.token_key_with_chain("ec-p256", "web")?;
    let leaf = lab.path("leaf.pem");
    openssl(&[
        "x509",
        "-in",
        &chain.display().to_string(),
        "-out",
        &leaf.display().to_string(),
    ])?;
    let by_issuer = ("ca/intermediate.pem", "ca/intermediate.key");
    let good = response(&lab, "good", &leaf, false, by_issuer)?;
    let revoked = response(&lab, "revoked", &leaf, true, by_issuer)?;
    let wrong_signer = response(&lab, "wrong", &leaf, false, ("ca/root.pem", "ca/root.key"))?;

    // The checks, straight.
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&chain)?.collect::<Result<_, _>>()?;
    let good_der = std::fs::read(&good)?;
    let now = SystemTime::now();
    let status = ocsp::check(&good_der, &certs, now).expect("good response");
    assert!(status.this_update <= now && now < status.next_update);
    assert_eq!(
        ocsp::check(&good_der, &certs, now + Duration::from_secs(3 * 86400)),
        Err(OcspError::Stale)
    );
    assert_eq!(
        ocsp::check(&good_der, &certs, now - Duration::from_secs(86400)),
        Err(OcspError::NotYetValid)
    );
    // A responder clock slightly ahead of ours (or a response made in the second after we read
    // the clock) is tolerated up to the bound, and not past it.
    assert!(ocsp::check(
        &good_der,
        &certs,
        status.this_update - Duration::from_secs(2)
    )
    .is_ok());
    assert!(ocsp::check(&good_der, &certs, status.this_update - ocsp::MAX_CLOCK_SKEW).is_ok());
    assert_eq!(
        ocsp::check(
            &good_der,
            &certs,
            status.this_update - ocsp::MAX_CLOCK_SKEW - Duration::from_secs(1)
        ),
        Err(OcspError::NotYetValid)
    );
    assert_eq!(
        ocsp::check(&std::fs::read(&revoked)?, &certs, now),
        Err(OcspError::Revoked)
    );
    assert_eq!(
        ocsp::check(&std::fs::read(&wrong_signer)?, &certs, now),
        Err(OcspError::BadSignature)
    );
    // The same response for another certificate (the intermediate, issued by the root) is not
    // for it.
    let other_chain = vec![certs[1].clone(), root_of(&lab)?];
    assert!(matches!(
        ocsp::check(&good_der, &other_chain, now),
        Err(OcspError::BadSignature | OcspError::WrongCertificate { .. })
    ));

    // Through the appliance.
    let config = lab.path("ocsp.toml");
    let listener = |name: &str, resp: &Path| {
        format!(
            "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:9\"\n\
             [[listener.certificate]]\nchain = \"{}\"\nkey = \"{}\"\nocsp = \"{}\"\n",
            chain.display(),
            uri("web"),
            resp.display()
        )
    };
    std::fs::write(
        &config,
        format!(
            "[pkcs11]\ntoken = \"lab\"\npin = \"file:{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
             [dataplane]\ncores = [0]\n{}{}{}",
            lab.p("token/user.pin"),
            listener("good", &good),
            listener("revoked", &revoked),
            listener("wrong", &wrong_signer),
        ),
    )?;
    let serve = Serve::start(&lab, &config)?;
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    let addr_of = |name: &str| -> Result<String> {
        ready
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|s| s.trim().to_owned())
            .with_context(|| format!("{name} in {ready}"))
    };

    let out = s_client_status(&addr_of("good")?)?;
    assert!(
        out.contains("OCSP Response Status: successful") && out.contains("Cert Status: good"),
        "good: {out}"
    );
    for name in ["revoked", "wrong"] {
        let out = s_client_status(&addr_of(name)?)?;
        assert!(
            out.contains("OCSP response: no response sent"),
            "{name}: nothing stapled: {out}"
        );
    }
    let text = scrape(&addr_of("metrics")?)?;
    let has = |needle: &[&str]| {
        text.lines()
            .any(|l| !l.starts_with('#') && needle.iter().all(|n| l.contains(n)))
    };
    assert!(
        has(&[
            "tlsgate_ocsp_responses_refused_total{",
            "listener=\"revoked\"",
            "reason=\"revoked\""
        ]),
        "{text}"
    );
    assert!(
        has(&[
            "tlsgate_ocsp_responses_refused_total{",
            "listener=\"wrong\"",
            "reason=\"bad_signature\""
        ]),
        "{text}"
    );
    let next = text
        .lines()
        .find(|l| {
            l.starts_with("tlsgate_ocsp_response_next_update_timestamp_seconds{")
                && l.contains("listener=\"good\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .context("next-update gauge for the good listener")?;
    let expect = status
        .next_update
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs() as f64;
    assert!((next - expect).abs() < 2.0, "gauge {next} vs {expect}");
    serve.signal("TERM")?;
    Ok(())
}

fn root_of(lab: &Lab) -> Result<CertificateDer<'static>> {
    Ok(CertificateDer::from_pem_file(lab.path("ca/root.pem"))?)
}

#[test]
fn a_response_fetched_from_the_responder_in_the_certificate_is_stapled() -> Result<()> {
    if !openssl_available() {
        return Ok(());
    }
    let lab = Lab::new()?;
    // The lab CA (made by the key ceremony), then a leaf whose AIA names our responder.
    let _ = lab.token_key_with_chain("ec-p256", "unused")?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let (key, chain, _) = common::ocsp_support::aia_leaf(&lab, "aia", port, 4242)?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&chain)?.collect::<Result<_, _>>()?;
    assert_eq!(
        ocsp::responder_url(&certs[0]).as_deref(),
        Some(format!("http://127.0.0.1:{port}/").as_str())
    );

    // openssl ocsp as the responder on 127.0.0.1.
    let index = lab.path("aia.index");
    std::fs::write(&index, "V\t491231235959Z\t\t1092\tunknown\t/CN=localhost\n")?;
    // It says "ACCEPT" once listening; a bare probe connection would block it (it
    // serves one connection at a time and waits on a silent one).
    let log = lab.path("responder.log");
    let log_file = std::fs::File::create(&log)?;
    let child = Command::new("openssl")
        .args(["ocsp", "-index"])
        .arg(&index)
        .args(["-port", &port.to_string(), "-rsigner"])
        .arg(lab.path("ca/intermediate.pem"))
        .arg("-rkey")
        .arg(lab.path("ca/intermediate.key"))
        .arg("-CA")
        .arg(lab.path("ca/intermediate.pem"))
        .args(["-ndays", "1"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()?;
    let mut responder = common::ChildGuard {
        child,
        name: "openssl ocsp",
    };
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&log)?.contains("ACCEPT") {
        if let Some(status) = responder.child.try_wait()? {
            anyhow::bail!(
                "openssl ocsp exited: {status}: {}",
                std::fs::read_to_string(&log)?
            );
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "responder not listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let fetched = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(ocsp::fetch(&certs, Duration::from_secs(5)))?;
    ocsp::check(&fetched, &certs, SystemTime::now()).expect("the fetched response checks");

    let config = lab.path("aia.toml");
    std::fs::write(
        &config,
        format!(
            "[dataplane]\ncores = [0]\n\n[[listener]]\nname = \"aia\"\nbind = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:9\"\n\
             [[listener.certificate]]\nchain = \"{}\"\nkey = \"file:{}\"\nocsp_fetch = true\n",
            chain.display(),
            key.display()
        ),
    )?;
    let serve = Serve::start(&lab, &config)?;
    let out = s_client_status(&serve.addr)?;
    assert!(
        out.contains("OCSP Response Status: successful") && out.contains("Cert Status: good"),
        "fetched and stapled: {out}"
    );
    serve.signal("TERM")?;
    Ok(())
}

/// A responder certificate issued by `ca/intermediate` with (or without) id-kp-OCSPSigning.
fn delegate(lab: &Lab, name: &str, ocsp_signing: bool) -> Result<(String, String)> {
    let key = format!("{name}.key");
    let csr = lab.path(&format!("{name}.csr"));
    let ext = lab.path(&format!("{name}.ext"));
    let cert = format!("{name}.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &lab.p(&key),
    ])?;
    openssl(&[
        "req",
        "-new",
        "-key",
        &lab.p(&key),
        "-subj",
        &format!("/CN={name}"),
        "-out",
        &csr.display().to_string(),
    ])?;
    let eku = if ocsp_signing {
        "extendedKeyUsage=OCSPSigning\n"
    } else {
        "extendedKeyUsage=serverAuth\n"
    };
    std::fs::write(&ext, eku)?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr.display().to_string(),
        "-CA",
        &lab.p("ca/intermediate.pem"),
        "-CAkey",
        &lab.p("ca/intermediate.key"),
        "-set_serial",
        "77",
        "-days",
        "2",
        "-extfile",
        &ext.display().to_string(),
        "-out",
        &lab.p(&cert),
    ])?;
    Ok((cert, key))
}

#[test]
fn a_delegated_responder_needs_the_ocsp_signing_usage() -> Result<()> {
    if !openssl_available() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let chain = lab.token_key_with_chain("ec-p256", "web")?;
    let leaf = lab.path("leaf.pem");
    openssl(&[
        "x509",
        "-in",
        &chain.display().to_string(),
        "-out",
        &leaf.display().to_string(),
    ])?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&chain)?.collect::<Result<_, _>>()?;
    let now = SystemTime::now();

    let (cert, key) = delegate(&lab, "responder", true)?;
    let good = response(&lab, "delegated", &leaf, false, (&cert, &key))?;
    let status = ocsp::check(&std::fs::read(&good)?, &certs, now)
        .expect("signed by a delegated responder of the issuer");
    assert!(ocsp::wake_at(&status, now) < status.next_update);
    assert!(
        ocsp::wake_at(&status, status.next_update - Duration::from_secs(1)) == status.next_update
    );

    let (cert, key) = delegate(&lab, "not-a-responder", false)?;
    let bad = response(&lab, "undelegated", &leaf, false, (&cert, &key))?;
    assert_eq!(
        ocsp::check(&std::fs::read(&bad)?, &certs, now),
        Err(OcspError::BadSignature),
        "a certificate without id-kp-OCSPSigning may not answer for its issuer"
    );
    Ok(())
}
