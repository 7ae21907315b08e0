#!/usr/bin/env bash
# Builds tlsgate on the AWS-LC FIPS module (cargo feature `fips`: aws-lc-fips-sys, whose build
# needs CMake, Go and libclang) and runs the TLS test subset under it: mgmt/tests/fips.rs (FIPS
# mode reported, only approved suites and groups negotiated, require_fips), serve_e2e (TLS 1.2
# and 1.3 with token and software keys, both io drivers) and session_resumption. The profile
# tables of tls_policy.rs are those of the ordinary build (ChaCha20 and X25519 are not offered in
# FIPS mode), so it is not part of this subset.
#
# Usage: scripts/fips.sh   (a separate target directory, target/fips, keeps the ordinary build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

step "system packages (the FIPS module's build: cmake, golang-go, libclang-dev)"
ensure_packages cmake golang-go libclang-dev softhsm2 openssl curl
# protoc (and its well-known types) for the etcd-client crate's build.
ensure_packages protobuf-compiler libprotobuf-dev

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/fips
step "build with --features fips"
cargo build --locked -p tlsgate-mgmt --features fips --all-targets
# The PKCS#11 fault-injection shim session_resumption loads.
cargo build --locked -p tlsgate-pkcs11-shim

step "tlsgate version"
"$CARGO_TARGET_DIR/debug/tlsgate" version

step "the TLS test subset on the FIPS module"
cargo test --locked --no-fail-fast -p tlsgate-mgmt --features fips \
    --test fips --test serve_e2e --test session_resumption
