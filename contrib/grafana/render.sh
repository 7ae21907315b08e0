#!/usr/bin/env bash
# Draws the Grafana dashboard contrib/grafana/tlsgate.json over a lab run into docs/dashboard.png,
# without Grafana (Debian does not package it): a lab appliance (scripts/lab.sh: SoftHSM2 token,
# lab CA, demo backend) and a Prometheus server scraping its /metrics every second, a few minutes
# of traffic with some errors, then contrib/grafana/render/render.js runs every panel's queries
# against Prometheus's query_range API and draws the panels by their gridPos in headless Chromium.
#
# Usage: contrib/grafana/render.sh [--check] [--out FILE] [--seconds N]
#   --check      only check that the renderer draws every panel type and query form the
#                dashboard uses, and that promtool parses every query once substituted (no lab,
#                no browser)
#   --out FILE   where the PNG goes (default docs/dashboard.png)
#   --seconds N  length of the traffic run (default 150)
# Environment:
#   TLSGATE_BIN    tlsgate binary to use (default: cargo build --release -p tlsgate-mgmt)
#   TLSGATE_LOAD   tlsgate-load binary to use (default: cargo build --release -p tlsgate-benches)
#
# npm packages (package.json and package-lock.json beside render.js) go under the user's cache,
# never into the source tree. Every process this script starts is stopped by its PID at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/lib.sh

CHECK=0
OUT=docs/dashboard.png
RUN_SECONDS=150
while (($#)); do
    case $1 in
    --check) CHECK=1 ;;
    --out) OUT=$2; shift ;;
    --seconds) RUN_SECONDS=$2; shift ;;
    *) echo "usage: $0 [--check] [--out FILE] [--seconds N]" >&2; exit 2 ;;
    esac
    shift
done
DASHBOARD=$PWD/contrib/grafana/tlsgate.json
RENDER=$PWD/contrib/grafana/render

need_node() { command -v node >/dev/null || ensure_packages nodejs; }
need_npm() { command -v npm >/dev/null || ensure_packages npm; }

if ((CHECK)); then
    ensure_packages prometheus
    need_node
    rules=$(mktemp)
    trap 'rm -f "$rules"' EXIT
    node "$RENDER/render.js" --check --dashboard "$DASHBOARD" --rules-out "$rules"
    promtool check rules "$rules" >/dev/null # every substituted expression parses as PromQL
    echo "every panel query parses (promtool)"
    exit 0
fi

step "system packages"
ensure_packages softhsm2 openssl curl ca-certificates prometheus chromium python3
need_node
need_npm

step "npm packages (under the user's cache)"
lock_sum=$(sha256sum "$RENDER/package-lock.json" | cut -c1-16)
NPM_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/tlsgate-render/$lock_sum
if [[ ! -f "$NPM_DIR/.installed" ]]; then
    rm -rf "$NPM_DIR"
    mkdir -p "$NPM_DIR"
    cp "$RENDER/package.json" "$RENDER/package-lock.json" "$NPM_DIR/"
    (cd "$NPM_DIR" && npm ci --no-audit --no-fund --ignore-scripts)
    touch "$NPM_DIR/.installed"
fi
echo "node_modules in $NPM_DIR"

if [[ -n "${TLSGATE_BIN:-}" && -n "${TLSGATE_LOAD:-}" ]]; then
    BIN=$(realpath "$TLSGATE_BIN")
    LOAD=$(realpath "$TLSGATE_LOAD")
else
    step "build (release)"
    cargo build --release --locked -p tlsgate-mgmt -p tlsgate-benches
    BIN=${TLSGATE_BIN:-$PWD/target/release/tlsgate}
    LOAD=${TLSGATE_LOAD:-$PWD/target/release/tlsgate-load}
fi

# Free ports below the ephemeral range, so that none of the run's many client connections takes
# one as its source port while the backend is stopped.
free_ports() {
    python3 - "$1" <<'PY'
import random, socket, sys
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
held = []
while len(held) < int(sys.argv[1]):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(10000, max(low, 10001))))
        held.append(s)
    except OSError:
        s.close()
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}

