//! A lab CA in a temporary directory for tests.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use tlsgate_keystore::labca::LabCa;
use tlsgate_keystore::CertChain;

/// The test CA: root + intermediate, removed with the test.
#[derive(Debug)]
pub struct TestCa {
    pub ca: LabCa,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> Result<TestCa> {
        let dir = tempfile::Builder::new().prefix("tlsgate-ca-").tempdir()?;
        let ca = LabCa::create(&dir.path().join("ca"), "hw-tests")?;
        Ok(TestCa { ca, _dir: dir })
    }

    /// A chain (leaf + intermediate) for `spki_der`, valid from an hour ago for `valid_for`.
    pub fn issue(&self, spki_der: &[u8], sans: &[&str], valid_for: Duration) -> Result<CertChain> {
        let now = SystemTime::now();
        self.issue_window(
            spki_der,
            sans,
            now - Duration::from_secs(3600),
            now + valid_for,
        )
    }

    pub fn issue_window(
        &self,
        spki_der: &[u8],
        sans: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertChain> {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let cn = sans
            .first()
            .cloned()
            .unwrap_or_else(|| "tlsgate test".into());
        let pem = self
            .ca
            .issue_for_spki(spki_der, &cn, &sans, not_before, not_after)?;
        Ok(CertChain::from_pem(pem.as_bytes())?)
    }

    /// A chain for a CSR (the way operators get certificates for token keys).
    pub fn issue_csr(&self, csr_pem: &str) -> Result<CertChain> {
        let pem = self.ca.issue_from_csr(csr_pem, 30)?;
        Ok(CertChain::from_pem(pem.as_bytes())?)
    }

    pub fn root_der(&self) -> Result<CertificateDer<'static>> {
        Ok(CertificateDer::from_pem_slice(
            self.ca.root_pem().as_bytes(),
        )?)
    }

    /// A root store trusting only this CA.
    pub fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        roots.add(self.root_der()?)?;
        Ok(Arc::new(roots))
    }
}
