//! `tlsgate ca …`: the lab's internal certificate authority.
//!
//! A root and an intermediate with software keys kept in 0600 files: good for a lab and for
//! tests, never for a production zone (whose CA lives elsewhere and only signs our CSRs).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tlsgate_keystore::labca::LabCa;

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a lab CA (root + intermediate) in a directory.
    InitLab(InitLabCaArgs),
    /// Sign a PKCS#10 request with the lab CA and print the chain (leaf, intermediate).
    Sign(SignArgs),
}

#[derive(Debug, Args)]
pub struct InitLabCaArgs {
    /// Directory for the CA's certificates and keys.
    #[arg(long)]
    pub dir: PathBuf,
    /// Name used in the CA subjects.
    #[arg(long, default_value = "tlsgate lab")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The lab CA directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// The certificate request (PEM).
    #[arg(long)]
    pub csr: PathBuf,
    /// Validity in days.
    #[arg(long, default_value_t = 90)]
    pub days: u32,
    /// Where to write the chain (standard output when omitted).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs one CA command.
pub fn run(cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::InitLab(args) => {
            let ca = LabCa::create(&args.dir, &args.name)
                .with_context(|| format!("cannot create the lab CA in {}", args.dir.display()))?;
            let root = args.dir.join("root.pem");
            crate::files::write_atomic(&root, ca.root_pem().as_bytes(), 0o644)?;
            outln!("lab CA {:?} created in {}", args.name, args.dir.display());
            outln!("  trust anchor for clients: {}", root.display());
            Ok(())
        }
        CaCommand::Sign(args) => {
            let ca = LabCa::load(&args.dir)
                .with_context(|| format!("cannot load the lab CA in {}", args.dir.display()))?;
            let csr = std::fs::read_to_string(&args.csr)
                .with_context(|| format!("cannot read {}", args.csr.display()))?;
            let chain = ca.issue_from_csr(&csr, args.days)?;
            match args.out {
                Some(out) => crate::files::write_atomic(&out, chain.as_bytes(), 0o644),
                None => {
                    out!("{chain}");
                    Ok(())
                }
            }
        }
    }
}
