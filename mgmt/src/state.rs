//! The durable state of the management plane: certificates (PEM chain + key reference),
//! bindings (which certificates a listener serves), CRLs and client CA bundles per listener.
//! Keys stay in the token; nothing here is secret.
//!
//! One JSON file per object, each replaced with [`crate::files::write_atomic`] (temporary file,
//! fsync, rename, fsync of the directory), so a crash at any point leaves every object either at
//! its old or at its new version and the directory always loads:
//!
//! ```text
//! <dir>/certs/<id>.json        {"id", "key", "chain_pem", "updated_unix"}
//! <dir>/bindings/<listener>.json {"listener", "certificates": [{"cert", "names", "default"}]}
//! <dir>/crls/<listener>.json   {"listener", "crls": [{"id", "pem"}]}
//! <dir>/client-cas/<listener>.json {"listener", "pem", "updated_unix"}
//! <dir>/fleet-config.toml      the fleet's share of the configuration (fleet mode)
//! ```
//!
//! Names starting with `.` are temporary files of an interrupted write: ignored and removed.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// A certificate chain uploaded through the API, for a key reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredCert {
    /// Name chosen by the operator (letters, digits, `-`, `_`, `.`).
    pub id: String,
    /// `pkcs11:` URI (or `file:` path of a software key).
    pub key: String,
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    /// When this version was stored (Unix seconds).
    pub updated_unix: u64,
}

/// One certificate a listener serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BoundCert {
    /// A [`StoredCert`] id.
    pub cert: String,
    /// SNI names; the leaf's DNS SANs when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    /// Answers clients without (or with an unknown) SNI.
    #[serde(default)]
    pub default: bool,
}

/// The certificates a listener serves; replaces the configuration file's certificates of that
/// listener while it exists.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub listener: String,
    pub certificates: Vec<BoundCert>,
    /// Certificate id → its positions in `certificates`, made on first use (a binding is not
    /// changed once made: a change makes a new one).
    #[serde(skip)]
    positions: OnceLock<HashMap<String, Vec<usize>>>,
}

impl Binding {
    pub fn new(listener: String, certificates: Vec<BoundCert>) -> Binding {
        Binding {
            listener,
            certificates,
            positions: OnceLock::new(),
        }
    }

    /// Where certificate `id` is in `certificates` (empty when the binding does not name it).
    pub fn positions(&self, id: &str) -> &[usize] {
        let index = self.positions.get_or_init(|| {
            let mut index: HashMap<String, Vec<usize>> = HashMap::new();
            for (at, c) in self.certificates.iter().enumerate() {
                index.entry(c.cert.clone()).or_default().push(at);
            }
            index
        });
        index.get(id).map_or(&[], Vec::as_slice)
    }
}

impl PartialEq for Binding {
    fn eq(&self, other: &Binding) -> bool {
        self.listener == other.listener && self.certificates == other.certificates
    }
}

impl Eq for Binding {}

/// A CRL uploaded for a listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredCrl {
    /// Hex SHA-256 of the DER (first 16 digits).
    pub id: String,
    pub pem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CrlFile {
    listener: String,
    crls: Vec<StoredCrl>,
}

/// A listener's client CA bundle uploaded through the API: it replaces the bundle its
/// `[listener.client_auth] ca` names while it exists (the mode stays the configuration's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredClientCa {
    pub listener: String,
    /// PEM `CERTIFICATE` blocks, as checked at upload.
    pub pem: String,
    /// When this version was stored (Unix seconds).
    pub updated_unix: u64,
}

/// The state's objects by name: a persistent map, so a change copies the few tree nodes it
/// touches (a copy of the whole state is O(1)) and two versions are compared in the time their
/// differences take ([`for_each_change`]).
pub type Map<V> = imbl::OrdMap<String, V>;

