#!/usr/bin/env bash
# Runs one TLS server pinned to one core and tlsgate-load pinned to another, for each mode and
# TLS version asked, and prints a table headed by a description of the machine. Raw JSON reports
# and the server's log are kept in the output folder.
#
#   bench-tlsgate.sh [options] -- SERVER_COMMAND [ARGS...]
#
# The server command runs in the foreground (no daemonising) and listens on --target, e.g.
#   bench-tlsgate.sh --ca ca.pem --target 127.0.0.1:8443 -- tlsgate serve --config tlsgate.toml
#   bench-tlsgate.sh --ca ca.pem --target 127.0.0.1:8443 -- \
#       openssl s_server -accept 127.0.0.1:8443 -cert leaf.pem -key leaf.key -www -quiet
#
# Options (defaults in brackets):
#   --load PATH          tlsgate-load binary [tlsgate-load on PATH, else target/release/tlsgate-load]
#   --target HOST:PORT   where the server listens [127.0.0.1:8443]
#   --sni NAME           [localhost]
#   --ca FILE            trust anchors; or --insecure-skip-verify
#   --modes "M..."       any of full resume bulk idle [full resume]
#   --tls "V..."         any of 1.3 1.2 [1.3 1.2]
#   --group NAME         [x25519]
#   --concurrency N      [4]
#   --connections N      count bound per run [20000]
#   --requests N         count bound for bulk runs [2000]
#   --response-bytes N   bulk response size (path /bytes/N) [1048576]
#   --duration SECS      time bound per run [10]
#   --server-cpu N       core for the server [0]
#   --load-cpu N         core for the generator [1]
#   --label TEXT         server name in the table [first word of the server command]
#   --out DIR            where raw results go [a new temporary folder]
#   --load-arg ARG       extra argument for tlsgate-load (repeatable)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }

load="" target="127.0.0.1:8443" sni="localhost" ca="" insecure=0
modes="full resume" tls_versions="1.3 1.2" group="x25519" concurrency=4 connections=20000
requests=2000 response_bytes=1048576 duration=10 server_cpu=0 load_cpu=1 label="" out=""
extra=()
while (($#)); do
    case "$1" in
        --load) load="$2"; shift 2 ;;
        --target) target="$2"; shift 2 ;;
        --sni) sni="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --insecure-skip-verify) insecure=1; shift ;;
        --modes) modes="$2"; shift 2 ;;
        --tls) tls_versions="$2"; shift 2 ;;
        --group) group="$2"; shift 2 ;;
        --concurrency) concurrency="$2"; shift 2 ;;
        --connections) connections="$2"; shift 2 ;;
        --requests) requests="$2"; shift 2 ;;
        --response-bytes) response_bytes="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --server-cpu) server_cpu="$2"; shift 2 ;;
        --load-cpu) load_cpu="$2"; shift 2 ;;
        --label) label="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --load-arg) extra+=("$2"); shift 2 ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