WORK=$(mktemp -d)
chmod 755 "$WORK" # as root the appliance runs as the lab user, who must reach $WORK/lab
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do # "-PID": a traffic job's process group
        kill -- "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "${pid#-}" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r PORT BACKEND_PORT MTLS_PORT METRICS_PORT PROM_PORT < <(free_ports 5)
LAB=$WORK/lab

step "lab token, keys and certificates (scripts/lab.sh)"
TLSGATE_BIN=$BIN TLSGATE_LAB_DIR=$LAB TLSGATE_LAB_PORT=$PORT TLSGATE_LAB_SETUP_ONLY=1 \
    scripts/lab.sh >"$WORK/lab-setup.log" 2>&1 || { cat "$WORK/lab-setup.log" >&2; exit 1; }
export SOFTHSM2_CONF=$LAB/token/softhsm2.conf
CA=$LAB/ca/root.pem
sed -i "s/^backend = .*/backend = \"127.0.0.1:$BACKEND_PORT\"/" "$LAB/tlsgate.toml"

# The lab configuration plus metrics, a low per-core connection limit (so that accept pauses
# once), and a second listener with client certificates, whose policy the run changes
# (optional -> required) to show refused resumptions.
cat >>"$LAB/tlsgate.toml" <<TOML

[dataplane.limits]
max_connections_per_core = 64

[metrics]
listen = "127.0.0.1:$METRICS_PORT"

[[listener]]
name = "partners"
bind = "127.0.0.1:$MTLS_PORT"
backend = "127.0.0.1:$BACKEND_PORT"

[listener.session]
fleet_secret = "pkcs11:token=lab;object=tickets;type=secret-key"

[[listener.certificate]]
chain = "certs/web-ecdsa.pem"
key = "pkcs11:token=lab;object=web-ecdsa;type=private"

[listener.client_auth]
mode = "optional"
ca = "ca/root.pem"
TOML

step "demo backend, appliance, Prometheus"
start_backend() {
    rm -f "$WORK/backend.ready"
    "$BIN" demo-backend --listen "127.0.0.1:$BACKEND_PORT" --ready-file "$WORK/backend.ready" >>"$WORK/backend.log" 2>&1 &
    BACKEND_PID=$!
    PIDS+=("$BACKEND_PID")
    for _ in $(seq 1 100); do
        [[ -s "$WORK/backend.ready" ]] && return 0
        kill -0 "$BACKEND_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$WORK/backend.log" >&2
    echo "error: the demo backend did not start on 127.0.0.1:$BACKEND_PORT" >&2
    exit 1
}
start_backend
"$BIN" serve --config "$LAB/tlsgate.toml" --ready-file "$LAB/ready" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
PIDS+=("$SERVE_PID")
for _ in $(seq 1 300); do
    [[ -s "$LAB/ready" ]] && break
    kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; echo "error: tlsgate serve exited" >&2; exit 1; }
    sleep 0.1
done
[[ -s "$LAB/ready" ]] || { echo "error: tlsgate serve not ready after 30 s" >&2; exit 1; }

mkdir -p "$WORK/prometheus"
cat >"$WORK/prometheus/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: tlsgate
    static_configs:
      - targets: ["127.0.0.1:$METRICS_PORT"]
        labels:
          instance: lab
YML
prometheus --config.file="$WORK/prometheus/prometheus.yml" \
    --storage.tsdb.path="$WORK/prometheus/data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=("$!")
PROM=http://127.0.0.1:$PROM_PORT
for _ in $(seq 1 100); do
    curl -fs "$PROM/-/ready" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -fs "$PROM/-/ready" >/dev/null || { cat "$WORK/prometheus.log" >&2; exit 1; }
sleep 3
START=$(date +%s)

# --- traffic ---------------------------------------------------------------------------------
T=127.0.0.1:$PORT
load() { "$LOAD" --target "$T" --sni localhost --ca "$CA" --output none --timeout 3 "$@" >/dev/null 2>&1 || true; }
# Runs "$@" about once a second until $1 seconds from the start of the run have passed.
until_t() {
    local end=$(($1 + START))
    shift
    while (($(date +%s) < end)); do
        "$@"
        sleep 1
    done
}
at() { # waits until $1 seconds into the run
    local t=$(($1 + START - $(date +%s)))
    ((t > 0)) && sleep "$t"
    return 0
}
bad_hello() { # a TLS record that is no ClientHello, and a handshake with no shared group
    printf '\x16\x03\x01\x00\x08\x01\x00\x00\x04garbage!' >/dev/tcp/127.0.0.1/"$PORT" 2>/dev/null || true
    openssl s_client -connect "$T" -servername localhost -groups ffdhe2048 </dev/null >/dev/null 2>&1 || true
}
rsa_handshakes() { # the RSA key on the token signs these
    for _ in 1 2 3; do
        openssl s_client -connect "$T" -servername localhost -CAfile "$CA" -sigalgs RSA-PSS+SHA256 \
            </dev/null >/dev/null 2>&1 || true
    done
}
curl_get() { curl -s --cacert "$CA" "https://localhost:$PORT/" -o /dev/null --resolve "localhost:$PORT:127.0.0.1" || true; }