/// Everything the state directory holds, in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateData {
    /// Behind `Arc`: two versions of the state share the objects they have in common.
    pub certs: Map<Arc<StoredCert>>,
    pub bindings: Map<Arc<Binding>>,
    pub crls: Map<Vec<StoredCrl>>,
    pub client_cas: Map<Arc<StoredClientCa>>,
    /// Fleet mode: the fleet's share of the configuration (TOML, see
    /// [`crate::config::fleet_overlay`]).
    pub fleet_config: Option<Arc<str>>,
}

/// The changes that turn `old` into `new`, one call each: `f(key, Some(value))` for an entry of
/// `new` that `old` lacks or holds differently, `f(key, None)` for a key only `old` has. Parts
/// the two maps share are not visited.
pub fn for_each_change<V: PartialEq + Clone, E>(
    old: &Map<V>,
    new: &Map<V>,
    mut f: impl FnMut(&str, Option<&V>) -> Result<(), E>,
) -> Result<(), E> {
    use imbl::ordmap::DiffItem;
    for d in old.diff(new) {
        match d {
            DiffItem::Add(k, v) | DiffItem::Update { new: (k, v), .. } => f(k, Some(v))?,
            DiffItem::Remove(k, _) => f(k, None)?,
        }
    }
    Ok(())
}

/// The keys whose entries differ between `old` and `new` (added, changed or removed).
pub fn changed_keys<V: PartialEq + Clone>(old: &Map<V>, new: &Map<V>) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    // The callback never fails.
    let _ = for_each_change(old, new, |k, _| {
        keys.insert(k.to_owned());
        Ok::<(), ()>(())
    });
    keys
}

/// Whether some binding names certificate `id`.
pub fn is_bound(bindings: &Map<Arc<Binding>>, id: &str) -> bool {
    bindings.values().any(|b| !b.positions(id).is_empty())
}

impl StateData {
    /// Listeners whose binding names certificate `id`.
    pub fn listeners_using(&self, id: &str) -> Vec<String> {
        self.bindings
            .values()
            .filter(|b| !b.positions(id).is_empty())
            .map(|b| b.listener.clone())
            .collect()
    }
}

/// Checks an object name used as a file name: 1–64 of letters, digits, `-`, `_`, `.`, not
/// starting with `.`.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        bail!("{what} {name:?}: use 1 to 64 letters, digits, '-', '_' or '.' (not first)");
    }
    Ok(())
}

/// The exclusive lock on a state directory (`flock` on `<dir>/lock`), held for the life of the
/// `tlsgate serve` that owns the directory; the kernel releases it when the process ends, however
/// it ends. The file holds the owner's pid, for the message a second process gets.
#[derive(Debug)]
pub struct StateLock {
    _file: fs::File,
}

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "lock";

/// Takes the state directory's lock, creating the directory when missing. Fails, naming the
/// owner's pid, when another process holds it: two appliances writing one state directory (or
/// one serving stale keys beside the other) is never what an operator meant.
pub fn lock(dir: &Path) -> Result<StateLock> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    fs::create_dir_all(dir)
        .with_context(|| format!("[state] dir: cannot create {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&path)
        .with_context(|| format!("[state] dir: cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            bail!(
                "[state] dir {} is in use by another tlsgate process (pid {}): one process per \
                 state directory",
                dir.display(),
                if holder.is_empty() { "unknown" } else { holder }
            );
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("[state] dir: cannot lock {}", path.display()))
        }
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("[state] dir: cannot write {}", path.display()))?;
    Ok(StateLock { _file: file })
}

impl StateLock {
    /// The lock a binary upgrade handed over: the same open file, so the same `flock`, held
    /// without a gap. The file keeps naming the old process until [`StateLock::claim`] (once
    /// this one serves: a takeover that fails leaves it as it was).
    pub fn inherited(fd: std::os::fd::OwnedFd) -> Result<StateLock> {
        let file = fs::File::from(fd);
        // The lock belongs to the open file we share: this succeeds at once unless the
        // descriptor is not the lock at all.
        file.try_lock()
            .map_err(|e| anyhow::anyhow!("the handed-over state lock is not held: {e}"))?;
        Ok(StateLock { _file: file })
    }

