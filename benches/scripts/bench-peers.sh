#!/usr/bin/env bash
# Side-by-side: the same tlsgate-load runs against HAProxy and nginx (installed here when
# missing), each pinned to one core with the configs in benches/configs/.
#
#   bench-peers.sh CHAIN_PEM KEY_PEM CA_PEM [bench-tlsgate.sh options...]
#
# The certificate must be for `localhost` (or pass --sni). Results go to one folder per server.
set -euo pipefail

(($# >= 3)) || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
chain="$1" key="$2" ca="$3"; shift 3
here="$(cd "$(dirname "$0")" && pwd)"

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
if ((${#need[@]})); then
    echo "installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/bench-peers.XXXXXX")"
chmod 755 "$work"
"$here/render-peer-configs.sh" "$work/haproxy" 127.0.0.1:8443 "$chain" "$key" 127.0.0.1:8080 >/dev/null
"$here/render-peer-configs.sh" "$work/nginx" 127.0.0.1:8444 "$chain" "$key" >/dev/null

"$here/bench-tlsgate.sh" --ca "$ca" --target 127.0.0.1:8444 --label nginx --out "$work/nginx/results" \
    --modes "full resume" "$@" -- nginx -c "$work/nginx/nginx.conf"
"$here/bench-tlsgate.sh" --ca "$ca" --target 127.0.0.1:8443 --label haproxy --out "$work/haproxy/results" \
    --modes "full resume" "$@" -- haproxy -db -f "$work/haproxy/haproxy.cfg"
