//! TLS policy profiles: the one place that decides which protocol versions, cipher suites and
//! key-exchange groups a listener offers, and that builds the rustls `CryptoProvider` for them.
//!
//! | profile        | versions      | suites                                                   | groups |
//! |----------------|---------------|----------------------------------------------------------|--------|
//! | `intermediate` | TLS 1.2, 1.3  | TLS 1.3: AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305; TLS 1.2: ECDHE-ECDSA/ECDHE-RSA with the same three AEADs | X25519MLKEM768, X25519, P-256, P-384 |
//! | `modern`       | TLS 1.3       | AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305              | same   |
//! | `strict`       | TLS 1.2, 1.3  | `ECDHE-ECDSA-AES256-GCM-SHA384`, `TLS_AES_256_GCM_SHA384`; ECDSA certificates only | same |
//! | `custom`       | chosen        | chosen among the `intermediate` ones                     | chosen among the same four |
//!
//! Everything is ECDHE (forward secret) and AEAD: nothing else exists in the tables below, so no
//! configuration can ask for it. SSL and TLS 1.0/1.1 are refused with an explanation.
//!
//! Group order: rustls 0.23 picks the first group in the *client's* list that the server
//! supports, so the order here is the profile's stated preference, not what decides. The
//! provider is aws-lc-rs built without rustls's `prefer-post-quantum` feature, whose own default
//! list puts X25519MLKEM768 last; the profiles list it first as the hardening guidance does.

use std::fmt;
use std::sync::Arc;

use rustls::crypto::aws_lc_rs::{cipher_suite as cs, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::{SignatureAlgorithm, SupportedCipherSuite, SupportedProtocolVersion};

/// A named TLS policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// TLS 1.2 + 1.3, ECDHE + AEAD only (Mozilla "intermediate").
    #[default]
    Intermediate,
    /// TLS 1.3 only (Mozilla "modern").
    Modern,
    /// One TLS 1.2 suite and one TLS 1.3 suite, ECDSA certificates only.
    Strict,
    /// Versions, suites and groups from `[listener.custom_policy]`.
    Custom,
}

impl Profile {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Intermediate => "intermediate",
            Profile::Modern => "modern",
            Profile::Strict => "strict",
            Profile::Custom => "custom",
        }
    }
}

/// `[listener.custom_policy]`: lists for the `custom` profile. Names are matched without regard
/// to case; suites may be given by IANA or OpenSSL name.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomPolicy {
    /// `TLSv1.2` and/or `TLSv1.3`.
    pub versions: Vec<String>,
    /// Cipher suites, in preference order; all of the chosen versions' suites when absent.
    pub suites: Option<Vec<String>>,
    /// Key-exchange groups, in preference order; all four when absent.
    pub groups: Option<Vec<String>>,
}

