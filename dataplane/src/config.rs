//! Data-plane configuration: which cores, which io driver, and every limit an attacker could push.
//!
//! All durations are written in TOML as integer milliseconds (`*_ms` keys) so the binary can embed
//! these structs in its own file without a duration-parsing dependency.

use std::time::Duration;

use serde::Deserialize;

/// Default handshake timeout: from accept until the handshake completes (10 s).
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default idle timeout: no byte in either direction for this long closes the connection (300 s).
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 300_000;
/// Default backend connect timeout (5 s).
pub const DEFAULT_BACKEND_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default drain timeout on shutdown (30 s).
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Default maximum open connections per core; accept pauses at this count.
pub const DEFAULT_MAX_CONNECTIONS_PER_CORE: usize = 10_000;
/// Default maximum handshakes in flight per core; accept pauses at this count.
pub const DEFAULT_MAX_HANDSHAKES_IN_FLIGHT: usize = 256;
/// Default maximum size of the ClientHello flight in bytes (TLS records included, 16 KiB).
pub const DEFAULT_MAX_CLIENT_HELLO_BYTES: usize = 16 * 1024;
/// Default bound of each per-connection direction buffer in bytes (64 KiB): reading from one side
/// stops while the other side's pending bytes exceed it.
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024;
/// Default size of one socket read in bytes (16 KiB, one TLS record).
pub const DEFAULT_READ_CHUNK_BYTES: usize = 16 * 1024;
/// Default number of key-operation worker threads (each owns its own PKCS#11 session).
pub const DEFAULT_KEY_OP_WORKERS: usize = 4;
/// Default total depth of the key-operation queue, all cores together.
pub const DEFAULT_KEY_OP_QUEUE_DEPTH: usize = 1024;
/// Default key operations in flight per core.
pub const DEFAULT_KEY_OP_MAX_IN_FLIGHT_PER_CORE: usize = 256;
/// Default deadline of one key operation, from enqueue to result (2 s).
pub const DEFAULT_KEY_OP_DEADLINE_MS: u64 = 2_000;

/// Which io driver runs the cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// io_uring when the kernel allows it, else the portable driver (the log says why).
    #[default]
    Auto,
    /// io_uring or fail at start.
    Uring,
    /// The portable (tokio/epoll) driver.
    Portable,
}

/// The driver that actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriverKind {
    /// io_uring thread-per-core driver.
    Uring,
    /// tokio current-thread runtime per core (epoll).
    Portable,
}

impl IoDriverKind {
    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            IoDriverKind::Uring => "uring",
            IoDriverKind::Portable => "portable",
        }
    }
}

/// Limits and timeouts, all enforced per connection or per core and all counted when they fire.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Accept to handshake complete, milliseconds.
    pub handshake_timeout_ms: u64,
    /// No traffic in either direction, milliseconds.
    pub idle_timeout_ms: u64,
    /// TCP connect to the backend, milliseconds.
    pub backend_connect_timeout_ms: u64,
    /// Open connections per core; accept pauses at this count.
    pub max_connections_per_core: usize,
    /// Handshakes in flight per core; accept pauses at this count.
    pub max_handshakes_in_flight: usize,
    /// Largest ClientHello flight accepted, bytes.
    pub max_client_hello_bytes: usize,
    /// Bound of each per-connection direction buffer, bytes.
    pub buffer_bytes: usize,
    /// Size of one socket read, bytes.
    pub read_chunk_bytes: usize,
    /// Default drain on shutdown when the caller gives none, milliseconds.
    pub drain_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            backend_connect_timeout_ms: DEFAULT_BACKEND_CONNECT_TIMEOUT_MS,
            max_connections_per_core: DEFAULT_MAX_CONNECTIONS_PER_CORE,
            max_handshakes_in_flight: DEFAULT_MAX_HANDSHAKES_IN_FLIGHT,
            max_client_hello_bytes: DEFAULT_MAX_CLIENT_HELLO_BYTES,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            read_chunk_bytes: DEFAULT_READ_CHUNK_BYTES,
            drain_timeout_ms: DEFAULT_DRAIN_TIMEOUT_MS,
        }
    }
}

impl Limits {
    /// Handshake timeout as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    /// Idle timeout as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    /// Backend connect timeout as a duration.
    pub fn backend_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.backend_connect_timeout_ms)
    }
    /// Drain timeout as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// The key-operation offload pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyOpConfig {
    /// Worker threads; each runs `into_connection()` (and so the token signature) for offloaded
    /// handshakes.
    pub workers: usize,
    /// Total queued operations, all cores together; beyond it a handshake fails at once.
    pub queue_depth: usize,
    /// Operations in flight per core; beyond it a handshake fails at once.
    pub max_in_flight_per_core: usize,
    /// Deadline from enqueue to result, milliseconds; a late result fails its handshake.
    pub deadline_ms: u64,
}