done
(($#)) || { echo "missing: -- SERVER_COMMAND [ARGS...]" >&2; usage; }
[[ -n "$ca" || $insecure == 1 ]] || { echo "give --ca FILE or --insecure-skip-verify" >&2; exit 2; }

if [[ -z "$load" ]]; then
    here="$(cd "$(dirname "$0")" && pwd)"
    if command -v tlsgate-load >/dev/null; then
        load="$(command -v tlsgate-load)"
    elif [[ -x "$here/../../target/release/tlsgate-load" ]]; then
        load="$here/../../target/release/tlsgate-load"
    else
        echo "tlsgate-load not found: build it (cargo build --release -p tlsgate-benches) or give --load" >&2
        exit 2
    fi
fi
[[ -n "$label" ]] || label="$(basename "$1")"
[[ -n "$out" ]] || out="$(mktemp -d "${TMPDIR:-/tmp}/bench-tlsgate.XXXXXX")"
mkdir -p "$out"
host="${target%:*}" port="${target##*:}"

cpus="$(nproc)"
if ((server_cpu >= cpus || load_cpu >= cpus)); then
    echo "this machine has $cpus CPUs: --server-cpu $server_cpu / --load-cpu $load_cpu do not exist" >&2
    exit 2
fi
if ((server_cpu == load_cpu)); then
    echo "warning: server and generator share CPU $server_cpu; rates will show both" >&2
fi

version_of() {
    local v
    for flag in --version -v version; do
        if v="$(timeout 5 "$1" "$flag" 2>&1 </dev/null | head -n 1)" && [[ -n "$v" ]]; then
            echo "$v"; return
        fi
    done
    echo "unknown"
}

describe_machine() {
    echo "# machine"
    echo "date         $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpus         $cpus ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
    echo "kernel       $(uname -sr)"
    echo "os           $(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown}")"
    echo "governor     $(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo n/a)"
    echo "generator    $("$load" --version) pinned to CPU $load_cpu"
    echo "server       $label: $(version_of "$1") pinned to CPU $server_cpu"
    echo "openssl      $(openssl version 2>/dev/null || echo n/a)"
    echo "command      $*"
    echo "bounds       connections=$connections requests=$requests duration=${duration}s concurrency=$concurrency group=$group"
}

server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

describe_machine "$@" | tee "$out/machine.txt"

# taskset execs the server, so $! is the server's own PID.
taskset -c "$server_cpu" "$@" >"$out/server.log" 2>&1 </dev/null &
server_pid=$!

ready=0
for _ in $(seq 1 200); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "the server exited before listening; its log:" >&2
        cat "$out/server.log" >&2
        exit 1
    fi
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
        ready=1; break
    fi
    sleep 0.05
done
((ready)) || { echo "nothing listens on $target after 10 s; server log in $out/server.log" >&2; exit 1; }

# Multi-process servers (an nginx master and its worker): measure the whole tree.
pids="$server_pid"
for child in $(pgrep -P "$server_pid" || true); do pids="$pids,$child"; done

verify=(--insecure-skip-verify)
[[ -z "$ca" ]] || verify=(--ca "$ca")

echo
echo "# results ($label; rate is handshakes/s, or requests/s for bulk; cpu in us per handshake or request)"
header="$(printf '%-7s %-4s %-15s %4s %8s %6s %10s %7s %7s %8s %9s %9s %6s %6s %-9s' \
    mode tls group conc ok errors rate p50_us p99_us max_us gen_cpu srv_cpu gen_busy srv_busy limit)"
echo "$header" | tee "$out/table.txt"
status=0
for tls in $tls_versions; do
    for mode in $modes; do
        bounds=(--connections "$connections")
        case "$mode" in
            bulk) bounds=(--requests "$requests" --response-bytes "$response_bytes") ;;
        esac
        json="$out/$label-$mode-tls$tls.json"
        if ! taskset -c "$load_cpu" "$load" --target "$target" --sni "$sni" "${verify[@]}" \
            --mode "$mode" --tls "$tls" --group "$group" --concurrency "$concurrency" \
            "${bounds[@]}" --duration "$duration" --server-pid "$pids" --json "$json" \
            --output row ${extra[@]+"${extra[@]}"} 2>"$out/$label-$mode-tls$tls.err" \
            | tee -a "$out/table.txt"; then
            why="$(grep -m1 -E '^(Error|error)' "$out/$label-$mode-tls$tls.err" || tail -n 1 "$out/$label-$mode-tls$tls.err")"
            echo "  ($mode tls$tls failed: $why)" | tee -a "$out/table.txt"
            status=1
        fi
        # The first failure of each kind, as the generator reported it.
        grep '^first ' "$out/$label-$mode-tls$tls.err" | sed 's/^/    /' | tee -a "$out/table.txt" || true
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "the server died during $mode tls$tls; log in $out/server.log" >&2
            exit 1
        fi
    done
done
echo
echo "raw results: $out"
exit "$status"