/// Why a policy cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// `policy = "custom"` without `[listener.custom_policy]`.
    #[error("policy \"custom\" needs a [listener.custom_policy] table with `versions` (and optionally `suites`, `groups`)")]
    CustomMissing,
    /// `[listener.custom_policy]` with a named profile.
    #[error("[listener.custom_policy] is only read with policy = \"custom\" (this listener has {0:?}); remove it or set policy = \"custom\"")]
    CustomUnused(&'static str),
    /// SSLv2/3, TLS 1.0 or 1.1.
    #[error("{0:?} cannot be enabled: SSL 2/3 and TLS 1.0/1.1 are broken or deprecated (RFC 7568, RFC 8996) and this appliance does not implement them; allowed: TLSv1.2, TLSv1.3")]
    ObsoleteVersion(String),
    /// Not a protocol version name.
    #[error("unknown TLS version {0:?}; allowed: TLSv1.2, TLSv1.3")]
    UnknownVersion(String),
    /// A cipher suite that exists but is not allowed.
    #[error(
        "cipher suite {name:?} is not allowed: {why}; allowed: {}",
        allowed_suites()
    )]
    UnsupportedSuite {
        /// As written.
        name: String,
        /// Why it is not offered.
        why: &'static str,
    },
    /// Not a cipher suite name.
    #[error("unknown cipher suite {0:?}; allowed: {list}", list = allowed_suites())]
    UnknownSuite(String),
    /// A group that exists but is not allowed.
    #[error(
        "key-exchange group {name:?} is not allowed: {why}; allowed: {}",
        allowed_groups()
    )]
    UnsupportedGroup {
        /// As written.
        name: String,
        /// Why it is not offered.
        why: &'static str,
    },
    /// Not a group name.
    #[error("unknown key-exchange group {0:?}; allowed: {list}", list = allowed_groups())]
    UnknownGroup(String),
    /// A list that must not be empty is.
    #[error("`{0}` is empty: name at least one")]
    Empty(&'static str),
    /// A name appears twice.
    #[error("{0:?} is listed twice")]
    Duplicate(String),
    /// A suite of a version that is not enabled.
    #[error("cipher suite {suite} is a {version} suite but {version} is not in `versions`")]
    SuiteWithoutVersion {
        /// The suite's IANA name.
        suite: &'static str,
        /// `TLSv1.2` or `TLSv1.3`.
        version: &'static str,
    },
    /// An enabled version without a suite.
    #[error("{0} is enabled but no {0} cipher suite is listed")]
    VersionWithoutSuite(&'static str),
    /// A suite or group the FIPS module does not approve, named in a FIPS build.
    #[error("{0} is not FIPS-approved and this is a FIPS build: name only AES-GCM suites and the groups P-256, P-384, X25519MLKEM768")]
    NotFipsApproved(&'static str),
    /// A certificate key this policy cannot use.
    #[error("policy {profile:?} cannot serve {key} certificates: {why}")]
    KeyNotAllowed {
        /// The listener's profile.
        profile: &'static str,
        /// `RSA`, `ECDSA`, ...
        key: String,
        /// What to change.
        why: &'static str,
    },
}

/// Whether this binary was built on the AWS-LC FIPS module (cargo feature `fips`).
pub fn fips_build() -> bool {
    cfg!(feature = "fips")
}

/// The cryptographic module TLS runs on, for `tlsgate version`.
pub fn crypto_module() -> &'static str {
    if fips_build() {
        "the AWS-LC FIPS module"
    } else {
        "AWS-LC, not the FIPS module"
    }
}

/// FIPS mode is active: a FIPS build, AWS-LC in FIPS mode (its power-on self tests passed), and
/// the default policy's provider entirely FIPS-approved (rustls `CryptoProvider::fips`).
pub fn fips_active() -> bool {
    fips_build() && aws_lc_rs::try_fips_mode().is_ok() && TlsPolicy::default().fips()
}

/// The provider every policy starts from: aws-lc-rs, or its FIPS configuration in a FIPS build
/// (FIPS-approved randomness and key loading; suites and groups are the policy's).
fn base_provider() -> CryptoProvider {
    #[cfg(feature = "fips")]
    {
        rustls::crypto::default_fips_provider()
    }
    #[cfg(not(feature = "fips"))]
    {
        rustls::crypto::aws_lc_rs::default_provider()
    }
}

/// A suite this product may offer: IANA name, OpenSSL name, rustls value.
struct Suite {
    iana: &'static str,
    openssl: &'static str,
    suite: SupportedCipherSuite,
}

/// Every suite any profile may offer, in the Mozilla "intermediate" order.
const SUITES: &[Suite] = &[
    Suite {
        iana: "TLS_AES_128_GCM_SHA256",
        openssl: "TLS_AES_128_GCM_SHA256",
        suite: cs::TLS13_AES_128_GCM_SHA256,
    },
    Suite {
        iana: "TLS_AES_256_GCM_SHA384",
        openssl: "TLS_AES_256_GCM_SHA384",
        suite: cs::TLS13_AES_256_GCM_SHA384,
    },
    Suite {
        iana: "TLS_CHACHA20_POLY1305_SHA256",
        openssl: "TLS_CHACHA20_POLY1305_SHA256",
        suite: cs::TLS13_CHACHA20_POLY1305_SHA256,
    },
    Suite {
        iana: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        openssl: "ECDHE-ECDSA-AES128-GCM-SHA256",
        suite: cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    },
    Suite {
        iana: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        openssl: "ECDHE-RSA-AES128-GCM-SHA256",
        suite: cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    },
    Suite {
        iana: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        openssl: "ECDHE-ECDSA-AES256-GCM-SHA384",
        suite: cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    },
    Suite {
        iana: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        openssl: "ECDHE-RSA-AES256-GCM-SHA384",
        suite: cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    },
    Suite {
        iana: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        openssl: "ECDHE-ECDSA-CHACHA20-POLY1305",
        suite: cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    },
    Suite {
        iana: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        openssl: "ECDHE-RSA-CHACHA20-POLY1305",
        suite: cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    },
];

/// A group this product may offer: names accepted, rustls value.
struct Group {
    name: &'static str,
    aliases: &'static [&'static str],
    group: &'static dyn SupportedKxGroup,
}