impl Default for KeyOpConfig {
    fn default() -> Self {
        Self {
            workers: DEFAULT_KEY_OP_WORKERS,
            queue_depth: DEFAULT_KEY_OP_QUEUE_DEPTH,
            max_in_flight_per_core: DEFAULT_KEY_OP_MAX_IN_FLIGHT_PER_CORE,
            deadline_ms: DEFAULT_KEY_OP_DEADLINE_MS,
        }
    }
}

impl KeyOpConfig {
    /// Deadline as a duration.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
}

/// Everything [`crate::start`] needs besides the snapshot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// CPU ids; one pinned worker thread each. Must not be empty. Default: every CPU this process
    /// may use ([`all_cores`]).
    #[serde(default = "all_cores")]
    pub cores: Vec<usize>,
    /// Which io driver to run.
    #[serde(default)]
    pub io: IoDriver,
    /// Limits and timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// Key-operation offload pool.
    #[serde(default)]
    pub key_ops: KeyOpConfig,
    /// Testing and benchmarking only: run token signatures on the io thread, stalling every other
    /// connection of that core for the length of each signature.
    #[serde(default)]
    pub danger_inline_key_ops: bool,
    /// The seccomp allowlist on the core threads (see `seccomp` module docs); set from
    /// `[process] seccomp` (default true), not from `[dataplane]`. Ignored (off) with
    /// `danger_inline_key_ops`, where the cores call the PKCS#11 module themselves.
    #[serde(skip, default = "yes")]
    pub seccomp: bool,
    /// The (uid, gid) the process switches to after the cores start (`[process] user`), if it
    /// does: the only credential calls the cores' seccomp filter lets through are their share
    /// of that switch. Set by the caller, never from the file.
    #[serde(skip)]
    pub switch_to: Option<(u32, u32)>,
    /// Run by every thread the data plane starts (each core at the end of its set-up, before
    /// its seccomp filter; each key-op worker before its first request); an error stops
    /// [`crate::start`]. `tlsgate serve` puts its Landlock ruleset on each thread with it. Set
    /// by the caller, never from the file.
    #[serde(skip)]
    pub thread_start: Option<ThreadStart>,
}

/// A hook each data-plane thread runs on itself once, with the thread's name; see
/// [`DataplaneConfig::thread_start`].
#[derive(Clone)]
pub struct ThreadStart(pub std::sync::Arc<ThreadStartFn>);

/// The function behind [`ThreadStart`]: the thread's name in, why it failed out.
pub type ThreadStartFn = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl ThreadStart {
    /// Runs the hook on the calling thread.
    pub(crate) fn run(&self, thread: &str) -> Result<(), crate::Error> {
        (self.0)(thread).map_err(|why| crate::Error::ThreadStart {
            thread: thread.to_owned(),
            why,
        })
    }
}

impl std::fmt::Debug for ThreadStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadStart(..)")
    }
}

fn yes() -> bool {
    true
}

/// Every CPU the process may run on, as ids `0..n` (the default of `cores`).
pub fn all_cores() -> Vec<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..n).collect()
}

impl DataplaneConfig {
    /// A configuration with defaults on the given cores.
    pub fn new(cores: Vec<usize>) -> Self {
        Self {
            cores,
            io: IoDriver::Auto,
            limits: Limits::default(),
            key_ops: KeyOpConfig::default(),
            danger_inline_key_ops: false,
            seccomp: true,
            switch_to: None,
            thread_start: None,
        }
    }

    /// Cross-field checks; the error names the key.
    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        let bad = |key: &'static str, why: &'static str| Err(crate::Error::Config { key, why });
        if self.cores.is_empty() {
            return bad("cores", "at least one core is needed");
        }
        if self.limits.buffer_bytes < 1024 {
            return bad("limits.buffer_bytes", "must be at least 1024");
        }
        if self.limits.read_chunk_bytes < 512 {
            return bad("limits.read_chunk_bytes", "must be at least 512");
        }
        if self.limits.max_client_hello_bytes < 512 {
            return bad("limits.max_client_hello_bytes", "must be at least 512");
        }
        if self.limits.max_connections_per_core == 0 {
            return bad("limits.max_connections_per_core", "must be at least 1");
        }
        if self.limits.max_handshakes_in_flight == 0 {
            return bad("limits.max_handshakes_in_flight", "must be at least 1");
        }
        if self.key_ops.workers == 0 {
            return bad("key_ops.workers", "must be at least 1");
        }
        if self.key_ops.queue_depth == 0 {
            return bad("key_ops.queue_depth", "must be at least 1");
        }
        Ok(())
    }
}
