//! Unit tests of the policy profiles.
use super::*;

fn custom(versions: &[&str], suites: Option<&[&str]>, groups: Option<&[&str]>) -> CustomPolicy {
    let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    CustomPolicy {
        versions: v(versions),
        suites: suites.map(v),
        groups: groups.map(v),
    }
}

fn build(c: &CustomPolicy) -> Result<TlsPolicy, PolicyError> {
    TlsPolicy::new(Profile::Custom, Some(c))
}

#[test]
fn intermediate_is_the_mozilla_set_with_hybrid_pq_first() {
    let p = TlsPolicy::new(Profile::Intermediate, None).expect("builtin");
    assert_eq!(p.version_names(), ["TLSv1.3", "TLSv1.2"]);
    assert_eq!(p.suite_names().len(), 9);
    assert_eq!(
        p.group_names(),
        ["X25519MLKEM768", "X25519", "P-256", "P-384"]
    );
    assert_eq!(
        p.provider().kx_groups[0].name(),
        rustls::NamedGroup::X25519MLKEM768
    );
    assert_eq!(
        TlsPolicy::default().suite_names(),
        p.suite_names(),
        "default is intermediate"
    );
    // Every suite is ECDHE + AEAD.
    for s in &p.provider().cipher_suites {
        let name = s.suite().as_str().expect("named");
        assert!(
            name.contains("GCM") || name.contains("CHACHA20_POLY1305"),
            "{name}"
        );
        if let SupportedCipherSuite::Tls12(_) = s {
            assert!(name.starts_with("TLS_ECDHE_"), "{name}");
        }
    }
}

#[test]
fn modern_is_tls13_only_and_strict_has_one_suite_per_version() {
    let m = TlsPolicy::new(Profile::Modern, None).expect("builtin");
    assert_eq!(m.version_names(), ["TLSv1.3"]);
    assert_eq!(
        m.suite_names(),
        [
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256"
        ]
    );
    let s = TlsPolicy::new(Profile::Strict, None).expect("builtin");
    assert_eq!(s.version_names(), ["TLSv1.3", "TLSv1.2"]);
    assert_eq!(
        s.suite_names(),
        [
            "TLS_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"
        ]
    );
    assert_eq!(s.group_names().len(), 4);
}

#[test]
fn strict_refuses_rsa_certificates_and_says_so() {
    let s = TlsPolicy::new(Profile::Strict, None).expect("builtin");
    assert!(s.check_key(SignatureAlgorithm::ECDSA).is_ok());
    let err = s.check_key(SignatureAlgorithm::RSA).expect_err("rsa");
    assert!(matches!(err, PolicyError::KeyNotAllowed { .. }));
    assert!(err.to_string().contains("ECDSA certificates only"), "{err}");
    assert!(TlsPolicy::default()
        .check_key(SignatureAlgorithm::RSA)
        .is_ok());
}

#[test]
fn custom_needs_its_table_and_the_table_needs_custom() {
    assert_eq!(
        TlsPolicy::new(Profile::Custom, None).expect_err("missing"),
        PolicyError::CustomMissing
    );
    let c = custom(&["TLSv1.3"], None, None);
    assert_eq!(
        TlsPolicy::new(Profile::Modern, Some(&c)).expect_err("unused"),
        PolicyError::CustomUnused("modern")
    );
}

#[test]
fn custom_lists_are_honoured_in_order() {
    let p = build(&custom(
        &["tlsv1.2", "TLSv1.3"],
        Some(&[
            "ECDHE-RSA-AES256-GCM-SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
        ]),
        Some(&["secp384r1", "x25519"]),
    ))
    .expect("valid");
    assert_eq!(p.profile(), Profile::Custom);
    assert_eq!(p.version_names(), ["TLSv1.3", "TLSv1.2"]);
    assert_eq!(
        p.suite_names(),
        [
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256"
        ]
    );
    assert_eq!(p.group_names(), ["P-384", "X25519"]);
    let only12 = build(&custom(&["1.2"], None, None)).expect("valid");
    assert_eq!(only12.version_names(), ["TLSv1.2"]);
    assert_eq!(only12.suite_names().len(), 6);
}

#[test]
fn old_versions_are_refused_with_an_explanation() {
    for v in [
        "SSLv3", "SSLv2", "TLSv1", "TLSv1.0", "TLSv1.1", "tls1_1", "1.0",
    ] {
        let err = build(&custom(&[v], None, None)).expect_err(v);
        assert_eq!(err, PolicyError::ObsoleteVersion(v.to_owned()));
        let text = err.to_string();
        assert!(
            text.contains("RFC 8996") && text.contains("TLSv1.2, TLSv1.3"),
            "{text}"
        );
    }
    let err = build(&custom(&["TLSv9"], None, None)).expect_err("unknown");
    assert!(matches!(err, PolicyError::UnknownVersion(_)));
    assert!(err.to_string().contains("allowed: TLSv1.2, TLSv1.3"));
}

