//! Every metric name the data plane emits, in one place (Prometheus conventions: `tlsgate_`
//! prefix, unit suffix, `_total` on counters, low-cardinality labels).
//!
//! Cores never touch the `metrics` facade on the hot path: they count into core-owned counters
//! and flush deltas here at most once a second (see `stats::CoreRecorder::flush`).

/// Connections accepted. Labels: `core`.
pub const CONNECTIONS_ACCEPTED_TOTAL: &str = "tlsgate_connections_accepted_total";
/// Connections closed. Labels: `core`, `reason` ([`crate::CloseReason::as_str`]).
pub const CONNECTIONS_CLOSED_TOTAL: &str = "tlsgate_connections_closed_total";
/// Connections that ended in error, by who caused it. Labels: `source` (`peer`|`backend`|`hsm`|
/// `internal`); derived from the close reasons, so it adds no recording of its own.
pub const ERRORS_TOTAL: &str = "tlsgate_errors_total";
/// Connections open now. Labels: `core`.
pub const CONNECTIONS_OPEN: &str = "tlsgate_connections_open";
/// Handshakes in flight now. Labels: `core`.
pub const HANDSHAKES_IN_FLIGHT: &str = "tlsgate_handshakes_in_flight";
/// Handshakes ended. Labels: `listener`, `version`, `suite`, `group`, `kind` (`full`|`resumed`),
/// `result` (`ok` or a failure reason).
pub const HANDSHAKES_TOTAL: &str = "tlsgate_handshakes_total";
/// Accept to handshake complete. Labels: `listener`, `kind`.
pub const HANDSHAKE_DURATION_SECONDS: &str = "tlsgate_handshake_duration_seconds";
/// Key operation, enqueue to result on the home core.
pub const KEY_OP_DURATION_SECONDS: &str = "tlsgate_key_op_duration_seconds";
/// Key operations by outcome. Labels: `result` (`queued`|`ok`|`rejected`|`timed_out`|`failed`|
/// `peer_refused`|`late`). `failed` is a failed PKCS#11 call only; `peer_refused` is a handshake
/// the client's hello failed on the worker (nothing in common, a bad hello).
pub const KEY_OPS_TOTAL: &str = "tlsgate_key_ops_total";
/// Key operations queued or running now, all cores. Set from the pool's own count about once a
/// second by the process that runs the data plane (`Dataplane::key_op_counters`).
pub const KEY_OP_QUEUE_DEPTH: &str = "tlsgate_key_op_queue_depth";
/// Bytes moved. Labels: `direction` (`client_in`|`client_out`|`backend_in`|`backend_out`).
pub const TRANSFERRED_BYTES_TOTAL: &str = "tlsgate_transferred_bytes_total";
/// Times a core stopped accepting because a per-core limit was reached. Labels: `core`.
pub const ACCEPT_PAUSED_TOTAL: &str = "tlsgate_accept_paused_total";
/// Counter, labels `core`, `errno` (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, `other`): accept
/// failed in the kernel (out of file descriptors or memory); the core stopped accepting for a
/// back-off period.
pub const ACCEPT_ERRORS_TOTAL: &str = "tlsgate_accept_errors_total";
/// Backend TLS sessions that failed. Labels: `listener`, `reason`
/// ([`crate::conn::BackendTlsCause::as_str`]: `certificate_expired`, `name_mismatch`,
/// `unknown_issuer`, ...). Each is also closed with reason `backend_tls_error`.
pub const BACKEND_TLS_ERRORS_TOTAL: &str = "tlsgate_backend_tls_errors_total";
/// 1 for the io driver that runs. Labels: `driver` (`uring`|`portable`).
pub const IO_DRIVER: &str = "tlsgate_io_driver";

/// Registers the help text and unit of every metric above with the installed recorder, so the
/// exposition carries `# HELP` lines (`promtool check metrics` wants them).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(CONNECTIONS_ACCEPTED_TOTAL, "Connections accepted, by core.");
    describe_counter!(
        BACKEND_TLS_ERRORS_TOTAL,
        "TLS handshakes to backends that failed, by listener and cause."
    );
    describe_counter!(
        CONNECTIONS_CLOSED_TOTAL,
        "Connections closed, by core and reason."
    );
    describe_counter!(
        ERRORS_TOTAL,
        "Connections that ended in error, by source (peer, backend, hsm, internal)."
    );
    describe_gauge!(CONNECTIONS_OPEN, "Connections open now, by core.");
    describe_gauge!(HANDSHAKES_IN_FLIGHT, "Handshakes in flight now, by core.");
    describe_counter!(
        HANDSHAKES_TOTAL,
        "Handshakes ended, by listener, version, suite, group, kind and result."
    );
    describe_histogram!(
        HANDSHAKE_DURATION_SECONDS,
        Unit::Seconds,
        "Accept to handshake complete, by listener and kind."
    );
    describe_histogram!(
        KEY_OP_DURATION_SECONDS,
        Unit::Seconds,
        "Offloaded key operation, enqueue to result on the home core."
    );
    describe_counter!(KEY_OPS_TOTAL, "Offloaded key operations, by result.");
    describe_gauge!(KEY_OP_QUEUE_DEPTH, "Key operations queued or running now.");
    describe_counter!(
        TRANSFERRED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes moved, by direction."
    );
    describe_counter!(
        ACCEPT_ERRORS_TOTAL,
        "Times accept failed in the kernel (out of file descriptors or memory), by core and errno."
    );
    describe_counter!(
        ACCEPT_PAUSED_TOTAL,
        "Times a core stopped accepting at a per-core limit."
    );
    describe_gauge!(
        IO_DRIVER,
        "1 for the io driver that runs (uring or portable)."
    );
}
