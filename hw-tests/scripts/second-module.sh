#!/usr/bin/env bash
# Runs the key-backend tests against a second real PKCS#11 module, Kryoptic, besides SoftHSM2:
# builds it from crates.io (OpenSSL linked dynamically), initialises a token in a temporary
# directory, and runs hw-tests with TLSGATE_TEST_PKCS11_MODULE/_TOKEN/_PIN pointing at it.
#
# Usage: hw-tests/scripts/second-module.sh      (from anywhere; not part of scripts/test.sh,
#                                                 since it builds another project: ~3 minutes)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/lib.sh

KRYOPTIC_VERSION=1.5.4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "packages (bindgen needs libclang; the module links the system OpenSSL; pkcs11-tool inits the token)"
ensure_packages libclang-dev libssl-dev opensc pkg-config softhsm2

step "fetch and build kryoptic ${KRYOPTIC_VERSION}"
mkdir -p "$work/fetch/src"
cat >"$work/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-kryoptic"
version = "0.0.0"
edition = "2021"
[dependencies]
kryoptic = "=${KRYOPTIC_VERSION}"
TOML
echo 'fn main() {}' >"$work/fetch/src/main.rs"
src=$(cd "$work/fetch" && cargo metadata --format-version 1 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="kryoptic"))')
cp -r "$(dirname "$src")" "$work/kryoptic"
# The crate exposes `minimal` but not its library's `dynamic` (link OpenSSL 3.0 from the system
# instead of building a newer one); add the pass-through feature in our copy.
sed -i 's|^minimal = \["kryoptic-lib/minimal"\]|&\ndynamic = ["kryoptic-lib/dynamic"]|' "$work/kryoptic/Cargo.toml"
(cd "$work/kryoptic" && cargo build --release --no-default-features --features minimal,dynamic --target-dir "$work/target")
module="$work/target/release/libkryoptic_pkcs11.so"

step "token"
export KRYOPTIC_CONF="$work/kryoptic.conf"
printf '[[slots]]\nslot = 42\ndbtype = "sqlite"\ndbargs = "%s"\n' "$work/token.sql" >"$KRYOPTIC_CONF"
so_pin=$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')
user_pin=$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')
pkcs11-tool --module "$module" --init-token --label second --so-pin "$so_pin" >/dev/null
pkcs11-tool --module "$module" --token-label second --login --login-type so --so-pin "$so_pin" \
    --init-pin --pin "$user_pin" >/dev/null

step "key-backend tests against kryoptic (and SoftHSM2 and software keys, as always)"
export TLSGATE_TEST_PKCS11_MODULE="$module" TLSGATE_TEST_PKCS11_TOKEN=second TLSGATE_TEST_PKCS11_PIN="$user_pin"
cargo test --locked -p tlsgate-hw-tests --test keys_backends -- --nocapture --test-threads 1
