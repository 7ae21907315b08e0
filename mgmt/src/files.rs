//! Small file helpers shared by the commands: atomic writes, PIN generation, key input.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use zeroize::Zeroizing;

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one: write a
/// temporary file in the same directory with `mode`, fsync it, rename it over `path`, fsync the
/// directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync directory {}", dir.display()))
    })();
    if result.is_err() {
        // Best effort: the temporary file is ours and useless after a failure.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` with `mode` (or empties it) and returns it open for writing: for a file
/// written later by a process that may no longer create files in that directory.
pub fn create_truncated(path: &Path, mode: u32) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// A random 16-hex-digit PIN from the kernel's CSPRNG.
pub fn random_pin() -> Result<Zeroizing<String>> {
    let mut bytes = Zeroizing::new([0u8; 8]);
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(bytes.as_mut()))
        .context("cannot read /dev/urandom")?;
    Ok(Zeroizing::new(hex::encode(bytes.as_ref())))
}

/// Reads a PKCS#8 private key PEM (`-----BEGIN PRIVATE KEY-----`). The file's bytes and the
/// decoded key are held in memory that is wiped when dropped.
pub fn read_pkcs8_pem(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let pem =
        Zeroizing::new(fs::read(path).with_context(|| format!("cannot read {}", path.display()))?);
    match PrivatePkcs8KeyDer::from_pem_slice(&pem) {
        Ok(key) => Ok(Zeroizing::new(key.secret_pkcs8_der().to_vec())),
        Err(_) => bail!(
            "{} holds no PKCS#8 private key (expected a `-----BEGIN PRIVATE KEY-----` block; \
             convert others with `openssl pkcs8 -topk8 -nocrypt`)",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_and_sets_mode() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("pin");
        write_atomic(&path, b"one", 0o600)?;
        write_atomic(&path, b"two", 0o600)?;
        assert_eq!(fs::read(&path)?, b"two");
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path())?.collect();
        assert_eq!(leftovers.len(), 1, "no temporary file may remain");
        Ok(())
    }

    #[test]
    fn random_pins_differ() -> Result<()> {
        let a = random_pin()?;
        let b = random_pin()?;
        assert_eq!(a.len(), 16);
        assert_ne!(*a, *b);
        Ok(())
    }

    #[test]
    fn non_pkcs8_input_is_refused_with_a_hint() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("k.pem");
        fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )?;
        let err = read_pkcs8_pem(&path).expect_err("a certificate is not a key");
        assert!(format!("{err:#}").contains("PKCS#8"), "{err:#}");
        Ok(())
    }
}