step "traffic for ${RUN_SECONDS} s (from $(date -u -d "@$START" +%H:%M:%S) UTC)"
S=$RUN_SECONDS
TRAFFIC=()
set -m # each job in its own process group, so that cleanup ends the job and its children
bg() {
    "$@" &
    PIDS+=("-$!")
    TRAFFIC+=("$!")
}
tls12() { at $((S * 10 / 100)); until_t $((S * 35 / 100)) load --mode full --tls 1.2 --group secp256r1 --connections 10 --duration 1; }
bad() { at $((S * 20 / 100)); until_t $((S * 30 / 100)) bad_hello; }
rsa() { at $((S * 25 / 100)); until_t $((S * 65 / 100)) rsa_handshakes; }
burst() { at $((S * 65 / 100)); until_t $((S * 75 / 100)) load --mode full --concurrency 4 --connections 150 --duration 1; }
# More connections than the per-core limit below, held open: accept pauses, the rest wait.
idle() { at $((S * 80 / 100)); load --mode idle --concurrency 8 --connections 72 --hold 3; }
bulk() { at $((S * 50 / 100)); until_t $((S * 58 / 100)) load --mode bulk --concurrency 2 --requests 400 --duration 1; }
bg until_t "$S" load --mode full --connections 12 --duration 1
bg until_t "$S" load --mode resume --connections 25 --duration 1
bg until_t "$S" curl_get
bg tls12
bg bad
bg rsa
bg burst
bg bulk
bg idle
set +m

# The backend away for a while: connections to it fail (errors by source: backend).
at $((S * 42 / 100))
echo "backend stopped"
kill "$BACKEND_PID" || { cat "$WORK/backend.log" >&2; echo "error: the demo backend had exited" >&2; exit 1; }
wait "$BACKEND_PID" 2>/dev/null || true
at $((S * 47 / 100))
start_backend
echo "backend started again"

# Refused resumptions: a session made while client certificates are optional, then the
# listener requires them (reload) and the session is offered again and again.
at $((S * 55 / 100))
# -ign_eof with a request: s_client stays until the response, so the TLS 1.3 ticket has arrived.
printf 'GET / HTTP/1.0\r\n\r\n' | openssl s_client -connect "127.0.0.1:$MTLS_PORT" -servername localhost \
    -CAfile "$CA" -ign_eof -sess_out "$WORK/session.pem" >/dev/null 2>&1 || true
[[ -s "$WORK/session.pem" ]] || echo "warning: no session saved; no refused resumptions to show" >&2
sed -i 's/^mode = "optional"/mode = "required"/' "$LAB/tlsgate.toml"
kill -HUP "$SERVE_PID"
echo "partners listener now requires client certificates (SIGHUP)"
sleep 1
resume_refused() {
    for _ in 1 2 3; do
        openssl s_client -connect "127.0.0.1:$MTLS_PORT" -servername localhost -CAfile "$CA" -sess_in "$WORK/session.pem" \
            </dev/null >/dev/null 2>&1 || true
    done
}
until_t $((S * 75 / 100)) resume_refused
at "$S"
for pid in "${TRAFFIC[@]}"; do
    wait "$pid" 2>/dev/null || true
done
sleep 3
END=$(date +%s)

step "scrape target health"
curl -fs "$PROM/api/v1/targets" | python3 -c '
import json, sys
for t in json.load(sys.stdin)["data"]["activeTargets"]:
    print(t["scrapeUrl"], t["health"], "last error:", t["lastError"] or "none")'
# Scrapes over the run that succeeded, of all made.
curl -fs "$PROM/api/v1/query" --data-urlencode "query=sum_over_time(up[$((END - START))s])" \
    --data-urlencode "time=$END" | python3 -c 'import json, sys; print("successful scrapes:", json.load(sys.stdin)["data"]["result"][0]["value"][1])'
curl -fs "$PROM/api/v1/query" --data-urlencode "query=count_over_time(up[$((END - START))s])" \
    --data-urlencode "time=$END" | python3 -c 'import json, sys; print("scrapes:           ", json.load(sys.stdin)["data"]["result"][0]["value"][1])'

step "render $OUT"
mkdir -p "$(dirname "$OUT")"
NODE_PATH=$NPM_DIR/node_modules node "$RENDER/render.js" --dashboard "$DASHBOARD" \
    --prometheus "$PROM" --start "$START" --end "$END" --scrape-interval 1 \
    --chromium "$(command -v chromium)" --out "$OUT" \
    --caption "tlsgate lab run, $((RUN_SECONDS / 60)) min $((RUN_SECONDS % 60)) s (contrib/grafana/render.sh)"
ls -l "$OUT"