/// Every group any profile may offer, in preference order (hybrid post-quantum first).
const GROUPS: &[Group] = &[
    Group {
        name: "X25519MLKEM768",
        aliases: &[],
        group: kx_group::X25519MLKEM768,
    },
    Group {
        name: "X25519",
        aliases: &[],
        group: kx_group::X25519,
    },
    Group {
        name: "P-256",
        aliases: &["secp256r1", "prime256v1"],
        group: kx_group::SECP256R1,
    },
    Group {
        name: "P-384",
        aliases: &["secp384r1"],
        group: kx_group::SECP384R1,
    },
];

const STRICT_SUITES: &[&str] = &[
    "TLS_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
];

fn allowed_suites() -> String {
    SUITES
        .iter()
        .map(|s| {
            if s.iana == s.openssl {
                s.iana.to_owned()
            } else {
                format!("{} ({})", s.iana, s.openssl)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn allowed_groups() -> String {
    GROUPS.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
}

fn version_name(v: &SupportedProtocolVersion) -> &'static str {
    if v.version == rustls::ProtocolVersion::TLSv1_3 {
        "TLSv1.3"
    } else {
        "TLSv1.2"
    }
}

fn parse_version(name: &str) -> Result<&'static SupportedProtocolVersion, PolicyError> {
    let n = name.trim().to_ascii_lowercase().replace(['_', ' '], "");
    let n = n
        .strip_prefix("tlsv")
        .or_else(|| n.strip_prefix("tls"))
        .unwrap_or(&n);
    match n {
        "1.2" | "12" => Ok(&rustls::version::TLS12),
        "1.3" | "13" => Ok(&rustls::version::TLS13),
        "1" | "1.0" | "10" | "1.1" | "11" => Err(PolicyError::ObsoleteVersion(name.to_owned())),
        _ if n.starts_with("ssl") => Err(PolicyError::ObsoleteVersion(name.to_owned())),
        _ => Err(PolicyError::UnknownVersion(name.to_owned())),
    }
}

fn parse_suite(name: &str) -> Result<&'static Suite, PolicyError> {
    let n = name.trim();
    if let Some(s) = SUITES.iter().find(|s| {
        s.iana.eq_ignore_ascii_case(n)
            || s.openssl.eq_ignore_ascii_case(n)
            || s.suite
                .suite()
                .as_str()
                .is_some_and(|r| r.eq_ignore_ascii_case(n))
    }) {
        return Ok(s);
    }
    let u = n.to_ascii_uppercase();
    let why = if u.contains("CBC") || u.contains("RC4") || u.contains("3DES") || u.contains("NULL")
    {
        Some("not an AEAD cipher")
    } else if u.contains("CCM") {
        Some("AES-CCM is not offered (the AEADs are AES-GCM and ChaCha20-Poly1305)")
    } else if u.starts_with("TLS_RSA_")
        || u.starts_with("TLS_DHE_")
        || u.starts_with("DHE-")
        || u.starts_with("TLS_PSK")
        || u.starts_with("PSK-")
        || (u.starts_with("AES") && u.contains("GCM"))
    {
        Some("key exchange is not ECDHE (no forward secrecy, or finite-field DH)")
    } else if u.starts_with("ECDHE-") || u.starts_with("TLS_ECDHE_") {
        Some("only AEAD suites (AES-GCM, ChaCha20-Poly1305) are offered")
    } else {
        None
    };
    Err(match why {
        Some(why) => PolicyError::UnsupportedSuite {
            name: name.to_owned(),
            why,
        },
        None => PolicyError::UnknownSuite(name.to_owned()),
    })
}

fn parse_group(name: &str) -> Result<&'static Group, PolicyError> {
    let n = name.trim();
    if let Some(g) = GROUPS.iter().find(|g| {
        g.name.eq_ignore_ascii_case(n) || g.aliases.iter().any(|a| a.eq_ignore_ascii_case(n))
    }) {
        return Ok(g);
    }
    let l = n.to_ascii_lowercase();
    let why = if l.starts_with("ffdhe") {
        Some("finite-field DH groups are not offered (ECDHE only)")
    } else if l == "p-521" || l == "secp521r1" || l == "x448" {
        Some("not in the hardening guidance's group list")
    } else if l.contains("mlkem") {
        Some("only the hybrid X25519MLKEM768 is offered")
    } else {
        None
    };
    Err(match why {
        Some(why) => PolicyError::UnsupportedGroup {
            name: name.to_owned(),
            why,
        },
        None => PolicyError::UnknownGroup(name.to_owned()),
    })
}

