//! `tlsgate-floor`: the crypto floor of a TLS handshake on one core.
//!
//! Times, with aws-lc-rs (the library tlsgate uses), the primitives a server cannot avoid in
//! one handshake, and adds them up per handshake kind. A server's measured CPU per handshake
//! divided by this floor says how much it spends on everything else (TCP, syscalls, parsing,
//! allocation, bookkeeping). The model of each handshake (how many HKDF/HMAC calls, records,
//! hashed bytes) is printed with the figures and written to the JSON.
#![forbid(unsafe_code)]

#[allow(dead_code)] // the generator uses the rest
mod procstat;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use aws_lc_rs::kem::{DecapsulationKey, EncapsulationKey, ML_KEM_768};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use aws_lc_rs::{digest, hkdf, hmac};
use clap::Parser;
use serde::Serialize;

/// The crypto floor of a TLS handshake: the cost of the primitives a server cannot avoid, on
/// one core, with aws-lc-rs.
#[derive(Debug, Parser)]
#[command(name = "tlsgate-floor", version)]
struct Args {
    /// Pin to this CPU (the core the server under test runs on).
    #[arg(long)]
    pin_cpu: Option<usize>,
    /// Time spent on each primitive, in seconds (the median of 5 batches is kept).
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Bytes per handshake record the model seals or opens (small records: handshake messages,
/// tickets, one short request and response, close_notify).
const SMALL_RECORD: usize = 128;
/// The server's first encrypted flight in TLS 1.3 (EncryptedExtensions, Certificate with one
/// certificate, CertificateVerify, Finished), in one record.
const FLIGHT_RECORD: usize = 1280;
/// Handshake transcript hashed by the server (ClientHello .. client Finished).
const TRANSCRIPT_BYTES: usize = 1536;

#[derive(Debug, Serialize)]
struct Report {
    cpu_model: String,
    pinned_cpu: Option<usize>,
    /// µs per call.
    primitives_us: BTreeMap<&'static str, f64>,
    /// µs per handshake, by kind (see `model`).
    floors_us: BTreeMap<String, f64>,
    /// What each floor is made of: primitive name → calls per handshake.
    model: BTreeMap<String, Vec<(&'static str, u32)>>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(cpu) = args.pin_cpu {
        procstat::pin_to_cpu(cpu)?;
    }
    let budget = Duration::try_from_secs_f64(args.seconds / 5.0)
        .with_context(|| format!("--seconds {} is not a valid duration", args.seconds))?;
    let rng = SystemRandom::new();
    let mut p: BTreeMap<&'static str, f64> = BTreeMap::new();

    // Key exchange, server side: a fresh key pair and the shared secret with the client's share.
    let client_x25519 = EphemeralPrivateKey::generate(&agreement::X25519, &rng)
        .map_err(|_| anyhow!("X25519 key generation failed"))?
        .compute_public_key()
        .map_err(|_| anyhow!("X25519 public key"))?;
    let client_x25519 = client_x25519.as_ref().to_vec();
    p.insert(
        "x25519_share",
        time(budget, || {
            let me = EphemeralPrivateKey::generate(&agreement::X25519, &rng)?;
            black_box(me.compute_public_key()?);
            agreement::agree_ephemeral(
                me,
                UnparsedPublicKey::new(&agreement::X25519, &client_x25519),
                aws_lc_rs::error::Unspecified,
                |s| Ok(black_box(s.len())),
            )?;
            Ok(())
        })?,
    );
    // ML-KEM-768, server side: encapsulate to the client's key (the X25519 half is above).
    let client_kem = DecapsulationKey::generate(&ML_KEM_768)
        .map_err(|_| anyhow!("ML-KEM-768 key generation failed"))?;
    let client_ek = client_kem
        .encapsulation_key()
        .and_then(|k| k.key_bytes())
        .map_err(|_| anyhow!("ML-KEM-768 encapsulation key"))?;
    let client_ek = client_ek.as_ref().to_vec();
    p.insert(
        "mlkem768_encapsulate",
        time(budget, || {
            let ek = EncapsulationKey::new(&ML_KEM_768, &client_ek)
                .map_err(|_| aws_lc_rs::error::Unspecified)?;
            black_box(ek.encapsulate()?);
            Ok(())
        })?,
    );

    // One signature: CertificateVerify (TLS 1.3) or ServerKeyExchange (TLS 1.2).
    let message = [0x20u8; 130]; // 64 spaces, a context string, a transcript hash
    let ecdsa = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_ASN1_SIGNING)
        .map_err(|_| anyhow!("P-256 key generation failed"))?;
    black_box(ecdsa.public_key());
    p.insert(
        "ecdsa_p256_sign",
        time(budget, || {
            black_box(ecdsa.sign(&rng, &message)?);
            Ok(())
        })?,
    );
    let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| anyhow!("RSA-2048 key generation failed"))?;
    let mut rsa_sig = vec![0u8; rsa.public_modulus_len()];
    p.insert(
        "rsa2048_pss_sign",
        time(budget, || {
            rsa.sign(&signature::RSA_PSS_SHA256, &rng, &message, &mut rsa_sig)?;
            black_box(&rsa_sig);
            Ok(())
        })?,
    );

