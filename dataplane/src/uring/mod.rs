//! The io_uring driver: one pinned thread per core, each with its own ring.
//!
//! Kernel features required (checked at start-up by [`check_available`], which also says why
//! when they are missing so `io = "auto"` can fall back to the portable driver):
//! - multishot accept (Linux 5.19),
//! - provided buffer rings, `IORING_REGISTER_PBUF_RING` (5.19),
//! - multishot recv into a provided buffer ring (6.0).
//!
//! Layers:
//! - [`EventLoop`] is the generic per-core reactor: listeners, sockets, sends with partial-write
//!   handling, connects with a deadline, a tick, and eventfd wake-ups, reported to a
//!   [`Handler`]. It knows nothing of TLS.
//! - Every submission's `user_data` names an entry in a slab of in-flight operations; the entry
//!   owns whatever memory the kernel may touch (send bytes, socket address, timespec) until the
//!   completion for it arrives, also when the socket was closed meanwhile.
#![allow(unsafe_code)]

mod bufring;
mod ctl;
pub(crate) mod driver;
mod event_loop;
mod probe;
mod slab;
mod sys;

#[cfg(test)]
mod tests;

pub use ctl::Ctl;
pub use event_loop::{
    ConnectError, EventLoop, EventLoopBuilder, Handler, ListenerId, LoopStats, SocketId, Waker,
    DEFAULT_BUF_COUNT, DEFAULT_BUF_SIZE, DEFAULT_RECV_QUOTA, DEFAULT_RING_ENTRIES, DEFAULT_TICK,
};
pub use probe::{check_available, classify, Features, Unavailable};
pub use sys::{current_thread_affinity, pin_current_thread};

use std::net::SocketAddr;

/// Errors of the io_uring driver. None of them is caused by a peer: peer failures reach the
/// [`Handler`] as events, not as errors of the loop.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// io_uring cannot be used here; the reason says why.
    #[error("io_uring unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: Unavailable,
    },
    /// Creating the ring or registering a resource with it failed.
    #[error("io_uring set-up failed at {step}: {source}")]
    Setup {
        /// The set-up step that failed.
        step: &'static str,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// A socket call for a listener or an outgoing connection failed.
    #[error("{op} on {addr} failed: {source}")]
    Socket {
        /// The socket call.
        op: &'static str,
        /// The address involved.
        addr: SocketAddr,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// `io_uring_enter` failed in a way the loop cannot ride out.
    #[error("io_uring_enter failed: {source}")]
    Submit {
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// Pinning the loop's thread to its core failed.
    #[error("pinning the thread to core {core} failed: {source}")]
    Pin {
        /// The core asked for.
        core: usize,
        /// The kernel's answer.
        source: std::io::Error,
    },
}
