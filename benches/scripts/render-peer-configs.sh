#!/usr/bin/env bash
# Fills in configs/haproxy.cfg and configs/nginx.conf for one run and lays out what they read.
#
#   render-peer-configs.sh OUT_DIR LISTEN CHAIN_PEM KEY_PEM [BACKEND] [SIZES]
#
# LISTEN is HOST:PORT for the TLS listener; BACKEND is the plain-HTTP origin HAProxy forwards
# bulk requests to [127.0.0.1:8080]; SIZES lists the /bytes/N files to create [1048576].
set -euo pipefail

(($# >= 4)) || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
dir="$1" listen="$2" chain="$3" key="$4" backend="${5:-127.0.0.1:8080}" sizes="${6:-1048576}"
configs="$(cd "$(dirname "$0")/../configs" && pwd)"

mkdir -p "$dir/www/bytes" "$dir/tmp"
dir="$(cd "$dir" && pwd)"
# nginx workers run as an unprivileged user and must reach www/ (keys are read by the master).
chmod 755 "$dir" "$dir/www" "$dir/www/bytes"
cp "$chain" "$dir/chain.pem"
cp "$key" "$dir/key.pem"
chmod 600 "$dir/key.pem"
# HAProxy wants the chain and the key in one file.
cat "$chain" "$key" >"$dir/server.pem"
chmod 600 "$dir/server.pem"
for n in $sizes; do
    head -c "$n" /dev/zero | tr '\0' x >"$dir/www/bytes/$n"
done
for name in haproxy.cfg nginx.conf; do
    sed -e "s|@DIR@|$dir|g" -e "s|@LISTEN@|$listen|g" -e "s|@BACKEND@|$backend|g" \
        "$configs/$name" >"$dir/$name"
done
echo "$dir/haproxy.cfg"
echo "$dir/nginx.conf"
