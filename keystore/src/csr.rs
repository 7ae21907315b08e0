//! Certificate signing requests signed by the key itself (on the token, or in software).

use rcgen::{CertificateParams, DistinguishedName, DnType};

use crate::error::{Error, Result};

/// A PEM CSR for `subject_cn` with `sans` (DNS names or IP addresses), signed by `key`.
pub fn create_csr(
    key: &impl rcgen::SigningKey,
    subject_cn: &str,
    sans: &[String],
) -> Result<String> {
    let gen_err = |e: rcgen::Error| Error::CertGeneration {
        reason: e.to_string(),
    };
    let mut params = CertificateParams::new(sans.to_vec()).map_err(gen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, subject_cn);
    params.distinguished_name = dn;
    let csr = params.serialize_request(key).map_err(gen_err)?;
    csr.pem().map_err(gen_err)
}
