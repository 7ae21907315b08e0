//! Many threads signing with one token key: each uses a session of its own from the pool, and
//! every signature verifies. Prints per-signature cost for the record (asserts nothing on time).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context as _, Result};
use rustls::SignatureScheme;
use tlsgate_hw_tests::{backends, verify::verify};
use tlsgate_keystore::KeySpec;

const THREADS: usize = 4;
const PER_THREAD: usize = 40;

#[test]
fn concurrent_signers_share_a_key_safely() -> Result<()> {
    for backend in backends()? {
        for (spec, scheme) in [
            (KeySpec::EcP256, SignatureScheme::ECDSA_NISTP256_SHA256),
            (KeySpec::Rsa2048, SignatureScheme::RSA_PSS_SHA256),
        ] {
            let Some(key) = backend.generate(spec, &format!("conc-{spec}"))? else {
                continue;
            };
            let spki = Arc::new(key.spki_der.clone());
            let start = Instant::now();
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let signing_key = key.signing_key.clone();
                    let spki = Arc::clone(&spki);
                    std::thread::spawn(move || -> Result<()> {
                        for i in 0..PER_THREAD {
                            let signer = signing_key.choose_scheme(&[scheme]).context("scheme")?;
                            let msg = format!("thread {t} message {i}");
                            let sig = signer.sign(msg.as_bytes())?;
                            verify(&spki, scheme, msg.as_bytes(), &sig)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for w in workers {
                w.join()
                    .map_err(|_| anyhow::anyhow!("signer thread panicked"))??;
            }
            let elapsed = start.elapsed();
            let total = THREADS * PER_THREAD;
            eprintln!(
                "{spec} on {}: {total} signatures (+verify) from {THREADS} threads in {:.1} ms, \
                 {:.0} µs each",
                backend.name(),
                elapsed.as_secs_f64() * 1e3,
                elapsed.as_secs_f64() * 1e6 / total as f64
            );
            ensure!(total == THREADS * PER_THREAD);
        }
    }
    Ok(())
}
