#!/usr/bin/env bash
# Builds the Debian package with cargo-deb: target/debian/tlsgate_<version>-1_<arch>.deb (the
# binary, /etc/tlsgate/tlsgate.toml, the hardened systemd unit, shell completions, the Grafana
# dashboard and Prometheus alerts; the tlsgate user and a self-signed certificate come from the
# postinst). Packaging files live in packaging/.
#
# Usage: scripts/package.sh [--dev] [--out DIR]
#   --dev      package the debug build already made (the test command's package test) instead
#              of building a release
#   --out DIR  where to write the .deb (default: target/debian)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

profile=release
out=target/debian
while (($#)); do
    case $1 in
        --dev) profile=dev ;;
        --out) out=$2; shift ;;
        *) echo "usage: scripts/package.sh [--dev] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done

ensure_packages dpkg-dev
# protoc (and its well-known types) for the etcd-client crate's build.
ensure_packages protobuf-compiler libprotobuf-dev
ensure_cargo_deb

target_dir=${CARGO_TARGET_DIR:-target}
if [[ $profile == release ]]; then
    cargo build --release --locked -p tlsgate-mgmt --bin tlsgate
    bin=$target_dir/release/tlsgate
else
    bin=$target_dir/debug/tlsgate
    [[ -x $bin ]] || cargo build --locked -p tlsgate-mgmt --bin tlsgate
fi

# Shell completions from the binary's own command-line definition (packaging/ names these paths).
mkdir -p target/completions
"$bin" completions bash >target/completions/tlsgate.bash
"$bin" completions zsh >target/completions/_tlsgate
"$bin" completions fish >target/completions/tlsgate.fish

mkdir -p "$out"
cargo deb -p tlsgate-mgmt --no-build --profile "$profile" --no-strip --fast --output "$out"
