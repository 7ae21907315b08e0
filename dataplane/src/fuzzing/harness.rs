//! The replay harness for the fuzz targets on stable (data plane and management plane tests
//! both use it): every corpus and regression file under `fuzz/`, then inputs mutated from them
//! by a seeded generator (the same ones on every run). A failure names the file, or prints the
//! generated input in hex: save it under `fuzz/regressions/<target>/` to keep it.
#![allow(dead_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// splitmix64: small, seeded, good enough to pick mutations.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: &str) -> Self {
        Self(seed.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// One to four libFuzzer-style mutations of `seed` (bit flips, interesting bytes, inserts,
/// deletes, truncation, splicing with another corpus entry, copying a range).
pub(crate) fn mutate(rng: &mut Rng, seed: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = [0, 1, 0x7f, 0x80, 0xff, rng.byte()][rng.below(6)];
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                v.drain(i..i + n);
            }
            4 => v.truncate(rng.below(len + 1)),
            5 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            6 if len > 1 => {
                let a = rng.below(len);
                let n = 1 + rng.below((len - a).min(32));
                let chunk = v[a..a + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            _ => {
                if let Some(b) = v.last_mut() {
                    *b = b.wrapping_add(1);
                }
            }
        }
    }
    v
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The checked-in corpus and regressions of `target`, sorted by path.
pub(crate) fn files(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

fn run_one(f: fn(&[u8]), input: &[u8]) -> bool {
    catch_unwind(AssertUnwindSafe(|| f(input))).is_ok()
}

/// Runs `f` on every file of `target` and on `generated` inputs made from them; returns how
/// many inputs ran.
pub(crate) fn replay(target: &str, generated: usize, f: fn(&[u8])) -> usize {
    let files = files(target);
    assert!(
        files.iter().any(|(p, _)| p
            .parent()
            .is_some_and(|d| d.ends_with(Path::new("corpus").join(target)))),
        "fuzz/corpus/{target} is empty or missing"
    );
    for (path, bytes) in &files {
        assert!(run_one(f, bytes), "{target}: {path:?} fails");
    }
    let pool: Vec<Vec<u8>> = files.into_iter().map(|(_, b)| b).collect();
    let mut rng = Rng::new(target);
    for i in 0..generated {
        let input = if i % 10 == 9 {
            let n = rng.below(600);
            (0..n).map(|_| rng.byte()).collect()
        } else {
            let seed = &pool[rng.below(pool.len())];
            mutate(&mut rng, seed, &pool)
        };
        assert!(
            run_one(f, &input),
            "{target}: generated input #{i} fails; save it as a regression:\n{}",
            input.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
    }
    pool.len() + generated
}
