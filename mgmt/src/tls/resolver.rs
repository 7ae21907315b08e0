//! The SNI resolver, and how a change of a few certificates updates it without rebuilding it:
//! its name maps are split into shards behind `Arc`, so a new resolver shares every shard the
//! changed names do not fall in (a rotation copies one or two shards, not one entry per bound
//! name).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{normalize_name, ListenerTls, ServedCert, TlsConfigError, UnknownSni};

/// Shards per name map: with 10,000 names a shard holds about 40.
const SHARDS: usize = 256;

/// An update that changes more certificates than this rebuilds the resolver instead.
const MAX_CHANGED: usize = 64;

/// One certificate that can answer for a name.
#[derive(Debug, Clone)]
struct Candidate {
    /// Its position in the listener's certificate list (the preference order).
    at: usize,
    key: Arc<CertifiedKey>,
    /// The curve of an ECDSA key (see [`SniResolver::resolve`]).
    curve: Option<rustls::NamedGroup>,
}

impl Candidate {
    fn of(at: usize, key: &Arc<CertifiedKey>) -> Candidate {
        Candidate {
            at,
            key: key.clone(),
            curve: ecdsa_curve(key),
        }
    }
}

/// Candidates sorted by `at`.
type Shard = HashMap<String, Vec<Candidate>>;

#[derive(Debug, Clone)]
struct NameMap {
    shards: Vec<Arc<Shard>>,
}

fn shard_of(name: &str) -> usize {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    (h.finish() % SHARDS as u64) as usize
}

impl NameMap {
    fn new() -> NameMap {
        NameMap {
            shards: (0..SHARDS).map(|_| Arc::new(Shard::new())).collect(),
        }
    }

    fn get(&self, name: &str) -> Option<&[Candidate]> {
        self.shards[shard_of(name)].get(name).map(Vec::as_slice)
    }

    fn insert(&mut self, name: String, c: Candidate) {
        let shard = Arc::make_mut(&mut self.shards[shard_of(&name)]);
        insert_sorted(shard.entry(name).or_default(), c);
    }

    fn remove(&mut self, name: &str, at: usize) {
        let shard = Arc::make_mut(&mut self.shards[shard_of(name)]);
        if let Some(v) = shard.get_mut(name) {
            v.retain(|c| c.at != at);
            if v.is_empty() {
                shard.remove(name);
            }
        }
    }
}

/// Inserts after every candidate at or before `c.at` (a name listed twice keeps both).
fn insert_sorted(v: &mut Vec<Candidate>, c: Candidate) {
    let i = v.partition_point(|x| x.at <= c.at);
    v.insert(i, c);
}

/// Chooses a certificate by SNI, then by the client's signature schemes.
#[derive(Debug, Clone)]
pub struct SniResolver {
    exact: NameMap,
    /// Keyed by the part after `*.`.
    wildcard: NameMap,
    defaults: Arc<Vec<Candidate>>,
    unknown: UnknownSni,
    /// The listener's suites, to tell whether a TLS 1.2 client can use a certificate's key type.
    suites: Vec<rustls::SupportedCipherSuite>,
}

/// A listener's certificates (each `default` as served) and the resolver made of them, kept so
/// the next build of the listener can update it ([`Served::update`]). The list is persistent: a
/// copy shares it, and replacing one entry copies a few nodes.
#[derive(Debug, Clone)]
pub struct Served {
    pub certs: imbl::Vector<ServedCert>,
    pub resolver: Arc<SniResolver>,
    /// None of the certificates as given was marked default, so all serve as default.
    all_default: bool,
}

impl Served {
    /// Indexes `certs` (when none is marked default, all are; the order still sets the
    /// preference).
    pub fn new(
        mut certs: imbl::Vector<ServedCert>,
        opts: &ListenerTls,
    ) -> Result<Served, TlsConfigError> {
        let all_default = all_default_if_none(&mut certs);
        let resolver = SniResolver::new(certs.iter(), opts.unknown_sni)?
            .with_suites(&opts.policy.provider().cipher_suites);
        let resolver = Arc::new(resolver);
        Ok(Served {
            certs,
            resolver,
            all_default,
        })
    }

