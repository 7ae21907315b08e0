//! `tlsgate-floor` end to end: it times every primitive its model uses and the floors come out in
//! the order the protocol implies.

use std::process::Command;

#[test]
fn floors_are_complete_and_ordered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("floor.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tlsgate-floor"))
        .args(["--seconds", "0.05", "--json"])
        .arg(&json)
        .output()
        .expect("run tlsgate-floor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written")).expect("JSON");
    let prim = r["primitives_us"].as_object().expect("primitives");
    // Every primitive the model counts was timed, and took time.
    for (floor, parts) in r["model"].as_object().expect("model") {
        for part in parts.as_array().expect("parts") {
            let name = part[0].as_str().expect("name");
            let us = prim.get(name).and_then(|v| v.as_f64());
            assert!(
                us.is_some_and(|us| us > 0.0),
                "{floor} uses {name}, timed as {us:?}"
            );
        }
    }
    let f = |name: &str| r["floors_us"][name].as_f64().expect(name);
    // An RSA-2048 signature costs more than an ECDSA P-256 one; ML-KEM adds to X25519; a TLS 1.2
    // resumption (no key exchange) is the cheapest handshake.
    assert!(f("full_tls13_rsa") > f("full_tls13_ecdsa"), "{r:#}");
    assert!(
        f("full_tls13_x25519mlkem768_ecdsa") > f("full_tls13_ecdsa"),
        "{r:#}"
    );
    assert!(f("full_tls13_ecdsa") > f("resume_tls13"), "{r:#}");
    assert!(f("resume_tls13") > f("resume_tls12"), "{r:#}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("full_tls13_ecdsa"), "{text}");
}
