//! Command-line options of `tlsgate-load`.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// TLS load generator: full and resumed handshakes, bulk throughput and idle connections against
/// one TLS endpoint, with the generator's and (optionally) the server's CPU accounting.
#[derive(Debug, Parser)]
#[command(name = "tlsgate-load", version)]
pub struct Args {
    /// Address of the TLS endpoint, `HOST:PORT` (resolved once at start).
    #[arg(long)]
    pub target: String,

    /// Server name sent in SNI and checked against the certificate (an IP address sends no SNI).
    #[arg(long, default_value = "localhost")]
    pub sni: String,

    /// What each connection does.
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    pub mode: Mode,

    /// Offer only this TLS version (default: offer 1.3 and 1.2).
    #[arg(long = "tls", value_enum)]
    pub tls: Option<TlsVersion>,

    /// Key-exchange group, offered first (TLS 1.3: the only key share). When TLS 1.2 is offered,
    /// P-256 and P-384 are listed after it, because TLS 1.2 servers also read that list as the
    /// curves allowed for ECDSA certificates; the report shows the group actually negotiated.
    #[arg(long, value_enum, default_value_t = Group::X25519)]
    pub group: Group,

    /// Cipher suites offered, by IANA/rustls name (e.g. TLS13_AES_256_GCM_SHA384,
    /// TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384); repeat or separate with commas.
    /// Default: the aws-lc-rs provider's defaults.
    #[arg(long = "suite", value_delimiter = ',')]
    pub suites: Vec<String>,

    /// TLS 1.2 resumption offered in `resume` mode: session ids only, or tickets (with ids as
    /// the fallback the server may pick).
    #[arg(long, value_enum, default_value_t = Tls12Resumption::Tickets)]
    pub tls12_resumption: Tls12Resumption,

    /// Connections in flight at once (one thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub concurrency: u32,

    /// Count bound: connections to make (full/resume/idle). In bulk mode, the keep-alive
    /// connections to open (default: one per concurrency slot).
    #[arg(long)]
    pub connections: Option<u64>,

    /// Count bound for bulk mode: requests to send in all.
    #[arg(long)]
    pub requests: Option<u64>,

    /// Time bound in seconds; the run ends at whichever bound comes first.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Request path. Default `/`, or `/bytes/N` when --response-bytes N is given.
    #[arg(long)]
    pub path: Option<String>,

    /// Pad the request with a header so it is at least this many bytes.
    #[arg(long = "request-bytes", alias = "request")]
    pub request_bytes: Option<usize>,

    /// Expected response body size; a body of any other size counts as an error.
    #[arg(long)]
    pub response_bytes: Option<u64>,

    /// full/resume: after the response, wait for the server to close the connection before
    /// closing (as `openssl s_time -www` does), so the server closes first.
    #[arg(long)]
    pub server_closes: bool,

    /// PEM file of trust anchors for the server certificate.
    #[arg(long, required_unless_present = "insecure_skip_verify")]
    pub ca: Option<PathBuf>,

    /// Accept any server certificate chain and name, and skip the handshake signature check on
    /// all but one handshake in 1024 (the first included), so the generator costs less CPU per
    /// handshake than the server; a signer that produces garbage still fails the run. For
    /// benchmarks only.
    #[arg(long, conflicts_with = "ca")]
    pub insecure_skip_verify: bool,

    /// Server process(es) whose CPU time (/proc/PID/stat utime+stime) and VmRSS are sampled
    /// before and after the run; repeat or separate with commas (e.g. a master and its worker).
    #[arg(long = "server-pid", value_delimiter = ',')]
    pub server_pids: Vec<u32>,

    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Pin every generator thread to this CPU.
    #[arg(long)]
    pub pin_cpu: Option<usize>,

    /// Per-socket read/write/connect timeout in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,

    /// Idle mode: seconds to hold the connections open after the last one is established.
    #[arg(long, default_value_t = 1.0)]
    pub hold: f64,

    /// Report format on standard output.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// New connection, full handshake, one small request/response, close.
    Full,
    /// Like `full`, but every connection resumes the session of the slot's first connection.
    Resume,
    /// Large responses over few keep-alive connections.
    Bulk,
    /// Open many connections, complete the handshake, hold them (server memory per connection).
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsVersion {
    #[value(name = "1.2")]
    V12,
    #[value(name = "1.3")]
    V13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Group {
    #[value(name = "x25519")]
    X25519,
    #[value(name = "secp256r1")]
    Secp256r1,
    #[value(name = "secp384r1")]
    Secp384r1,
    #[value(name = "x25519mlkem768")]
    X25519Mlkem768,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Tls12Resumption {
    Ids,
    Tickets,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table for people.
    Human,
    /// One whitespace-separated summary line (the columns of `scripts/bench-tlsgate.sh`).
    Row,
    /// Nothing (use --json).
    None,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Resume => "resume",
            Mode::Bulk => "bulk",
            Mode::Idle => "idle",
        }
    }
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Group::X25519 => "x25519",
            Group::Secp256r1 => "secp256r1",
            Group::Secp384r1 => "secp384r1",
            Group::X25519Mlkem768 => "x25519mlkem768",
        }
    }
}
