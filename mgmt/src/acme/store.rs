//! What the ACME client keeps in the state directory, one JSON file per certificate set,
//! replaced atomically (temp file, fsync, rename):
//!
//! ```text
//! <dir>/acme/<name>.json          progress: the order in flight, next attempt, keys, last error
//! <dir>/acme/<name>.account.json  the ACME account, its key sealed (AES-256-GCM)
//! ```
//!
//! The account key must be usable by the ACME library, which signs its requests in process, so
//! it cannot live on the token as the certificate keys do. It is stored sealed: AES-256-GCM under
//! a key derived by the token (HMAC-SHA256 with a non-extractable secret, `tlsgate-acme`), so the
//! state directory alone (a backup, a stolen disk) does not give the account away, and the
//! plaintext exists only in wiped memory while the account is loaded.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde::{Deserialize, Serialize};
use tlsgate_keystore::{ObjectType, Pkcs11Uri, Token};
use zeroize::Zeroizing;

/// The token secret the account-sealing key is derived from.
pub const SEAL_SECRET_LABEL: &str = "tlsgate-acme";

pub use crate::api::wire::{ProblemView, SubproblemView};

/// A key to delete from the token once the certificate it served has expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredKey {
    pub label: String,
    pub delete_after_unix: u64,
}

/// One certificate set's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    /// The order placed and not finished: a restart resumes it instead of placing another.
    pub order_url: Option<String>,
    /// The token key the order's CSR is (or will be) signed with.
    pub order_key: Option<String>,
    /// The token key of the certificate served now.
    pub current_key: Option<String>,
    /// Do not try before this (back-off after a failure, a CA's Retry-After).
    pub next_attempt_unix: Option<u64>,
    /// Failures in a row (the back-off's exponent).
    pub failures: u32,
    pub last_error: Option<ProblemView>,
    pub retired_keys: Vec<RetiredKey>,
    /// Orders placed so far (for status; the metric counts outcomes).
    pub orders_placed: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountFile {
    directory: String,
    /// Hex of nonce ‖ AES-256-GCM(credentials JSON).
    sealed: String,
}

/// The `acme/` folder of the state directory.
#[derive(Debug, Clone)]
pub struct AcmeStore {
    dir: PathBuf,
    /// Held while the sealing secret is looked up and, on first use, generated: every
    /// `[[acme]]` entry starts at once, and two that both found none would make two secrets
    /// with one label, after which neither derives (the label no longer names one key). Shared
    /// by the clones each entry holds.
    seal: std::sync::Arc<parking_lot::Mutex<()>>,
}

impl AcmeStore {
    pub fn open(state_dir: &Path) -> Result<AcmeStore> {
        let dir = state_dir.join("acme");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(AcmeStore {
            dir,
            seal: std::sync::Arc::new(parking_lot::Mutex::new(())),
        })
    }

