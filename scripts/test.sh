#!/usr/bin/env bash
# Sets up and runs tlsgate's whole test suite: system packages, formatting, lints, the
# dependency policy, then every test (unit, integration, SoftHSM2, real clients).
#
# Usage: scripts/test.sh            (from anywhere; needs Rust and a Debian-like system)
# Environment:
#   TLSGATE_TEST_PKCS11_MODULE/_TOKEN/_PIN   run the key-backend tests against another module too
#   TLSGATE_SKIP_LINT=1                      skip fmt/clippy/deny (quick local iterations)
#   CI=true                                  a test whose component (SoftHSM2, a client, a scanner,
#                                            io_uring) is missing fails instead of skipping
#
# Every skip prints `SKIPPED: <test>: <reason>`; the run ends with their count, which is zero on
# a machine this script set up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

step "system packages"
# p11-kit + p11-kit-modules: p11-kit-server and its client module, the out-of-process HSM that
# mgmt/tests/hsm_recovery.rs kills, freezes and restarts.
ensure_packages softhsm2 p11-kit p11-kit-modules openssl curl ca-certificates gcc make pkg-config prometheus \
    testssl.sh gnutls-bin python3 python3-venv opensc gdb pebble
# protobuf-compiler + libprotobuf-dev: protoc and its well-known types, which the etcd-client
# crate's build runs; etcd-server + etcd-client: the 3-member cluster mgmt/tests/fleet.rs starts.
ensure_packages protobuf-compiler libprotobuf-dev etcd-server etcd-client
ensure_sslyze
ensure_schemathesis
# The benchmark smoke below: HAProxy and nginx (+ its layer-4 stream module) beside tlsgate,
# nginx also as the plain-HTTP origin; python3 for the harness's tables; nghttp2's h2load as the
# independent bulk client (OpenSSL's s_time is the independent handshake client); ApacheBench
# (apache2-utils) for the TCP floor; iproute2's `ss`, which a data-plane test reads TCP segment
# counts from.
ensure_packages haproxy nginx libnginx-mod-stream python3 util-linux nghttp2-client apache2-utils iproute2

step "Rust tools"
ensure_rust_components
ensure_cargo_deny

if [[ "${TLSGATE_SKIP_LINT:-0}" != 1 ]]; then
    step "cargo fmt --check"
    cargo fmt --all -- --check

    step "cargo clippy -D warnings"
    cargo clippy --workspace --all-targets --locked -- -D warnings

    step "cargo deny (bans, licenses, sources)"
    cargo deny --log-level error check bans licenses sources
    check_no_ring

    step "structure (no .rs file over 800 lines; no import cycle between modules)"
    scripts/check-structure.sh
fi

step "dashboard renderer: draws every panel type of contrib/grafana/tlsgate.json (no browser)"
contrib/grafana/render.sh --check

step "build (the tests need the tlsgate binary and the PKCS#11 test shim)"
cargo build --workspace --all-targets --locked

step "tests"
skip_log=$(mktemp "${TMPDIR:-/tmp}/tlsgate-skips.XXXXXX")
trap 'rm -f "$skip_log"' EXIT
TLSGATE_SKIP_LOG="$skip_log" cargo test --workspace --locked --no-fail-fast

step "Debian package, installed into a throw-away root (dpkg -i, serve as the tlsgate user, purge)"
TLSGATE_SKIP_LOG="$skip_log" scripts/test-package.sh
step "Miri: the buffer-ring model (dataplane/bufring-model)"
# Nightly and its miri component, installed when missing; under CI=true a failed install fails
# the run (set -e), elsewhere it is a skip.
if ! cargo +nightly miri --version >/dev/null 2>&1; then
    if ! { rustup toolchain install nightly --profile minimal && rustup component add miri --toolchain nightly; }; then
        if [[ "${CI:-}" == true || "${CI:-}" == 1 ]]; then
            echo "error: cannot install nightly + miri (CI=true)" >&2
            exit 1
        fi
        echo "SKIPPED: miri: cannot install nightly + miri" | tee -a "$skip_log"
    fi
fi
if cargo +nightly miri --version >/dev/null 2>&1; then
    cargo +nightly miri test -p tlsgate-bufring-model
fi

step "benchmark smoke (side-by-side harness, --quick: one second per cell)"
target_dir=${CARGO_TARGET_DIR:-target}
bench_out=$(mktemp -d "${TMPDIR:-/tmp}/tlsgate-bench-smoke.XXXXXX")
benches/scripts/side-by-side.sh --quick --out "$bench_out" \
    --tlsgate "$target_dir/debug/tlsgate" --load "$target_dir/debug/tlsgate-load"
rm -rf "$bench_out"

step "skipped tests"
skips=$(grep -c '^SKIPPED: ' "$skip_log" || true)
if ((skips)); then
    sort "$skip_log"
fi
echo "skipped: $skips"
