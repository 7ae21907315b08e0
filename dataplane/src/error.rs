use std::io;
use std::net::SocketAddr;

/// Errors of the data plane's public API (start-up, shutdown). Per-connection failures are not
/// errors of the API: they are counted and logged (see [`crate::outcome::CloseReason`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is unusable.
    #[error("invalid data-plane configuration `{key}`: {why}")]
    Config {
        /// The offending key.
        key: &'static str,
        /// What is wrong and what to do.
        why: &'static str,
    },
    /// A listener socket could not be made.
    #[error("listener `{listener}` on {addr}: {op} failed: {source}")]
    Listen {
        /// Listener name.
        listener: String,
        /// Bind address.
        addr: SocketAddr,
        /// The failing step (socket, setsockopt, bind, listen).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another socket (another process, or another tlsgate) already listens on the address.
    /// `SO_REUSEPORT` would let us join its group and share its traffic; we refuse instead.
    #[error(
        "listener `{listener}` on {addr}: the address is in use by another socket (another \
         process, or another tlsgate); refusing to share it through SO_REUSEPORT"
    )]
    AddressInUse {
        /// Listener name.
        listener: String,
        /// Bind address.
        addr: SocketAddr,
    },
    /// io_uring was demanded (`io = "uring"`) but cannot run here.
    #[error("io_uring unavailable: {why}")]
    UringUnavailable {
        /// Why (disabled by sysctl, seccomp, not built in).
        why: String,
    },
    /// A worker thread could not be started.
    #[error("starting thread `{name}`: {source}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A thread's start hook ([`crate::config::ThreadStart`]) failed on it.
    #[error("thread `{thread}` could not restrict itself: {why}")]
    ThreadStart {
        /// Thread name.
        thread: String,
        /// What the hook said.
        why: String,
    },
    /// A core worker failed while running.
    #[error("core {core} worker failed: {why}")]
    Worker {
        /// Core index.
        core: usize,
        /// What happened.
        why: String,
    },
    /// A snapshot does not fit the running data plane (listener sockets are made once at start).
    #[error("snapshot listener `{listener}` does not exist in the running data plane")]
    UnknownListener {
        /// The listener name.
        listener: String,
    },
}