#[test]
fn bad_suites_are_refused_listing_the_allowed_names() {
    for (name, why) in [
        ("ECDHE-RSA-AES128-SHA", "AEAD"),
        ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", "AEAD"),
        ("AES128-GCM-SHA256", "ECDHE"),
        ("DHE-RSA-AES128-GCM-SHA256", "ECDHE"),
        ("TLS_AES_128_CCM_SHA256", "CCM"),
    ] {
        let err = build(&custom(&["TLSv1.2", "TLSv1.3"], Some(&[name]), None)).expect_err(name);
        assert!(
            matches!(err, PolicyError::UnsupportedSuite { .. }),
            "{name}: {err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(why), "{text}");
        assert!(
            text.contains("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
            "{text}"
        );
    }
    let err = build(&custom(&["TLSv1.3"], Some(&["FANCY"]), None)).expect_err("unknown");
    assert!(matches!(err, PolicyError::UnknownSuite(_)));
    assert!(err.to_string().contains("TLS_AES_128_GCM_SHA256"), "{err}");
}

#[test]
fn suites_and_versions_must_agree() {
    let err = build(&custom(
        &["TLSv1.3"],
        Some(&["ECDHE-ECDSA-AES128-GCM-SHA256"]),
        None,
    ))
    .expect_err("1.2 suite");
    assert_eq!(
        err,
        PolicyError::SuiteWithoutVersion {
            suite: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            version: "TLSv1.2"
        }
    );
    let err = build(&custom(
        &["TLSv1.2", "TLSv1.3"],
        Some(&["TLS_AES_128_GCM_SHA256"]),
        None,
    ))
    .expect_err("no 1.2 suite");
    assert_eq!(err, PolicyError::VersionWithoutSuite("TLSv1.2"));
}

#[test]
fn bad_groups_and_empty_or_repeated_lists_are_refused() {
    for g in ["ffdhe2048", "P-521", "MLKEM768"] {
        let err = build(&custom(&["TLSv1.3"], None, Some(&[g]))).expect_err(g);
        assert!(matches!(err, PolicyError::UnsupportedGroup { .. }), "{g}");
        assert!(err
            .to_string()
            .contains("X25519MLKEM768, X25519, P-256, P-384"));
    }
    let err = build(&custom(&["TLSv1.3"], None, Some(&["curve9"]))).expect_err("unknown");
    assert!(matches!(err, PolicyError::UnknownGroup(_)));
    assert_eq!(
        build(&custom(&[], None, None)).expect_err("empty"),
        PolicyError::Empty("custom_policy.versions")
    );
    assert_eq!(
        build(&custom(&["TLSv1.3"], Some(&[]), None)).expect_err("empty"),
        PolicyError::Empty("custom_policy.suites")
    );
    assert_eq!(
        build(&custom(&["TLSv1.3"], None, Some(&[]))).expect_err("empty"),
        PolicyError::Empty("custom_policy.groups")
    );
    assert!(matches!(
        build(&custom(&["TLSv1.3"], None, Some(&["X25519", "x25519"]))),
        Err(PolicyError::Duplicate(_))
    ));
    assert!(matches!(
        build(&custom(&["TLSv1.3", "1.3"], None, None)),
        Err(PolicyError::Duplicate(_))
    ));
}

/// The README's profile table says exactly what each built-in profile allows.
#[test]
fn the_readme_profile_table_matches_the_profiles() {
    let readme = include_str!("../../../../README.md");
    for profile in [Profile::Intermediate, Profile::Modern, Profile::Strict] {
        let p = TlsPolicy::new(profile, None).expect("builtin");
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}`", profile.as_str())))
            .unwrap_or_else(|| panic!("README has no row for {profile:?}"));
        for s in SUITES {
            let listed = row.contains(&format!("`{}`", s.iana));
            assert_eq!(
                listed,
                p.suite_names().contains(&s.iana),
                "{profile:?}: README row and profile disagree on {}",
                s.iana
            );
        }
        for g in p.group_names() {
            assert!(row.contains(g), "{profile:?}: {g} missing in README");
        }
        for v in ["TLS 1.2", "TLS 1.3"] {
            let name = v.replace(' ', "v");
            assert_eq!(
                row.split('|').nth(2).unwrap_or("").contains(v),
                p.version_names().contains(&name.as_str()),
                "{profile:?}: README and profile disagree on {v}"
            );
        }
    }
}

#[test]
fn a_tls12_only_policy_needs_a_suite_for_the_key_type() {
    let p = build(&custom(
        &["TLSv1.2"],
        Some(&["ECDHE-ECDSA-AES128-GCM-SHA256"]),
        None,
    ))
    .expect("valid");
    assert!(p.check_key(SignatureAlgorithm::ECDSA).is_ok());
    assert!(matches!(
        p.check_key(SignatureAlgorithm::RSA),
        Err(PolicyError::KeyNotAllowed { .. })
    ));
}