    /// `certs` indexed, reusing `self`'s resolver when the list keeps its length and only a
    /// few entries changed (a rotation): only their names are re-indexed. `changed`, when
    /// given, lists the positions that may differ from `self` (the others are `self`'s entries
    /// as served); otherwise every entry is compared. Same result as [`Served::new`].
    pub fn update(
        &self,
        mut certs: imbl::Vector<ServedCert>,
        changed: Option<&[usize]>,
        opts: &ListenerTls,
    ) -> Result<Served, TlsConfigError> {
        if certs.len() != self.certs.len() {
            return Served::new(certs, opts);
        }
        let changed: Vec<usize> = match changed {
            Some(changed) => {
                if changed.len() > MAX_CHANGED || changed.iter().any(|&i| i >= certs.len()) {
                    return Served::new(certs, opts);
                }
                if self.all_default {
                    // A new default among certificates none of which was one changes which
                    // serve as default: index them all again.
                    if changed.iter().any(|&i| certs[i].default) {
                        return Served::new(certs, opts);
                    }
                    for &i in changed {
                        certs[i].default = true;
                    }
                }
                changed
                    .iter()
                    .copied()
                    .filter(|&i| !same(&self.certs[i], &certs[i]))
                    .collect()
            }
            None => {
                if all_default_if_none(&mut certs) != self.all_default {
                    return Served::new(certs, opts);
                }
                let changed: Vec<usize> = (0..certs.len())
                    .filter(|&i| !same(&self.certs[i], &certs[i]))
                    .take(MAX_CHANGED + 1)
                    .collect();
                if changed.len() > MAX_CHANGED {
                    return Served::new(certs, opts);
                }
                changed
            }
        };
        let mut r = (*self.resolver)
            .clone()
            .with_suites(&opts.policy.provider().cipher_suites);
        r.unknown = opts.unknown_sni;
        for &i in &changed {
            r.replace(i, &self.certs[i], &certs[i])?;
        }
        if r.defaults.is_empty() {
            // The last default went: what `new` does with no default (or its error).
            return Served::new(certs, opts);
        }
        Ok(Served {
            certs,
            resolver: Arc::new(r),
            all_default: self.all_default,
        })
    }
}

/// Marks every certificate default when none is; returns whether it did.
fn all_default_if_none(certs: &mut imbl::Vector<ServedCert>) -> bool {
    if certs.iter().any(|c| c.default) {
        return false;
    }
    for c in certs.iter_mut() {
        c.default = true;
    }
    true
}

fn same(a: &ServedCert, b: &ServedCert) -> bool {
    Arc::ptr_eq(&a.key, &b.key) && a.default == b.default && a.names == b.names
}

/// The named curve of an ECDSA leaf's key, from the curve OID in its SubjectPublicKeyInfo (the
/// only curve OID a certificate holds; its signature names a hash, not a curve).
fn ecdsa_curve(key: &CertifiedKey) -> Option<rustls::NamedGroup> {
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    if key.key.algorithm() != rustls::SignatureAlgorithm::ECDSA {
        return None;
    }
    let leaf = key.end_entity_cert().ok()?;
    // Testing the first two bytes keeps the slice comparison (a `memcmp` call) off all but a few
    // windows.
    let has = |oid: &[u8]| {
        leaf.windows(oid.len())
            .any(|w| w[0] == oid[0] && w[1] == oid[1] && w == oid)
    };
    if has(P256) {
        Some(rustls::NamedGroup::secp256r1)
    } else if has(P384) {
        Some(rustls::NamedGroup::secp384r1)
    } else {
        None
    }
}

/// A key of no algorithm any cipher suite can use: rustls then finds no TLS 1.2 suite in
/// common and ends the handshake with `handshake_failure`, the answer for a client that cannot
/// verify our key (as HAProxy answers). It never signs.
#[derive(Debug)]
struct NoUsableScheme;

impl rustls::sign::SigningKey for NoUsableScheme {
    fn choose_scheme(
        &self,
        _offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        None
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::Unknown(0xff)
    }
}