    // Key schedule pieces (SHA-256 suites).
    let ikm = [7u8; 32];
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &[0u8; 32]);
    p.insert(
        "hkdf_sha256_extract",
        time(budget, || {
            black_box(salt.extract(&ikm));
            Ok(())
        })?,
    );
    let prk = salt.extract(&ikm);
    let info = [0x11u8; 48];
    p.insert(
        "hkdf_sha256_expand_label",
        time(budget, || {
            let mut out = [0u8; 32];
            prk.expand(&[&info], hkdf::HKDF_SHA256)?.fill(&mut out)?;
            black_box(out);
            Ok(())
        })?,
    );
    let hkey = hmac::Key::new(hmac::HMAC_SHA256, &[9u8; 48]);
    p.insert(
        "hmac_sha256",
        time(budget, || {
            black_box(hmac::sign(&hkey, &info));
            Ok(())
        })?,
    );
    let transcript = vec![0x42u8; TRANSCRIPT_BYTES];
    p.insert(
        "sha256_transcript",
        time(budget, || {
            black_box(digest::digest(&digest::SHA256, &transcript));
            Ok(())
        })?,
    );

    // Records (AES-128-GCM): seal and open.
    let key = LessSafeKey::new(
        UnboundKey::new(&aead::AES_128_GCM, &[3u8; 16]).map_err(|_| anyhow!("AES key"))?,
    );
    for (name, size) in [
        ("aes128gcm_seal_small", SMALL_RECORD),
        ("aes128gcm_seal_flight", FLIGHT_RECORD),
    ] {
        let mut buf = Vec::with_capacity(size + 16);
        p.insert(
            name,
            time(budget, || {
                buf.clear();
                buf.resize(size, 0x17);
                key.seal_in_place_append_tag(
                    Nonce::assume_unique_for_key([0u8; 12]),
                    Aad::from([0x17, 3, 3, 0, 0]),
                    &mut buf,
                )?;
                black_box(&buf);
                Ok(())
            })?,
        );
    }
    let mut sealed = vec![0x17u8; SMALL_RECORD];
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([0u8; 12]),
        Aad::from([0x17, 3, 3, 0, 0]),
        &mut sealed,
    )
    .map_err(|_| anyhow!("seal"))?;
    let mut scratch = Vec::with_capacity(sealed.len());
    p.insert(
        "aes128gcm_open_small",
        time(budget, || {
            scratch.clear();
            scratch.extend_from_slice(&sealed);
            black_box(key.open_in_place(
                Nonce::assume_unique_for_key([0u8; 12]),
                Aad::from([0x17, 3, 3, 0, 0]),
                &mut scratch,
            )?);
            Ok(())
        })?,
    );

    let model = model();
    let floors_us = model
        .iter()
        .map(|(name, parts)| {
            let us = parts
                .iter()
                .map(|(prim, n)| p.get(prim).copied().unwrap_or(0.0) * f64::from(*n))
                .sum();
            (name.clone(), us)
        })
        .collect();
    let report = Report {
        cpu_model: cpu_model(),
        pinned_cpu: args.pin_cpu,
        primitives_us: p,
        floors_us,
        model,
    };
    print(&report);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).context("serialise report")?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("write --json {}", path.display()))?;
    }
    Ok(())
}

