//! Test support for OCSP stapling: `openssl` as a one-shot command and OCSP responses made by
//! `openssl ocsp` (a real responder's signing code) from an index file.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use super::{check, Lab};

pub fn openssl(args: &[&str]) -> Result<String> {
    check(
        Command::new("openssl").args(args).output()?,
        &format!("openssl {}", args.join(" ")),
    )
}

/// An OCSP response (DER file) for `leaf`, good or `revoked` in the responder's index, signed by
/// `signer` (cert, key; paths in the lab) and valid for one day.
pub fn response(
    lab: &Lab,
    name: &str,
    leaf: &Path,
    revoked: bool,
    signer: (&str, &str),
) -> Result<PathBuf> {
    let serial = openssl(&[
        "x509",
        "-in",
        &leaf.display().to_string(),
        "-noout",
        "-serial",
    ])?;
    let serial = serial.trim().trim_start_matches("serial=").to_owned();
    let index = lab.path(&format!("{name}.index"));
    let line = if revoked {
        format!("R\t491231235959Z\t200101000000Z\t{serial}\tunknown\t/CN=localhost\n")
    } else {
        format!("V\t491231235959Z\t\t{serial}\tunknown\t/CN=localhost\n")
    };
    std::fs::write(&index, line)?;
    let req = lab.path(&format!("{name}.req"));
    openssl(&[
        "ocsp",
        "-issuer",
        &lab.p("ca/intermediate.pem"),
        "-cert",
        &leaf.display().to_string(),
        "-no_nonce",
        "-reqout",
        &req.display().to_string(),
    ])?;
    let out = lab.path(&format!("{name}.der"));
    openssl(&[
        "ocsp",
        "-index",
        &index.display().to_string(),
        "-rsigner",
        &lab.p(signer.0),
        "-rkey",
        &lab.p(signer.1),
        "-CA",
        &lab.p("ca/intermediate.pem"),
        "-reqin",
        &req.display().to_string(),
        "-respout",
        &out.display().to_string(),
        "-ndays",
        "1",
    ])?;
    Ok(out)
}
