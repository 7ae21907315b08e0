//! The lab's internal CA: a software root and intermediate (rcgen, ECDSA P-256) whose keys are
//! files in the lab directory with 0600 permissions. It exists for labs and tests only — its keys
//! are not in a token — and every certificate it makes says so in its issuer name.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
    SubjectPublicKeyInfo,
};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root.key";
const INT_CERT: &str = "intermediate.pem";
const INT_KEY: &str = "intermediate.key";
const MARKER: &str = "LAB-CA-ONLY.txt";

const ROOT_DAYS: u32 = 3650;
const INTERMEDIATE_DAYS: u32 = 1825;

/// A lab-only CA: root plus one intermediate that signs leaves.
pub struct LabCa {
    dir: PathBuf,
    root_pem: String,
    intermediate_pem: String,
    intermediate: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for LabCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn gen_err(e: rcgen::Error) -> Error {
    Error::CertGeneration {
        reason: e.to_string(),
    }
}

fn random_serial() -> Result<SerialNumber> {
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| Error::CertGeneration {
        reason: "random generator failed".into(),
    })?;
    serial[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&serial))
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 86_400)
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(contents.as_bytes())
        .map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

fn write_public(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).map_err(|e| Error::io(path, e))
}

fn ca_params(cn: String, path_len: u8, not_after_days: u32) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tlsgate lab (not for production)");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = offset(now - Duration::from_secs(300));
    params.not_after = offset(now + days(not_after_days));
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

impl LabCa {
    /// Creates a new CA in `dir` (created 0700 if missing). Refuses to overwrite an existing CA.
    pub fn create(dir: &Path, name: &str) -> Result<LabCa> {
        let lab_err = |reason: &str| Error::LabCa {
            dir: dir.to_owned(),
            reason: reason.into(),
        };
        if dir.join(ROOT_KEY).exists() || dir.join(INT_KEY).exists() {
            return Err(lab_err(
                "a CA already exists here; refusing to overwrite it",
            ));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io(dir, e))?;
        }
        #[cfg(not(unix))]
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;

        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let root_params = ca_params(format!("{name} Lab Root CA"), 1, ROOT_DAYS)?;
        let root_cert = root_params.self_signed(&root_key).map_err(gen_err)?;
        let root_issuer = Issuer::new(root_params, root_key);

        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let int_params = ca_params(format!("{name} Lab Intermediate CA"), 0, INTERMEDIATE_DAYS)?;
        let int_cert = int_params
            .signed_by(&int_key, &root_issuer)
            .map_err(gen_err)?;