/// What a server computes per handshake, in calls per primitive. TLS 1.3 (RFC 8446 §7.1):
/// three HKDF-Extract (early, handshake, master), Derive-Secret/Expand-Label for the two
/// `derived` secrets, four traffic secrets, the exporter and resumption secrets, two finished
/// keys, a key and an IV for each of the four traffic secrets and one ticket PSK (16 expands);
/// two Finished HMACs; the transcript hashed once. Records: the server's flight, two tickets, the
/// response and close_notify sealed; client Finished, the request and close_notify opened.
/// TLS 1.2 (RFC 5246 §5, 7919, 5077): the PRF (P_SHA256) for the extended master secret
/// (2 iterations, 4 HMAC), the key block (2 iterations, 4 HMAC) and two Finished (2 HMAC each);
/// records: Finished, ticket, response, close_notify sealed; Finished, request, close_notify
/// opened. A TLS 1.3 resumption keeps the X25519 exchange (PSK with DHE) and adds the binder
/// HMAC, without a certificate or signature; a TLS 1.2 resumption has no key exchange at all.
fn model() -> BTreeMap<String, Vec<(&'static str, u32)>> {
    let tls13_common = [
        ("hkdf_sha256_extract", 3),
        ("hkdf_sha256_expand_label", 16),
        ("hmac_sha256", 2),
        ("sha256_transcript", 1),
        ("aes128gcm_seal_small", 4),
        ("aes128gcm_open_small", 3),
    ];
    let tls12_common = [
        ("hmac_sha256", 12),
        ("sha256_transcript", 1),
        ("aes128gcm_seal_small", 4),
        ("aes128gcm_open_small", 3),
    ];
    let mut m = BTreeMap::new();
    for (key, sign) in [("ecdsa", "ecdsa_p256_sign"), ("rsa", "rsa2048_pss_sign")] {
        let mut v13 = vec![("x25519_share", 1), (sign, 1), ("aes128gcm_seal_flight", 1)];
        v13.extend(tls13_common);
        let mut v13pq = v13.clone();
        v13pq.push(("mlkem768_encapsulate", 1));
        let mut v12 = vec![("x25519_share", 1), (sign, 1)];
        v12.extend(tls12_common);
        m.insert(format!("full_tls13_{key}"), v13);
        m.insert(format!("full_tls13_x25519mlkem768_{key}"), v13pq);
        m.insert(format!("full_tls12_{key}"), v12);
    }
    let mut r13 = vec![("x25519_share", 1), ("hmac_sha256", 1)];
    r13.extend(tls13_common);
    m.insert("resume_tls13".to_owned(), r13);
    m.insert("resume_tls12".to_owned(), tls12_common.to_vec());
    m
}

/// µs per call of `f`: the median of five batches, each running for `budget`.
fn time(
    budget: Duration,
    mut f: impl FnMut() -> Result<(), aws_lc_rs::error::Unspecified>,
) -> Result<f64> {
    // Warm up caches and lazy initialisation.
    for _ in 0..10 {
        f().map_err(|_| anyhow!("a primitive failed"))?;
    }
    let mut batches = Vec::with_capacity(5);
    for _ in 0..5 {
        let start = procstat::own_cpu();
        let wall = Instant::now();
        let mut n = 0u64;
        while wall.elapsed() < budget || n < 10 {
            f().map_err(|_| anyhow!("a primitive failed"))?;
            n += 1;
        }
        // CPU time, not wall time: a busy machine preempts the loop, which must not count.
        let cpu = procstat::own_cpu().saturating_sub(start);
        batches.push(cpu.as_secs_f64() * 1e6 / n as f64);
    }
    batches.sort_by(f64::total_cmp);
    Ok(batches[2])
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn print(r: &Report) {
    println!(
        "tlsgate-floor  cpu={} pinned={:?}",
        r.cpu_model, r.pinned_cpu
    );
    println!("  primitive                       µs/call");
    for (name, us) in &r.primitives_us {
        println!("  {name:<30} {us:>8.2}");
    }
    println!("  handshake floor                 µs/handshake  (made of)");
    for (name, us) in &r.floors_us {
        let parts: Vec<String> = r.model[name]
            .iter()
            .map(|(p, n)| format!("{n}x {p}"))
            .collect();
        println!("  {name:<30} {us:>8.1}  ({})", parts.join(", "));
    }
}
