#!/usr/bin/env bash
# Memory a terminator holds for slow readers of a large object from a fast origin.
#
#   benches/scripts/slow-readers.sh [options]
#
# Sets up a lab token and certificates (scripts/lab.sh, setup only) in a temporary folder,
# starts nginx as a plain-HTTP origin serving one random object, then for each io driver and
# each client count starts tlsgate (one core), lets that many `curl --limit-rate` clients fetch
# the object through it for a while, and prints the process's RSS before, after, at its peak
# and once the clients have gone. The clients read far slower than the origin sends, so what the
# terminator holds per connection is what backpressure lets through.
#
# Options (defaults in brackets):
#   --tlsgate PATH        the binary [target/release/tlsgate, built when missing]
#   --io "..."            any of uring portable [uring portable]
#   --clients "..."       client counts [1 16 64]
#   --seconds N           how long the clients read [15]
#   --rate R              each client's read rate, as curl's --limit-rate [1500k]
#   --object-mb N         size of the object [200]
#   --port N              TLS port on 127.0.0.1; the origin uses N - 3 [28543]
# Output: one line per run, and the same as a Markdown table at the end.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

bin="$repo/target/release/tlsgate"
ios="uring portable"
counts="1 16 64"
secs=15
rate=1500k
object_mb=200
port=28543
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tlsgate) bin="$2"; shift 2 ;;
        --io) ios="$2"; shift 2 ;;
        --clients) counts="$2"; shift 2 ;;
        --seconds) secs="$2"; shift 2 ;;
        --rate) rate="$2"; shift 2 ;;
        --object-mb) object_mb="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
done
origin_port=$((port - 3))

source "$repo/scripts/lib.sh"
ensure_packages nginx curl
if [[ ! -x "$bin" ]]; then
    (cd "$repo" && cargo build --release -p tlsgate-mgmt)
fi

work=$(mktemp -d -t tlsgate-slow.XXXXXX)
# As root the appliance runs as the lab user, who must reach the token under it.
chmod 755 "$work"
nginx_pid=""
serve_pid=""
clients=()
cleanup() {
    [[ ${#clients[@]} -gt 0 ]] && kill "${clients[@]}" 2>/dev/null || true
    [[ -n "$serve_pid" ]] && kill "$serve_pid" 2>/dev/null || true
    [[ -n "$nginx_pid" ]] && kill "$nginx_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/www"
head -c $((object_mb * 1000000)) /dev/urandom >"$work/www/object"
TLSGATE_LAB_DIR="$work/lab" TLSGATE_LAB_PORT="$port" TLSGATE_LAB_SETUP_ONLY=1 TLSGATE_BIN="$bin" \
    "$repo/scripts/lab.sh" >"$work/lab.log" 2>&1 || { tail -20 "$work/lab.log"; exit 1; }
cat >"$work/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/nginx.err;
events {}
http { access_log off; sendfile on; server { listen 127.0.0.1:$origin_port; root $work/www; } }
EOF
# nginx's output goes to a file: a child holding this script's stdout keeps callers waiting.
taskset -c 1 nginx -c "$work/nginx.conf" >"$work/nginx.out" 2>&1 &
nginx_pid=$!
sleep 0.5
kill -0 "$nginx_pid" 2>/dev/null || { echo "the origin did not start:" >&2; cat "$work/nginx.err" >&2; exit 1; }
export SOFTHSM2_CONF="$work/lab/token/softhsm2.conf"

rss() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
rows=()
for io in $ios; do
    for n in $counts; do
        sed -e "s#^backend = .*#backend = \"127.0.0.1:$origin_port\"#" -e "s#^io = .*#io = \"$io\"#" \
            "$work/lab/tlsgate.toml" >"$work/lab/run.toml"
        [[ $(id -u) == 0 ]] && chown "$(stat -c %U "$work/lab")" "$work/lab/run.toml"
        rm -f "$work/lab/ready"
        taskset -c 0 "$bin" serve --config "$work/lab/run.toml" --ready-file "$work/lab/ready" \
            >"$work/serve-$io-$n.log" 2>&1 &
        serve_pid=$!
        for _ in $(seq 100); do [[ -s "$work/lab/ready" ]] && break; sleep 0.1; done
        [[ -s "$work/lab/ready" ]] || { tail -20 "$work/serve-$io-$n.log"; exit 1; }
        sleep 0.5
        before=$(rss "$serve_pid" VmRSS)
        clients=()
        for _ in $(seq "$n"); do
            taskset -c 1 curl -s -o /dev/null --limit-rate "$rate" --cacert "$work/lab/ca/root.pem" \
                "https://localhost:$port/object" &
            clients+=($!)
        done
        sleep "$secs"
        after=$(rss "$serve_pid" VmRSS)
        # What the clients read (wchar: what curl wrote to /dev/null, the body): a run where they
        # read nothing measured nothing.
        read_mb=$(for c in "${clients[@]}"; do cat "/proc/$c/io" 2>/dev/null || true; done |
            awk '/^wchar:/ {s += $2} END {printf "%d", s / 1000000}')
        peak=$(rss "$serve_pid" VmHWM)
        kill "${clients[@]}" 2>/dev/null || true
        wait "${clients[@]}" 2>/dev/null || true
        clients=()
        sleep 1
        left=$(rss "$serve_pid" VmRSS)
        kill "$serve_pid"
        wait "$serve_pid" 2>/dev/null || true
        serve_pid=""
        if [[ ${read_mb:-0} -lt $n ]]; then
            echo "io=$io clients=$n: the clients read only ${read_mb:-0} MB; see $work/serve-$io-$n.log" >&2
            tail -5 "$work/serve-$io-$n.log" >&2
            exit 1
        fi
        per=$(( (after - before) / n ))
        echo "io=$io clients=$n: RSS before $before KiB, after ${secs}s $after KiB (+$(( (after - before) / 1024 )) MiB, $per KiB per client), peak $peak KiB, after the clients left $left KiB; the clients read $read_mb MB"
        rows+=("| $io | $n | $read_mb | $before | $after | $(( (after - before) / 1024 )) | $per | $peak | $left |")
    done
done
echo
echo "| io | clients | MB the clients read | RSS before (KiB) | after ${secs} s (KiB) | growth (MiB) | per client (KiB) | peak (KiB) | after the clients left (KiB) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
