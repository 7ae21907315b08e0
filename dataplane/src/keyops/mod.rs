//! Key operations off the io threads: everything a signature on a token needs between a
//! ClientHello on a core and the signed server flight coming back.
//!
//! - `hint`: which path a hello takes on a listener whose keys are on a token (may it resume?
//!   does the second hello after a HelloRetryRequest sign?);
//! - `tripwire`: the twin configuration whose keys refuse to sign, and the inline resumption
//!   attempt under it;
//! - [`job`]: what a connection hands out ([`KeyOpJob`]) and what a worker does with it
//!   ([`run_key_op`]);
//! - `admission`: the one gate each core puts in front of the pool (its in-flight bound, the
//!   deadline, the counters), used by both io drivers;
//! - [`pool`]: the shared workers, their bounded queue and their deadline handling.

pub(crate) mod admission;
pub(crate) mod hint;
pub mod job;
pub mod pool;
pub(crate) mod tripwire;

pub(crate) use admission::{Admission, Admitted};
pub use job::{is_key_failure, run_key_op, KeyOpDone, KeyOpFailure, KeyOpJob, KeyOpResult};
pub use pool::{KeyOpCounters, KeyOpPool, KeyOpReply, KeyOpRequest, KEY_OP_WORKER_NICE};
pub use tripwire::inline_resumption_attempt;
pub(crate) use tripwire::tripwire_config;
