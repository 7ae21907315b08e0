//! The command line: `tlsgate serve`, the offline `tlsgate token …` and `tlsgate ca …` commands,
//! and the lab's demo backend.

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// `print!` for command output: a reader that went away (`tlsgate ctl … | head -1`) ends the
/// process quietly (exit 0) instead of a panic; another write error exits 1 with a message.
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::write_out(format_args!($($t)*)) };
}

/// `println!` with the behaviour of [`out!`].
macro_rules! outln {
    () => { $crate::cli::write_out(format_args!("\n")) };
    ($($t:tt)*) => { $crate::cli::write_out(format_args!("{}\n", format_args!($($t)*))) };
}

/// Writes command output (see [`out!`]).
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write the output: {err}");
        std::process::exit(1);
    }
}

pub mod ca;
pub mod ctl;
pub mod demo_backend;
pub mod token;

/// tlsgate: a TLS offload appliance whose private keys stay in a PKCS#11 token.
#[derive(Debug, Parser)]
#[command(name = "tlsgate", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format (the level comes from TLSGATE_LOG, e.g. `info` or `tlsgate=debug`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The log format the user asked for.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

// The command line is parsed once at start; the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the appliance: terminate TLS on the configured listeners.
    Serve(crate::serve::ServeArgs),
    /// Offline token commands that talk straight to a PKCS#11 module (the key ceremony).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// The lab's internal certificate authority (software keys; for labs and tests only).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Replaces the running appliance's binary without refusing a connection: starts BINARY
    /// with `serve --takeover`, which takes the listening sockets, state lock and ticket keys
    /// over; the old process then drains and exits. Exits non-zero (the old one keeps serving)
    /// when the new one fails to start.
    Upgrade(crate::upgrade::cli::UpgradeArgs),
    /// Client of a running appliance's management API (unix socket or HTTPS).
    Ctl(ctl::CtlArgs),
    /// A small HTTP backend for the lab: answers every request with a short page.
    DemoBackend(demo_backend::DemoBackendArgs),
    /// Prints the version, the TLS library and whether FIPS mode is active.
    Version,
    /// Prints the shell completion script for SHELL (the package installs them).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => crate::serve::run(args),
        Command::Token(cmd) => token::run(cmd),
        Command::Ca(cmd) => ca::run(cmd),
        Command::Ctl(args) => ctl::run(args),
        Command::Upgrade(args) => crate::upgrade::cli::run(args),
        Command::DemoBackend(args) => demo_backend::run(args),
        Command::Version => {
            outln!("tlsgate {}", env!("CARGO_PKG_VERSION"));
            outln!(
                "tls: rustls with aws-lc-rs ({})",
                crate::policy::crypto_module()
            );
            outln!(
                "fips mode: {}",
                if crate::policy::fips_active() {
                    "active"
                } else {
                    "inactive"
                }
            );
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tlsgate", &mut out);
            out!("{}", String::from_utf8_lossy(&out));
            Ok(())
        }
    }
}
