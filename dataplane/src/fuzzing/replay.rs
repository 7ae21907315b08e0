//! The data plane's fuzz targets on stable, inside the test suite (see `harness`).

use super::harness::{mutate, replay, Rng};

#[test]
fn client_hello_corpus_and_generated_inputs() {
    assert!(replay("client_hello", 10_000, super::client_hello) >= 10_000);
}

#[test]
fn proxy_v2_corpus_and_generated_inputs() {
    assert!(replay("proxy_v2", 10_000, super::proxy_v2_round_trip) >= 10_000);
}

#[test]
fn conn_core_corpus_and_generated_inputs() {
    assert!(replay("conn_core", 5000, super::conn_core) >= 5000);
}

#[test]
fn the_mutator_is_deterministic_and_changes_its_input() {
    let seed = b"a corpus entry".to_vec();
    let pool = vec![seed.clone()];
    let (mut a, mut b) = (Rng::new("t"), Rng::new("t"));
    let changed = (0..100)
        .filter(|_| {
            let (x, y) = (mutate(&mut a, &seed, &pool), mutate(&mut b, &seed, &pool));
            assert_eq!(x, y);
            x != seed
        })
        .count();
    assert!(
        changed > 80,
        "only {changed} of 100 mutations changed the input"
    );
}