        write_public(
            &dir.join(MARKER),
            &format!(
                "This directory holds the \"{name}\" LAB-ONLY certificate authority.\n\
                 Its private keys are plain files, not token keys: never trust it outside a lab.\n"
            ),
        )?;
        write_private(
            &dir.join(ROOT_KEY),
            &Zeroizing::new(root_issuer.key().serialize_pem()),
        )?;
        write_private(&dir.join(INT_KEY), &Zeroizing::new(int_key.serialize_pem()))?;
        write_public(&dir.join(ROOT_CERT), &root_cert.pem())?;
        write_public(&dir.join(INT_CERT), &int_cert.pem())?;
        LabCa::load(dir)
    }

    /// Loads the CA in `dir`.
    pub fn load(dir: &Path) -> Result<LabCa> {
        let lab_err = |reason: String| Error::LabCa {
            dir: dir.to_owned(),
            reason,
        };
        let read = |name: &str| -> Result<String> {
            let p = dir.join(name);
            fs::read_to_string(&p).map_err(|e| Error::io(p, e))
        };
        let root_pem = read(ROOT_CERT)?;
        let intermediate_pem = read(INT_CERT)?;
        let int_key_pem = Zeroizing::new(read(INT_KEY)?);
        let int_key =
            KeyPair::from_pem(&int_key_pem).map_err(|e| lab_err(format!("{INT_KEY}: {e}")))?;
        let intermediate = Issuer::from_ca_cert_pem(&intermediate_pem, int_key)
            .map_err(|e| lab_err(format!("{INT_CERT}: {e}")))?;
        Ok(LabCa {
            dir: dir.to_owned(),
            root_pem,
            intermediate_pem,
            intermediate,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root certificate (the trust anchor clients need).
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    pub fn intermediate_pem(&self) -> String {
        self.intermediate_pem.clone()
    }

    fn leaf_params(
        &self,
        mut params: CertificateParams,
        not_before: SystemTime,
        not_after: SystemTime,
        client: bool,
    ) -> Result<CertificateParams> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if client {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        };
        params.not_before = offset(not_before);
        params.not_after = offset(not_after);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// Issues a server certificate for a CSR (its signature is checked), valid from now for
    /// `validity_days`. Returns the PEM chain: leaf then intermediate.
    pub fn issue_from_csr(&self, csr_pem: &str, validity_days: u32) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(gen_err)?;
        let now = SystemTime::now();
        let params = self.leaf_params(
            csr.params,
            now - Duration::from_secs(300),
            now + days(validity_days),
            false,
        )?;
        let cert = params
            .signed_by(&csr.public_key, &self.intermediate)
            .map_err(gen_err)?;
        Ok(format!("{}{}", cert.pem(), self.intermediate_pem))
    }

    /// Issues a server certificate for a public key (SPKI DER) with an explicit validity window;
    /// tests use it for expired and not-yet-valid certificates. Returns leaf + intermediate PEM.
    pub fn issue_for_spki(
        &self,
        spki_der: &[u8],
        subject_cn: &str,
        sans: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String> {
        let public = SubjectPublicKeyInfo::from_der(spki_der).map_err(gen_err)?;
        let mut params = CertificateParams::new(sans.to_vec()).map_err(gen_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, subject_cn);
        let params = self.leaf_params(params, not_before, not_after, false)?;
        let cert = params
            .signed_by(&public, &self.intermediate)
            .map_err(gen_err)?;
        Ok(format!("{}{}", cert.pem(), self.intermediate_pem))
    }

    /// Issues a client certificate with a fresh software key (for mTLS tests and lab clients).
    /// Returns (certificate chain PEM, PKCS#8 key PEM).
    pub fn issue_client_cert(
        &self,
        subject_cn: &str,
        validity_days: u32,
    ) -> Result<(String, Zeroizing<String>)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, subject_cn);
        let now = SystemTime::now();
        let params = self.leaf_params(
            params,
            now - Duration::from_secs(300),
            now + days(validity_days),
            true,
        )?;
        let cert = params
            .signed_by(&key, &self.intermediate)
            .map_err(gen_err)?;
        Ok((
            format!("{}{}", cert.pem(), self.intermediate_pem),
            Zeroizing::new(key.serialize_pem()),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cert::CertChain;
    use rcgen::PublicKeyData;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_load_and_issue_from_a_csr() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let created = LabCa::create(&dir, "unit").unwrap();
        for key in [ROOT_KEY, INT_KEY] {
            let mode = fs::metadata(dir.join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        assert!(matches!(
            LabCa::create(&dir, "unit"),
            Err(Error::LabCa { .. })
        ));

        let ca = LabCa::load(&dir).unwrap();
        assert_eq!(ca.root_pem(), created.root_pem());

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = crate::csr::create_csr(&key, "web.lab.test", &["web.lab.test".into()]).unwrap();
        let chain_pem = ca.issue_from_csr(&csr, 30).unwrap();
        let chain = CertChain::from_pem(chain_pem.as_bytes()).unwrap();
        assert_eq!(chain.certs.len(), 2);
        let report = chain
            .validate(&key.subject_public_key_info(), SystemTime::now())
            .unwrap();
        assert_eq!(report.sans, vec!["web.lab.test".to_string()]);
        assert!(report.subject.contains("web.lab.test"));
        assert!(report.issuer.contains("unit Lab Intermediate CA"));
        assert_eq!(report.fingerprint_sha256.len(), 64);

        // The intermediate chains to the root too.
        let root = CertChain::from_pem(ca.root_pem().as_bytes()).unwrap();
        let mut full = chain.certs.clone();
        full.extend(root.certs);
        let full = CertChain::from_der(full).unwrap();
        full.validate(&key.subject_public_key_info(), SystemTime::now())
            .unwrap();

        let (client_chain, client_key) = ca.issue_client_cert("client-1", 1).unwrap();
        let sw = crate::software::load_pkcs8_pem(&{
            let p = tmp.path().join("client.key");
            fs::write(&p, client_key.as_bytes()).unwrap();
            p
        })
        .unwrap();
        CertChain::from_pem(client_chain.as_bytes())
            .unwrap()
            .validate(&sw.spki_der, SystemTime::now())
            .unwrap();
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = LabCa::create(&tmp.path().join("ca"), "unit").unwrap();
        assert!(matches!(
            ca.issue_from_csr("not a csr", 1),
            Err(Error::CertGeneration { .. })
        ));
    }
}