    /// Writes this process's pid into the lock file.
    pub fn claim(&self) -> Result<()> {
        use std::io::{Seek, Write};
        let mut file = &self._file;
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.sync_all())
            .context("[state] dir: cannot write the lock file")
    }

    /// A duplicate of the lock's descriptor, for handing it to a new process.
    pub fn duplicate(&self) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        Ok(self._file.as_fd().try_clone_to_owned()?)
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

const CERTS: &str = "certs";
const BINDINGS: &str = "bindings";
const CRLS: &str = "crls";
const CLIENT_CAS: &str = "client-cas";
const FLEET_CONFIG: &str = "fleet-config.toml";
/// State files hold no secret, but nobody else needs to read them.
const FILE_MODE: u32 = 0o600;

impl StateStore {
    /// Opens (creating when missing, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<StateStore> {
        for sub in [CERTS, BINDINGS, CRLS, CLIENT_CAS] {
            let d = dir.join(sub);
            fs::create_dir_all(&d)
                .with_context(|| format!("[state] dir: cannot create {}", d.display()))?;
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("[state] dir: cannot set the mode of {}", dir.display()))?;
        Ok(StateStore {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every object. A file that does not parse is an error naming it (a crash never
    /// produces one: see the module docs).
    pub fn load(&self) -> Result<StateData> {
        let mut data = StateData::default();
        for (id, path) in self.objects(CERTS)? {
            let c: StoredCert = read_json(&path)?;
            if c.id != id {
                bail!("{}: names certificate {:?}", path.display(), c.id);
            }
            data.certs.insert(id, Arc::new(c));
        }
        for (name, path) in self.objects(BINDINGS)? {
            let b: Binding = read_json(&path)?;
            if b.listener != name {
                bail!("{}: names listener {:?}", path.display(), b.listener);
            }
            data.bindings.insert(name, Arc::new(b));
        }
        for (name, path) in self.objects(CRLS)? {
            let f: CrlFile = read_json(&path)?;
            if f.listener != name {
                bail!("{}: names listener {:?}", path.display(), f.listener);
            }
            data.crls.insert(name, f.crls);
        }
        for (name, path) in self.objects(CLIENT_CAS)? {
            let c: StoredClientCa = read_json(&path)?;
            if c.listener != name {
                bail!("{}: names listener {:?}", path.display(), c.listener);
            }
            data.client_cas.insert(name, Arc::new(c));
        }
        let path = self.dir.join(FLEET_CONFIG);
        match fs::read_to_string(&path) {
            Ok(text) => data.fleet_config = Some(text.into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
        Ok(data)
    }

    /// `(name, path)` of each `*.json` in `sub`; removes leftovers of interrupted writes.
    fn objects(&self, sub: &str) -> Result<Vec<(String, PathBuf)>> {
        let dir = self.dir.join(sub);
        let mut out = Vec::new();
        let entries =
            fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A temporary file of a write that never reached its rename.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            if let Some(stem) = name.strip_suffix(".json") {
                out.push((stem.to_owned(), entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn path(&self, sub: &str, name: &str) -> Result<PathBuf> {
        check_name("object", name)?;
        Ok(self.dir.join(sub).join(format!("{name}.json")))
    }

    pub fn put_cert(&self, cert: &StoredCert) -> Result<()> {
        write_json(&self.path(CERTS, &cert.id)?, cert)
    }

    pub fn delete_cert(&self, id: &str) -> Result<()> {
        remove(&self.path(CERTS, id)?)
    }

    pub fn put_binding(&self, binding: &Binding) -> Result<()> {
        write_json(&self.path(BINDINGS, &binding.listener)?, binding)
    }

    pub fn delete_binding(&self, listener: &str) -> Result<()> {
        remove(&self.path(BINDINGS, listener)?)
    }

    /// Writes (`Some`) or removes the fleet configuration.
    pub fn put_fleet_config(&self, text: Option<&str>) -> Result<()> {
        let path = self.dir.join(FLEET_CONFIG);
        match text {
            Some(t) => crate::files::write_atomic(&path, t.as_bytes(), FILE_MODE),
            None => remove(&path),
        }
    }

    pub fn put_client_ca(&self, ca: &StoredClientCa) -> Result<()> {
        write_json(&self.path(CLIENT_CAS, &ca.listener)?, ca)
    }

    pub fn delete_client_ca(&self, listener: &str) -> Result<()> {
        remove(&self.path(CLIENT_CAS, listener)?)
    }

    /// Replaces the CRL list of `listener` (an empty list removes the file).
    pub fn put_crls(&self, listener: &str, crls: &[StoredCrl]) -> Result<()> {
        let path = self.path(CRLS, listener)?;
        if crls.is_empty() {
            return remove(&path);
        }
        write_json(
            &path,
            &CrlFile {
                listener: listener.to_owned(),
                crls: crls.to_vec(),
            },
        )
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} does not parse", path.display()))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    crate::files::write_atomic(path, &bytes, FILE_MODE)
}

/// Removes a file and makes the removal durable (fsync of the directory).
fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync directory {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_each_change_names_added_changed_and_removed_keys_once() {
        let old: Map<u32> = [("same", 1u32), ("changed", 1), ("gone", 1)]
            .map(|(k, v)| (k.to_owned(), v))
            .into_iter()
            .collect();
        let new: Map<u32> = [("same", 1u32), ("changed", 2), ("added", 1)]
            .map(|(k, v)| (k.to_owned(), v))
            .into_iter()
            .collect();
        let mut seen = Vec::new();
        for_each_change(&old, &new, |k, v| {
            seen.push((k.to_owned(), v.copied()));
            Ok::<(), ()>(())
        })
        .expect("no error");
        seen.sort();
        assert_eq!(
            seen,
            [
                ("added".to_owned(), Some(1)),
                ("changed".to_owned(), Some(2)),
                ("gone".to_owned(), None)
            ]
        );
    }

    fn cert(id: &str, v: u64) -> StoredCert {
        StoredCert {
            id: id.into(),
            key: "pkcs11:token=lab;object=web;type=private".into(),
            chain_pem: format!("chain v{v}"),
            updated_unix: v,
        }
    }

    #[test]
    fn objects_round_trip_and_leftovers_are_removed() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let store = StateStore::open(&tmp.path().join("state"))?;
        store.put_cert(&cert("web", 1))?;
        store.put_cert(&cert("web", 2))?;
        store.put_cert(&cert("api", 1))?;
        store.delete_cert("api")?;
        let binding = Binding::new(
            "web".into(),
            vec![BoundCert {
                cert: "web".into(),
                names: None,
                default: true,
            }],
        );
        store.put_binding(&binding)?;
        store.put_crls(
            "web",
            &[StoredCrl {
                id: "ab".into(),
                pem: "x".into(),
            }],
        )?;
        fs::write(tmp.path().join("state/certs/.web.json.tmp.1"), b"half")?;
        let data = StateStore::open(&tmp.path().join("state"))?.load()?;
        assert_eq!(data.certs.len(), 1);
        assert_eq!(*data.certs["web"], cert("web", 2));
        assert_eq!(*data.bindings["web"], binding);
        assert_eq!(data.crls["web"].len(), 1);
        assert_eq!(data.listeners_using("web"), vec!["web".to_owned()]);
        assert!(!tmp.path().join("state/certs/.web.json.tmp.1").exists());
        store.put_crls("web", &[])?;
        assert!(store.load()?.crls.is_empty());
        Ok(())
    }

    #[test]
    fn names_that_are_not_file_names_are_refused() {
        for bad in ["", "../x", ".hidden", "a/b", &"x".repeat(65)] {
            assert!(check_name("certificate", bad).is_err(), "{bad:?}");
        }
        assert!(check_name("certificate", "web-2026.v1").is_ok());
    }

    #[test]
    fn a_corrupt_file_is_named() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let store = StateStore::open(tmp.path())?;
        fs::write(tmp.path().join("certs/web.json"), b"{")?;
        let err = store.load().expect_err("corrupt");
        assert!(format!("{err:#}").contains("web.json"), "{err:#}");
        Ok(())
    }
}