/// A listener's resolved policy: its provider and versions. Cheap to clone.
#[derive(Clone)]
pub struct TlsPolicy {
    profile: Profile,
    provider: Arc<CryptoProvider>,
    versions: Vec<&'static SupportedProtocolVersion>,
}

impl fmt::Debug for TlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPolicy")
            .field("profile", &self.profile)
            .field("versions", &self.version_names())
            .field("suites", &self.suite_names())
            .field("groups", &self.group_names())
            .finish()
    }
}

impl Default for TlsPolicy {
    /// The `intermediate` profile.
    fn default() -> Self {
        Self::assemble(
            Profile::Intermediate,
            SUITES.iter().collect(),
            GROUPS.iter().collect(),
        )
    }
}

impl TlsPolicy {
    /// The policy for `profile`; `custom` is read only (and must be given) for
    /// [`Profile::Custom`].
    pub fn new(profile: Profile, custom: Option<&CustomPolicy>) -> Result<Self, PolicyError> {
        match (profile, custom) {
            (Profile::Custom, None) => return Err(PolicyError::CustomMissing),
            (Profile::Custom, Some(c)) => return Self::custom(c),
            (p, Some(_)) => return Err(PolicyError::CustomUnused(p.as_str())),
            (_, None) => {}
        }
        let all_groups: Vec<&'static Group> = GROUPS.iter().collect();
        Ok(match profile {
            Profile::Modern => Self::assemble(
                profile,
                SUITES
                    .iter()
                    .filter(|s| s.suite.version() == &rustls::version::TLS13)
                    .collect(),
                all_groups,
            ),
            Profile::Strict => Self::assemble(
                profile,
                SUITES
                    .iter()
                    .filter(|s| STRICT_SUITES.contains(&s.iana))
                    .collect(),
                all_groups,
            ),
            _ => Self::assemble(profile, SUITES.iter().collect(), all_groups),
        })
    }

