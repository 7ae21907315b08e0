#!/usr/bin/env bash
# Sets up and runs a tlsgate lab: a SoftHSM2 token with an ECDSA P-256 and an RSA-2048 key
# and a session-ticket secret, certificate chains for both from a lab CA, a demo HTTP backend, and the appliance in front of
# it. Prints how to reach it; Ctrl-C stops everything.
#
# Usage: scripts/lab.sh
# Environment:
#   TLSGATE_LAB_DIR    where the lab lives (default: $XDG_STATE_HOME/tlsgate-lab or
#                      ~/.local/state/tlsgate-lab; as root /var/lib/tlsgate-lab); recreated on
#                      each run
#   TLSGATE_LAB_USER   as root: the unprivileged user the appliance switches to once it has
#                      bound its port and logged in to the token (default tlsgate-lab, made
#                      with useradd --system when missing); the lab directory becomes theirs
#   TLSGATE_LAB_PORT   TLS port (default 8443); the backend listens on TLS port - 363 (8080)
#   TLSGATE_LAB_SETUP_ONLY=1   make the token, keys and certificates, then stop
#   TLSGATE_BIN        use this tlsgate binary instead of building target/release/tlsgate
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

LAB_USER=""
if [[ $(id -u) == 0 ]]; then
    # Never the appliance as root: it binds and opens the token as root, then switches to this
    # user ([process] user), who must be able to reach the lab directory (not under /root).
    LAB_USER=${TLSGATE_LAB_USER:-tlsgate-lab}
    LAB_DIR=${TLSGATE_LAB_DIR:-/var/lib/tlsgate-lab}
else
    LAB_DIR=${TLSGATE_LAB_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/tlsgate-lab}
fi
PORT=${TLSGATE_LAB_PORT:-8443}
BACKEND_PORT=$((PORT - 363))

step "system packages"
ensure_packages softhsm2 openssl curl ca-certificates gcc make pkg-config
# protoc (and its well-known types) for the etcd-client crate's build; etcd for fleet mode.
ensure_packages protobuf-compiler libprotobuf-dev etcd-server etcd-client

if [[ -n "$LAB_USER" ]] && ! id -u "$LAB_USER" >/dev/null 2>&1; then
    step "user $LAB_USER"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$LAB_USER"
fi

if [[ -n "${TLSGATE_BIN:-}" ]]; then
    BIN=$(realpath "$TLSGATE_BIN")
else
    step "build (release)"
    cargo build --release --locked -p tlsgate-mgmt
    BIN=$PWD/target/release/tlsgate
fi

step "lab directory $LAB_DIR"
if [[ -e "$LAB_DIR" && ! -e "$LAB_DIR/.tlsgate-lab" ]]; then
    echo "error: $LAB_DIR exists and is not a tlsgate lab; set TLSGATE_LAB_DIR elsewhere" >&2
    exit 1
fi
rm -rf "$LAB_DIR"
mkdir -p "$LAB_DIR/certs"
touch "$LAB_DIR/.tlsgate-lab"

step "token"
"$BIN" token init-lab --dir "$LAB_DIR/token" --label lab
export SOFTHSM2_CONF=$LAB_DIR/token/softhsm2.conf
export TLSGATE_TOKEN=lab
export TLSGATE_PIN=file:$LAB_DIR/token/user.pin
"$BIN" token generate --type ec-p256 --label web-ecdsa
"$BIN" token generate --type rsa-2048 --label web-rsa
"$BIN" token generate --type ticket-secret --label tickets

step "lab CA and certificate chains (leaf CSRs signed by the token keys)"
"$BIN" ca init-lab --dir "$LAB_DIR/ca"
for key in web-ecdsa web-rsa; do
    "$BIN" token issue-cert --key "pkcs11:token=lab;object=$key;type=private" \
        --ca-dir "$LAB_DIR/ca" --cn localhost --san localhost --san 127.0.0.1 \
        --out "$LAB_DIR/certs/$key.pem"
done

step "keys on the token"
"$BIN" token list

PROCESS_TOML=""
if [[ -n "$LAB_USER" ]]; then
    PROCESS_TOML=$'\n[process]                               # bind and open the token as root, then switch\nuser = "'"$LAB_USER"'"'
fi
cat >"$LAB_DIR/tlsgate.toml" <<TOML
# tlsgate lab configuration (made by scripts/lab.sh)
[pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"
token = "lab"
pin = "file:$LAB_DIR/token/user.pin"

[dataplane]
cores = [0]
io = "auto"
$PROCESS_TOML

[api]                                   # tlsgate ctl talks to this socket (owner only)
socket = "$LAB_DIR/api.sock"

[state]                                 # certificates, bindings, CRLs uploaded through the API
dir = "$LAB_DIR/state"

[[listener]]
name = "lab"
bind = "127.0.0.1:$PORT"
backend = "127.0.0.1:$BACKEND_PORT"

[listener.session]                # session-ticket keys derived from the token's secret
fleet_secret = "pkcs11:token=lab;object=tickets;type=secret-key"

[[listener.certificate]]
chain = "certs/web-ecdsa.pem"
key = "pkcs11:token=lab;object=web-ecdsa;type=private"

[[listener.certificate]]
chain = "certs/web-rsa.pem"
key = "pkcs11:token=lab;object=web-rsa;type=private"
TOML

if [[ -n "$LAB_USER" ]]; then
    # The appliance reads the token, PIN, configuration and chains, and writes its state and
    # ready file, as $LAB_USER.
    chown -R "$LAB_USER:" "$LAB_DIR"
fi

echo
echo "lab made in $LAB_DIR:"
echo "  token:        $LAB_DIR/token (SOFTHSM2_CONF=$SOFTHSM2_CONF)"
echo "  trust anchor: $LAB_DIR/ca/root.pem"
echo "  chains:       $LAB_DIR/certs/web-ecdsa.pem, $LAB_DIR/certs/web-rsa.pem"
echo "  config:       $LAB_DIR/tlsgate.toml"
if [[ "${TLSGATE_LAB_SETUP_ONLY:-0}" == 1 ]]; then
    exit 0
fi

step "demo backend and appliance"
"$BIN" demo-backend --listen "127.0.0.1:$BACKEND_PORT" &
BACKEND_PID=$!
trap 'kill "$BACKEND_PID" 2>/dev/null || true' EXIT
"$BIN" serve --config "$LAB_DIR/tlsgate.toml" --ready-file "$LAB_DIR/ready" &
SERVE_PID=$!
trap 'kill "$SERVE_PID" "$BACKEND_PID" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 100); do
    [[ -s "$LAB_DIR/ready" ]] && break
    kill -0 "$SERVE_PID" 2>/dev/null || { echo "error: tlsgate serve exited; see the log above" >&2; exit 1; }
    sleep 0.1
done
cat <<MSG

tlsgate is terminating TLS on https://localhost:$PORT/ with keys on the SoftHSM2 token "lab",
forwarding to the demo backend on 127.0.0.1:$BACKEND_PORT. Try:

  curl --cacert $LAB_DIR/ca/root.pem https://localhost:$PORT/
  openssl s_client -connect 127.0.0.1:$PORT -servername localhost -CAfile $LAB_DIR/ca/root.pem </dev/null
  $BIN ctl --socket $LAB_DIR/api.sock listeners list      # the management API (README)

Ctrl-C stops the appliance and the backend.
MSG
wait "$SERVE_PID"