    fn progress_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn account_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.account.json"))
    }

    pub fn load_progress(&self, name: &str) -> Result<Progress> {
        let path = self.progress_path(name);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Progress::default()),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    pub fn save_progress(&self, name: &str, p: &Progress) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(p)?;
        crate::files::write_atomic(&self.progress_path(name), &bytes, 0o600)
    }

    /// The stored account credentials (JSON) for `directory`, unsealed; `None` when there is
    /// none or it belongs to another directory.
    pub fn load_account(
        &self,
        name: &str,
        directory: &str,
        token: &Token,
    ) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let path = self.account_path(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        self.unseal_account(name, directory, token, &bytes)
            .with_context(|| format!("{}", path.display()))
    }

    pub fn save_account(
        &self,
        name: &str,
        directory: &str,
        token: &Token,
        credentials_json: &[u8],
    ) -> Result<()> {
        let sealed = self.seal_account(name, directory, token, credentials_json)?;
        crate::files::write_atomic(&self.account_path(name), &sealed, 0o600)
    }

    /// Account credentials (JSON) from a sealed account file's bytes (the state directory's, or
    /// the fleet's in etcd); `None` when they belong to another directory.
    pub fn unseal_account(
        &self,
        name: &str,
        directory: &str,
        token: &Token,
        bytes: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let file: AccountFile = serde_json::from_slice(bytes).context("account file")?;
        if file.directory != directory {
            return Ok(None);
        }
        let mut sealed = hex::decode(&file.sealed).context("account file: sealed is not hex")?;
        if sealed.len() < NONCE_LEN {
            bail!("account file: sealed too short");
        }
        let key = self.sealing_key(token, name, directory)?;
        let (nonce, body) = sealed.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow!("nonce"))?;
        let plain = key
            .open_in_place(nonce, Aad::from(directory.as_bytes()), body)
            .map_err(|_| anyhow!("the account does not unseal with this token's key"))?;
        Ok(Some(Zeroizing::new(plain.to_vec())))
    }

    /// The bytes of a sealed account file for these credentials (JSON).
    pub fn seal_account(
        &self,
        name: &str,
        directory: &str,
        token: &Token,
        credentials_json: &[u8],
    ) -> Result<Vec<u8>> {
        let key = self.sealing_key(token, name, directory)?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| anyhow!("random nonce"))?;
        let mut body = Zeroizing::new(credentials_json.to_vec());
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(directory.as_bytes()),
            &mut *body,
        )
        .map_err(|_| anyhow!("seal the account"))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&body);
        let file = AccountFile {
            directory: directory.to_owned(),
            sealed: hex::encode(sealed),
        };
        Ok(serde_json::to_vec_pretty(&file)?)
    }

    /// AES-256-GCM key = HMAC-SHA256(token secret, "tlsgate acme account v1" ‖ name ‖ directory),
    /// computed on the token; the secret is generated there on first use.
    fn sealing_key(&self, token: &Token, name: &str, directory: &str) -> Result<LessSafeKey> {
        let uri = Pkcs11Uri {
            token: Some(token.label().to_owned()),
            object: Some(SEAL_SECRET_LABEL.to_owned()),
            object_type: Some(ObjectType::SecretKey),
            ..Pkcs11Uri::default()
        };
        {
            let _one_at_a_time = self.seal.lock();
            if token.find_secret(&uri).is_err() {
                token
                    .generate_hmac_secret(SEAL_SECRET_LABEL, None)
                    .context("generate the account-sealing secret on the token")?;
            }
        }
        let mut input = b"tlsgate acme account v1\0".to_vec();
        input.extend_from_slice(name.as_bytes());
        input.push(0);
        input.extend_from_slice(directory.as_bytes());
        let mac = token
            .hmac_sha256(&uri, &input)
            .context("derive the account-sealing key on the token")?;
        let key = UnboundKey::new(&AES_256_GCM, &mac[..]).map_err(|_| anyhow!("AES key"))?;
        Ok(LessSafeKey::new(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `[[acme]]` entry starts at once: on a fresh token they all look for the sealing
    /// secret together, and exactly one secret may result, else no account ever unseals.
    #[test]
    fn entries_starting_together_make_one_sealing_secret() -> Result<()> {
        use tlsgate_hw_tests::softhsm::{self, TestToken};
        if let Some(why) = softhsm::unavailable() {
            tlsgate_hw_tests::skip::missing(why);
            return Ok(());
        }
        let test_token = TestToken::new()?;
        let token = test_token.open()?;
        let dir = tempfile::tempdir()?;
        let store = AcmeStore::open(dir.path())?;
        let directory = "https://ca.example/dir";
        let sealed: Vec<Result<()>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|i| {
                    let (store, token) = (&store, &token);
                    s.spawn(move || {
                        store.save_account(&format!("e{i}"), directory, token, b"{\"k\":1}")
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|_| Err(anyhow!("worker panicked"))))
                .collect()
        });
        for r in sealed {
            r?;
        }
        for i in 0..8 {
            let back = store.load_account(&format!("e{i}"), directory, &token)?;
            assert_eq!(
                back.as_deref().map(|v| v.as_slice()),
                Some(&b"{\"k\":1}"[..])
            );
        }
        Ok(())
    }

    #[test]
    fn progress_round_trips_and_absent_is_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = AcmeStore::open(dir.path()).expect("open");
        assert_eq!(s.load_progress("www").expect("load"), Progress::default());
        let p = Progress {
            order_url: Some("https://ca/order/1".into()),
            failures: 2,
            ..Progress::default()
        };
        s.save_progress("www", &p).expect("save");
        assert_eq!(s.load_progress("www").expect("load"), p);
    }
}