    fn custom(c: &CustomPolicy) -> Result<Self, PolicyError> {
        if c.versions.is_empty() {
            return Err(PolicyError::Empty("custom_policy.versions"));
        }
        let mut versions: Vec<&'static SupportedProtocolVersion> = Vec::new();
        for v in &c.versions {
            let v = parse_version(v)?;
            if versions.contains(&v) {
                return Err(PolicyError::Duplicate(version_name(v).to_owned()));
            }
            versions.push(v);
        }
        let suites: Vec<&'static Suite> = match &c.suites {
            None => SUITES
                .iter()
                .filter(|s| versions.contains(&s.suite.version()))
                .collect(),
            Some(names) => {
                if names.is_empty() {
                    return Err(PolicyError::Empty("custom_policy.suites"));
                }
                let mut out: Vec<&'static Suite> = Vec::new();
                for n in names {
                    let s = parse_suite(n)?;
                    if fips_build() && !s.suite.fips() {
                        return Err(PolicyError::NotFipsApproved(s.iana));
                    }
                    if out.iter().any(|o| o.iana == s.iana) {
                        return Err(PolicyError::Duplicate(s.iana.to_owned()));
                    }
                    if !versions.contains(&s.suite.version()) {
                        return Err(PolicyError::SuiteWithoutVersion {
                            suite: s.iana,
                            version: version_name(s.suite.version()),
                        });
                    }
                    out.push(s);
                }
                out
            }
        };
        for v in &versions {
            if !suites.iter().any(|s| s.suite.version() == *v) {
                return Err(PolicyError::VersionWithoutSuite(version_name(v)));
            }
        }
        let groups: Vec<&'static Group> = match &c.groups {
            None => GROUPS.iter().collect(),
            Some(names) => {
                if names.is_empty() {
                    return Err(PolicyError::Empty("custom_policy.groups"));
                }
                let mut out: Vec<&'static Group> = Vec::new();
                for n in names {
                    let g = parse_group(n)?;
                    if fips_build() && !g.group.fips() {
                        return Err(PolicyError::NotFipsApproved(g.name));
                    }
                    if out.iter().any(|o| o.name == g.name) {
                        return Err(PolicyError::Duplicate(g.name.to_owned()));
                    }
                    out.push(g);
                }
                out
            }
        };
        Ok(Self::assemble(Profile::Custom, suites, groups))
    }

    fn assemble(
        profile: Profile,
        mut suites: Vec<&'static Suite>,
        mut groups: Vec<&'static Group>,
    ) -> Self {
        // A FIPS build offers only what the FIPS module approves: no ChaCha20-Poly1305, no plain
        // X25519 (the hybrid X25519MLKEM768 stays: its ML-KEM part is approved). A custom policy
        // that names one of those was refused before this ([`PolicyError::NotFipsApproved`]).
        if fips_build() {
            suites.retain(|s| s.suite.fips());
            groups.retain(|g| g.group.fips());
        }
        let mut versions = Vec::new();
        // Highest first, as rustls documents for `with_protocol_versions`.
        for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
            if suites.iter().any(|s| s.suite.version() == v) {
                versions.push(v);
            }
        }
        let provider = CryptoProvider {
            cipher_suites: suites.iter().map(|s| s.suite).collect(),
            kx_groups: groups.iter().map(|g| g.group).collect(),
            ..base_provider()
        };
        Self {
            profile,
            provider: Arc::new(provider),
            versions,
        }
    }

    /// The profile this policy came from.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Whether every part of this policy's provider is FIPS-approved (rustls's
    /// `CryptoProvider::fips`: only in a FIPS build).
    pub fn fips(&self) -> bool {
        self.provider.fips()
    }

    /// The crypto provider (aws-lc-rs) restricted to this policy's suites and groups.
    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    /// Protocol versions, highest first.
    pub fn versions(&self) -> &[&'static SupportedProtocolVersion] {
        &self.versions
    }

    /// `TLSv1.3`, `TLSv1.2` as enabled.
    pub fn version_names(&self) -> Vec<&'static str> {
        self.versions.iter().map(|v| version_name(v)).collect()
    }

    /// IANA names of the suites, in preference order.
    pub fn suite_names(&self) -> Vec<&'static str> {
        self.provider
            .cipher_suites
            .iter()
            .filter_map(|s| SUITES.iter().find(|k| k.suite.suite() == s.suite()))
            .map(|s| s.iana)
            .collect()
    }

    /// OpenSSL names of the suites, in preference order.
    pub fn openssl_suite_names(&self) -> Vec<&'static str> {
        self.provider
            .cipher_suites
            .iter()
            .filter_map(|s| SUITES.iter().find(|k| k.suite.suite() == s.suite()))
            .map(|s| s.openssl)
            .collect()
    }

    /// Group names (`X25519MLKEM768`, `X25519`, `P-256`, `P-384`), in preference order.
    pub fn group_names(&self) -> Vec<&'static str> {
        self.provider
            .kx_groups
            .iter()
            .filter_map(|g| GROUPS.iter().find(|k| k.group.name() == g.name()))
            .map(|g| g.name)
            .collect()
    }

    /// Whether a certificate whose key is of `alg` can be served under this policy: `strict`
    /// serves ECDSA only; a TLS 1.2-only custom policy needs a suite for the key's type.
    pub fn check_key(&self, alg: SignatureAlgorithm) -> Result<(), PolicyError> {
        let key = format!("{alg:?}");
        if self.profile == Profile::Strict && alg != SignatureAlgorithm::ECDSA {
            return Err(PolicyError::KeyNotAllowed {
                profile: self.profile.as_str(),
                key,
                why: "`strict` allows ECDSA certificates only; use an ECDSA key (e.g. P-256) or another profile",
            });
        }
        let usable = self
            .provider
            .cipher_suites
            .iter()
            .any(|s| s.usable_for_signature_algorithm(alg));
        if !usable {
            return Err(PolicyError::KeyNotAllowed {
                profile: self.profile.as_str(),
                key,
                why: "no enabled cipher suite signs with this key type; add TLSv1.3 or a TLS 1.2 suite for it",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
