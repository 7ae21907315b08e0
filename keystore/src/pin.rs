//! Where a token's user PIN comes from. PINs are never part of a config file or a URI in clear:
//! they come from an environment variable or from a file only its owner can read.

use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// A PIN source: `env:VAR` or `file:PATH`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum PinSource {
    Env(String),
    File(PathBuf),
}

impl fmt::Debug for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Naming the source is safe; the PIN itself is never held here.
        write!(f, "PinSource({self})")
    }
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::Env(var) => write!(f, "env:{var}"),
            PinSource::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl FromStr for PinSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::PinSource {
            source_desc: s.chars().take(64).collect(),
            reason: reason.to_owned(),
        };
        if let Some(var) = s.strip_prefix("env:") {
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                return Err(bad("not a valid environment variable name"));
            }
            Ok(PinSource::Env(var.to_owned()))
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(bad("empty file path"));
            }
            Ok(PinSource::File(PathBuf::from(path)))
        } else {
            // Do not echo the input: someone may have put the PIN itself here.
            Err(Error::PinSource {
                source_desc: "the given PIN source".to_owned(),
                reason: "expected \"env:VAR\" or \"file:PATH\" (a PIN is never given in clear)"
                    .to_owned(),
            })
        }
    }
}

/// Bounds the read so a mistaken path (`file:/dev/zero`) cannot exhaust memory.
const MAX_PIN_FILE_BYTES: u64 = 4096;

impl PinSource {
    /// Reads the PIN. A trailing newline in a file is dropped; an empty PIN is an error.
    pub fn read(&self) -> Result<Zeroizing<String>> {
        let err = |reason: String| Error::PinSource {
            source_desc: self.to_string(),
            reason,
        };
        let mut pin = match self {
            PinSource::Env(var) => match std::env::var(var) {
                Ok(v) => Zeroizing::new(v),
                Err(std::env::VarError::NotPresent) => {
                    return Err(err("the environment variable is not set".into()))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(err("the environment variable is not valid UTF-8".into()))
                }
            },
            PinSource::File(path) => {
                let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
                let meta = file.metadata().map_err(|e| Error::io(path, e))?;
                check_mode(path, &meta)?;
                if !meta.is_file() {
                    return Err(err("not a regular file".into()));
                }
                // Sized once: a growing Vec would leave unwiped copies of the PIN behind.
                let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_PIN_FILE_BYTES as usize + 1));
                file.take(MAX_PIN_FILE_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| Error::io(path, e))?;
                if bytes.len() as u64 > MAX_PIN_FILE_BYTES {
                    return Err(err(format!("longer than {MAX_PIN_FILE_BYTES} bytes")));
                }
                match std::str::from_utf8(&bytes) {
                    Ok(s) => Zeroizing::new(s.to_owned()),
                    Err(_) => return Err(err("not valid UTF-8".into())),
                }
            }
        };
        while pin.ends_with('\n') || pin.ends_with('\r') {
            pin.pop();
        }
        if pin.is_empty() {
            return Err(err("the PIN is empty".into()));
        }
        Ok(pin)
    }
}

#[cfg(unix)]
fn check_mode(path: &std::path::Path, meta: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::PinFilePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &std::path::Path, _meta: &std::fs::Metadata) -> Result<()> {
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_sources() {
        assert_eq!(
            "env:TOKEN_PIN".parse::<PinSource>().unwrap(),
            PinSource::Env("TOKEN_PIN".into())
        );
        assert_eq!(
            "file:/etc/tlsgate/pin".parse::<PinSource>().unwrap(),
            PinSource::File("/etc/tlsgate/pin".into())
        );
        let e = "1234".parse::<PinSource>().unwrap_err();
        assert!(matches!(e, Error::PinSource { .. }));
        assert!(
            !e.to_string().contains("1234"),
            "a PIN given in clear must not be echoed"
        );
        assert!(matches!(
            "env:".parse::<PinSource>(),
            Err(Error::PinSource { .. })
        ));
        assert_eq!("env:X".parse::<PinSource>().unwrap().to_string(), "env:X");
    }

    #[test]
    fn reads_env() {
        let var = "TLSGATE_KEYSTORE_UNIT_PIN_ENV";
        std::env::set_var(var, "4321\n");
        assert_eq!(&*PinSource::Env(var.into()).read().unwrap(), "4321");
        let missing = PinSource::Env("TLSGATE_KEYSTORE_UNIT_PIN_UNSET".into()).read();
        assert!(matches!(missing, Err(Error::PinSource { .. })));
    }

    #[test]
    fn file_permissions_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "123456\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        match PinSource::File(path.clone()).read() {
            Err(Error::PinFilePermissions { mode, .. }) => assert_eq!(mode, 0o644),
            other => panic!("expected PinFilePermissions, got {other:?}"),
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&*PinSource::File(path.clone()).read().unwrap(), "123456");

        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            PinSource::File(path).read(),
            Err(Error::PinSource { .. })
        ));
        let missing = PinSource::File(dir.path().join("nope")).read();
        assert!(matches!(missing, Err(Error::Io { .. })));
    }
}