impl SniResolver {
    /// Indexes `certs`; at least one must be `default` (see [`super::server_config`]).
    pub fn new<'a>(
        certs: impl Iterator<Item = &'a ServedCert>,
        unknown: UnknownSni,
    ) -> Result<Self, TlsConfigError> {
        let mut r = SniResolver {
            exact: NameMap::new(),
            wildcard: NameMap::new(),
            defaults: Arc::new(Vec::new()),
            unknown,
            suites: Vec::new(),
        };
        for (at, c) in certs.enumerate() {
            r.add(at, c)?;
        }
        if r.defaults.is_empty() {
            return Err(TlsConfigError::NoDefault);
        }
        Ok(r)
    }

    fn add(&mut self, at: usize, c: &ServedCert) -> Result<(), TlsConfigError> {
        let candidate = Candidate::of(at, &c.key);
        for name in c.names.iter() {
            let n = normalize_name(name)?;
            match n.strip_prefix("*.") {
                Some(base) => self.wildcard.insert(base.to_owned(), candidate.clone()),
                None => self.exact.insert(n, candidate.clone()),
            }
        }
        if c.default {
            insert_sorted(Arc::make_mut(&mut self.defaults), candidate);
        }
        Ok(())
    }

    /// Certificate `at` was `old` and is now `new`.
    fn replace(
        &mut self,
        at: usize,
        old: &ServedCert,
        new: &ServedCert,
    ) -> Result<(), TlsConfigError> {
        for name in old.names.iter() {
            // It was indexed, so it normalises.
            let n = normalize_name(name)?;
            match n.strip_prefix("*.") {
                Some(base) => self.wildcard.remove(base, at),
                None => self.exact.remove(&n, at),
            }
        }
        if old.default {
            Arc::make_mut(&mut self.defaults).retain(|c| c.at != at);
        }
        self.add(at, new)
    }

    /// Tells the resolver the listener's cipher suites: a certificate is then preferred only
    /// when the client also offers a suite that can use its key (a TLS 1.2 client offering
    /// ECDSA signatures but only ECDHE-RSA suites gets the RSA certificate).
    pub fn with_suites(mut self, suites: &[rustls::SupportedCipherSuite]) -> Self {
        self.suites = suites.to_vec();
        self
    }

    fn suite_fits(&self, key: &CertifiedKey, client_suites: &[rustls::CipherSuite]) -> bool {
        let alg = key.key.algorithm();
        self.suites.is_empty()
            || self.suites.iter().any(|s| {
                client_suites.contains(&s.suite()) && s.usable_for_signature_algorithm(alg)
            })
    }

    /// Whether a TLS 1.2 client can verify this key's signature: an ECDSA key's curve must be
    /// among the client's supported groups (RFC 8422 §5.1; without the extension any curve
    /// goes). A client that can negotiate TLS 1.3 here is not held to it: there the signature
    /// scheme names the curve, and `choose_scheme` checks that.
    fn curve_fits(&self, c: &Candidate, hello: &ClientHello<'_>) -> bool {
        let Some(curve) = &c.curve else {
            return true;
        };
        let tls13 = hello.cipher_suites().iter().any(|c| {
            self.suites
                .iter()
                .any(|s| s.suite() == *c && s.version() == &rustls::version::TLS13)
        });
        if tls13 {
            return true;
        }
        hello
            .named_groups()
            .is_none_or(|groups| groups.contains(curve))
    }

    /// The certificates that serve `sni`, or `None` when no certificate names it.
    fn named(&self, sni: &str) -> Option<&[Candidate]> {
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        if let Some(v) = self.exact.get(&sni) {
            return Some(v);
        }
        let (_, parent) = sni.split_once('.')?;
        self.wildcard.get(parent)
    }

    /// Whether a ClientHello with this SNI gets a certificate (the data plane refuses the others
    /// with `unrecognized_name` before rustls sees them).
    pub fn knows(&self, sni: Option<&str>) -> bool {
        match sni {
            None => true,
            Some(name) => self.named(name).is_some() || self.unknown == UnknownSni::Default,
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = hello.signature_schemes();
        let candidates = match hello.server_name() {
            None => &self.defaults[..],
            Some(name) => match (self.named(name), self.unknown) {
                (Some(c), _) => c,
                (None, UnknownSni::Default) => &self.defaults[..],
                (None, UnknownSni::Refuse) => return None,
            },
        };
        let client_suites = hello.cipher_suites();
        let signs = |c: &&Candidate| {
            c.key.key.choose_scheme(offered).is_some() && self.curve_fits(c, &hello)
        };
        let chosen = candidates
            .iter()
            .filter(signs)
            .find(|c| self.suite_fits(&c.key, client_suites))
            .or_else(|| candidates.iter().find(signs))
            // Nothing the client can use: hand rustls the first certificate anyway so the
            // client gets handshake_failure (no common signature scheme or suite), the alert
            // scanners and clients expect, rather than access_denied for "no certificate".
            .or_else(|| candidates.first())?;
        // An ECDSA key on a curve the TLS 1.2 client does not support: a twin of it that no
        // suite can use, so rustls answers handshake_failure instead of a signature the client
        // must reject ("wrong curve"). Made here, on that rare path, not for every certificate.
        if !self.curve_fits(chosen, &hello) {
            return Some(Arc::new(CertifiedKey::new(
                chosen.key.cert.clone(),
                Arc::new(NoUsableScheme),
            )));
        }
        Some(chosen.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    fn key(names: &[&str]) -> Arc<CertifiedKey> {
        let kp = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.self_signed(&kp).expect("cert");
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(kp.serialize_der()));
        let signing = crate::tls::provider()
            .key_provider
            .load_private_key(der)
            .expect("signing key");
        Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing))
    }

    fn served(names: &[&str], default: bool) -> ServedCert {
        ServedCert {
            key: key(names),
            names: names
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .into(),
            default,
        }
    }

    /// Every name's candidates (position and key) and the defaults.
    fn index(r: &SniResolver, probes: &[&str]) -> Vec<Vec<(usize, usize)>> {
        let ids = |v: &[Candidate]| {
            v.iter()
                .map(|c| (c.at, Arc::as_ptr(&c.key) as usize))
                .collect()
        };
        let mut out: Vec<Vec<(usize, usize)>> = probes
            .iter()
            .map(|p| r.named(p).map(ids).unwrap_or_default())
            .collect();
        out.push(ids(&r.defaults));
        out
    }

    #[test]
    fn an_update_indexes_as_a_rebuild_does_and_shares_the_untouched_shards() {
        let opts = ListenerTls::default();
        let mut certs: Vec<ServedCert> = (0..200)
            .map(|i| served(&[&format!("h{i}.example.com")], false))
            .collect();
        certs.push(served(&["*.example.com", "shared.example.com"], false));
        certs.push(served(&["shared.example.com"], true));
        let before = Served::new(certs.clone().into(), &opts).expect("served");
        // A rotation (new key, same names), a renaming, a new default, a wildcard moved.
        certs[3] = ServedCert {
            key: key(&["h3.example.com"]),
            ..certs[3].clone()
        };
        certs[7] = served(&["shared.example.com", "new.example.com"], true);
        certs[200] = served(&["*.other.example"], false);
        let updated = before
            .update(certs.clone().into(), None, &opts)
            .expect("update");
        // Told where the changes are, it finds the same.
        let told = before
            .update(certs.clone().into(), Some(&[3, 7, 200]), &opts)
            .expect("update at");
        let rebuilt = Served::new(certs.into(), &opts).expect("rebuild");
        let probes = [
            "h3.example.com",
            "h7.example.com",
            "h8.example.com",
            "new.example.com",
            "shared.example.com",
            "x.example.com",
            "x.other.example",
        ];
        assert_eq!(
            index(&updated.resolver, &probes),
            index(&rebuilt.resolver, &probes)
        );
        assert_eq!(
            index(&told.resolver, &probes),
            index(&rebuilt.resolver, &probes)
        );
        assert!(updated.resolver.knows(Some("x.other.example")));
        // Only the shards of the changed names were copied.
        let shared = |a: &NameMap, b: &NameMap| {
            a.shards
                .iter()
                .zip(&b.shards)
                .filter(|(x, y)| Arc::ptr_eq(x, y))
                .count()
        };
        let kept = shared(&before.resolver.exact, &updated.resolver.exact);
        assert!(kept >= SHARDS - 6, "only {kept} of {SHARDS} shards shared");
    }

    #[test]
    fn a_length_change_or_many_changes_rebuild() {
        let opts = ListenerTls::default();
        let certs: Vec<ServedCert> = (0..3)
            .map(|i| served(&[&format!("h{i}.test")], i == 0))
            .collect();
        let before = Served::new(certs.clone().into(), &opts).expect("served");
        let fewer = before
            .update(certs[..2].to_vec().into(), None, &opts)
            .expect("fewer");
        assert!(fewer.resolver.named("h2.test").is_none());
        // No default left: all are, as in a rebuild.
        let mut none = certs.clone();
        none[0].default = false;
        none[1].default = false;
        let all = before
            .update(none.clone().into(), None, &opts)
            .expect("all default");
        assert_eq!(all.resolver.defaults.len(), 3);
        let told = before
            .update(none.into(), Some(&[0, 1]), &opts)
            .expect("all default, told");
        assert_eq!(told.resolver.defaults.len(), 3);
    }
}
