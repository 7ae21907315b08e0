#!/usr/bin/env bash
# Runs one fuzz target under libFuzzer (cargo-fuzz, nightly Rust), seeded with the checked-in
# corpus. Installs the nightly toolchain and cargo-fuzz when they are missing.
#
#   scripts/fuzz.sh TARGET DURATION [--save-corpus] [-- LIBFUZZER-OPTIONS...]
#   scripts/fuzz.sh --list
#
# DURATION: seconds, or with a unit: 90s, 15m, 2h. New corpus entries and crash artifacts go
# to $TLSGATE_FUZZ_DIR (default ~/.cache/tlsgate/fuzz), never into the source tree;
# --save-corpus merges the new entries that add coverage into fuzz/corpus/TARGET afterwards.
# Environment: FUZZ_SANITIZER (default none: the product is safe Rust outside io_uring, which
# no target reaches; `address` builds with AddressSanitizer), FUZZ_JOBS (parallel fuzzers,
# default 1), FUZZ_NICE (default 0).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGETS=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$ROOT/fuzz/Cargo.toml" | grep -v '^tlsgate-fuzz$')

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    echo "targets: $(echo $TARGETS)"
    exit 2
}

[[ ${1:-} == --list ]] && { echo "$TARGETS"; exit 0; }
[[ $# -ge 2 ]] || usage
TARGET=$1
DURATION=$2
shift 2
grep -qx "$TARGET" <<<"$TARGETS" || { echo "unknown target $TARGET" >&2; usage; }
case $DURATION in
    *h) SECS=$((${DURATION%h} * 3600)) ;;
    *m) SECS=$((${DURATION%m} * 60)) ;;
    *s) SECS=${DURATION%s} ;;
    *) SECS=$DURATION ;;
esac
[[ $SECS =~ ^[0-9]+$ && $SECS -gt 0 ]] || { echo "bad duration $DURATION" >&2; usage; }

SAVE=0
EXTRA=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --save-corpus) SAVE=1 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "unknown option $1" >&2; usage ;;
    esac
    shift
done

# tlsgate-mgmt builds etcd-client, whose build script runs protoc.
source "$ROOT/scripts/lib.sh"
ensure_packages protobuf-compiler libprotobuf-dev

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

WORK=${TLSGATE_FUZZ_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tlsgate/fuzz}
NEW_CORPUS=$WORK/corpus/$TARGET
ARTIFACTS=$WORK/artifacts/$TARGET
mkdir -p "$NEW_CORPUS" "$ARTIFACTS"
SANITIZER=${FUZZ_SANITIZER:-none}
JOBS=${FUZZ_JOBS:-1}

cd "$ROOT/fuzz"
echo "fuzzing $TARGET for ${SECS}s (sanitizer $SANITIZER, $JOBS job(s)); new inputs in $NEW_CORPUS"
start=$(date +%s)
set +e
# The first corpus directory receives new inputs; the checked-in one is only read.
nice -n "${FUZZ_NICE:-0}" cargo +nightly fuzz run --sanitizer "$SANITIZER" --debug-assertions \
    --jobs "$JOBS" "$TARGET" "$NEW_CORPUS" "$ROOT/fuzz/corpus/$TARGET" -- \
    -max_total_time="$SECS" -artifact_prefix="$ARTIFACTS/" -print_final_stats=1 "${EXTRA[@]}"
rc=$?
set -e
echo "$TARGET: ran $(($(date +%s) - start))s, exit $rc"

if ((SAVE)); then
    # Adds to the checked-in corpus only the new inputs that cover something it does not.
    cargo +nightly fuzz run --sanitizer "$SANITIZER" --debug-assertions "$TARGET" \
        "$ROOT/fuzz/corpus/$TARGET" "$NEW_CORPUS" -- -merge=1
fi

if ((rc != 0)); then
    cat >&2 <<EOF
$TARGET failed; the input is in $ARTIFACTS. Next:
  cd fuzz && cargo +nightly fuzz tmin --sanitizer $SANITIZER --debug-assertions $TARGET $ARTIFACTS/<crash-file>
  copy the minimized input to fuzz/regressions/$TARGET/<what-it-is>, fix the product, and check
  that the replay test fails without the fix:
  cargo test -p tlsgate-dataplane --lib fuzzing   # client_hello, proxy_v2, conn_core
  cargo test -p tlsgate-mgmt --lib fuzzing        # the others
EOF
fi
exit $rc
