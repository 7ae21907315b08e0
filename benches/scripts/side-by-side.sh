#!/usr/bin/env bash
# tlsgate side by side with HAProxy and nginx, on one machine, in one command.
#
#   benches/scripts/side-by-side.sh [options]
#
# Installs what is missing (Debian 12: haproxy, nginx + its stream module, softhsm2, python3,
# the libp11 OpenSSL engine, OpenSSL's pkcs11-provider from bookworm-backports, ApacheBench),
# builds tlsgate and tlsgate-load (release),
# makes ONE certificate set (a test CA, an ECDSA P-256 and an RSA-2048 leaf for localhost) used by
# every server, imports the same two keys into a SoftHSM2 token, and starts a plain-HTTP origin.
# Then, for each key (ecdsa, rsa) and key store (software, softhsm), it starts every server with
# one worker pinned to CPU 0 (tlsgate with the io_uring driver, tlsgate with the portable driver,
# HAProxy, nginx; all three terminate TLS and forward the bytes to the origin at layer 4) and runs
# the tests, alternating the servers (A B C D, B C D A, ...) --runs times, with tlsgate-load
# pinned to CPU 1. After each tlsgate-load run of full*, resume* and bulk, an independent client
# measures the same server the same way (independent-load.py: OpenSSL `s_time -new`/`-reuse`,
# nghttp2's `h2load` for bulk, Python's ssl module holding the idle connections, on a fresh
# server process like tlsgate-load's; server CPU and memory from /proc either way). Around each run it reads the
# server's own count of full and resumed handshakes (server-handshakes.py: tlsgate's metrics,
# HAProxy's stats socket, nginx's stream log); a count that contradicts the test or the client's
# fails the harness. It prints medians, the ratios
# tlsgate / HAProxy and tlsgate / nginx by both generators side by side, and each handshake
# figure as a multiple of the crypto floor (tlsgate-floor, run first on CPU 0), and keeps raw
# JSON, a CSV, the floor and the machine description in --out. Before the TLS runs, the TCP floor:
# HAProxy and nginx relaying plain TCP (no TLS) through the same origin, measured by ApacheBench
# with a new connection per request — what the two TCP connections of a handshake run cost
# without TLS.
#
# Options (defaults in brackets):
#   --quick               a CI smoke run: ecdsa, software, tests "full13 resume12 bulk idle",
#                         1 run of 1 s, 300 idle connections, no package install; fails
#                         unless every tlsgate run succeeded without an error
#   --runs N              alternated runs per cell [3]
#   --duration SECS       time bound of each run (full/resume/bulk) [3]
#   --concurrency N       connections in flight in handshake runs [4]
#   --servers "..."       any of tlsgate-uring tlsgate-portable haproxy nginx [all four]
#   --keys "..."          any of ecdsa rsa [ecdsa rsa]
#   --stores "..."        any of software softhsm [software softhsm]
#   --tests "..."         any of full13 full12 resume13 resume12 bulk idle [all six]
#   --hsm-tests "..."     tests for the softhsm store [full13 full12 resume13 resume12]: bulk
#                         and idle never touch the key after the handshake
#   --idle-connections N  connections held open in idle runs [10000; capped to what the file
#                         limit allows, two sockets per connection in each terminator]
#   --idle-runs N         alternated idle runs per cell, each on a fresh server process [1]
#   --bulk-bytes N        response size in bulk runs [1048576]
#   --bulk-requests N     requests of each independent (h2load) bulk run [1000]
#   --no-independent      only tlsgate-load (no s_time / h2load runs)
#   --syscalls            count each server's system calls during every tlsgate-load run
#                         (perf stat on the syscalls:sys_enter_* tracepoints; needs perf and
#                         tracefs) and print them per operation
#   --profile             sample each server's CPU during every tlsgate-load run (perf record,
#                         cpu-clock, kernel and user symbols) and print where it goes: the
#                         kernel's share by kind of work and the top symbols
#   --server-closes       full*/resume*: tlsgate-load waits for the server to close first, as
#                         s_time -www does (how the two clients end a connection differs)
#   --out DIR             where results go [benches/results/DATE-side-by-side]
#   --tlsgate PATH, --load PATH   use these binaries instead of building (tlsgate-floor is
#                         taken from beside tlsgate-load)
#   --no-install          never run apt-get (say what is missing instead)
#   --keep-work           keep the work folder (configs, logs, test keys, token) after the run
#   --server-cpu N / --load-cpu N [0 / 1]
#   --port-base N         first of the seven ports used on 127.0.0.1 [18440]: the origin, the
#                         four servers, the two tlsgate metrics endpoints
#
# Exit status: 0 when every run of every available server succeeded; 1 otherwise. A server that
# cannot run here (no io_uring; no way to a token key: HAProxy without pkcs11-provider) is
# skipped with its reason in the table.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
configs="$here/../configs"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }

quick=0 runs=3 duration=3 concurrency=4
servers="tlsgate-uring tlsgate-portable haproxy nginx"
keys="ecdsa rsa" stores="software softhsm"
tests="full13 full12 resume13 resume12 bulk idle"
hsm_tests="full13 full12 resume13 resume12"
idle_conns=10000 idle_runs=1 bulk_bytes=1048576 out="" tlsgate_bin="" load_bin="" install=1
independent=1 bulk_requests=1000 server_closes=0 syscalls=0 profile=0
server_cpu=0 load_cpu=1 port_base=18440 keep_work=0
set_runs="" set_duration="" set_tests="" set_idle="" set_install=""
while (($#)); do
    case "$1" in
        --quick) quick=1; shift ;;
        --runs) set_runs="$2"; shift 2 ;;
        --duration) set_duration="$2"; shift 2 ;;
        --concurrency) concurrency="$2"; shift 2 ;;
        --servers) servers="$2"; shift 2 ;;
        --keys) keys="$2"; shift 2 ;;
        --stores) stores="$2"; shift 2 ;;
        --tests) set_tests="$2"; shift 2 ;;
        --hsm-tests) hsm_tests="$2"; shift 2 ;;
        --idle-connections) set_idle="$2"; shift 2 ;;
        --idle-runs) idle_runs="$2"; shift 2 ;;
        --bulk-bytes) bulk_bytes="$2"; shift 2 ;;
        --bulk-requests) bulk_requests="$2"; shift 2 ;;
        --no-independent) independent=0; shift ;;
        --server-closes) server_closes=1; shift ;;
        --syscalls) syscalls=1; shift ;;
        --profile) profile=1; shift ;;
        --out) out="$2"; shift 2 ;;
        --tlsgate) tlsgate_bin="$2"; shift 2 ;;
        --load) load_bin="$2"; shift 2 ;;
        --no-install) set_install=0; shift ;;
        --keep-work) keep_work=1; shift ;;
        --server-cpu) server_cpu="$2"; shift 2 ;;
        --load-cpu) load_cpu="$2"; shift 2 ;;
        --port-base) port_base="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
done
if ((quick)); then
    runs=1 duration=1 keys="ecdsa" stores="software" tests="full13 resume12 bulk idle"
    idle_conns=300 install=0 concurrency=2 bulk_requests=50
fi
runs="${set_runs:-$runs}" duration="${set_duration:-$duration}" tests="${set_tests:-$tests}"
idle_conns="${set_idle:-$idle_conns}" install="${set_install:-$install}"
for s in $servers; do
    case "$s" in tlsgate-uring|tlsgate-portable|haproxy|nginx) ;; *) echo "unknown server $s" >&2; exit 2 ;; esac
done
for t in $tests $hsm_tests; do
    case "$t" in full13|full12|resume13|resume12|bulk|idle) ;; *) echo "unknown test $t" >&2; exit 2 ;; esac
done

say() { printf '\n== %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------
pkcs11_provider="" pkcs11_engine=""
find_provider() {
    pkcs11_provider="$(find /usr/lib -path '*ossl-modules/pkcs11.so' 2>/dev/null | head -n 1 || true)"
    # libp11's engine (Debian 12 main): nginx's way to a token key where the provider is missing.
    pkcs11_engine="$(find /usr/lib -path '*engines-3/pkcs11.so' 2>/dev/null | head -n 1 || true)"
}
if ((install)); then
    need=()
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v nginx >/dev/null || need+=(nginx)
    [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || need+=(libnginx-mod-stream)
    command -v softhsm2-util >/dev/null || need+=(softhsm2)
    command -v python3 >/dev/null || need+=(python3)
    command -v taskset >/dev/null || need+=(util-linux)
    command -v openssl >/dev/null || need+=(openssl)
    ((independent == 0)) || command -v h2load >/dev/null || need+=(nghttp2-client)
    command -v ab >/dev/null || need+=(apache2-utils)
    find_provider
    [[ -n "$pkcs11_engine" ]] || need+=(libengine-pkcs11-openssl)
    if ((${#need[@]})); then
        say "installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    find_provider
    if [[ -z "$pkcs11_provider" ]]; then
        say "installing pkcs11-provider (OpenSSL 3 provider for the peers' SoftHSM2 rows)"
        codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
        if [[ "$codename" == bookworm ]] &&
            ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
            # Debian 12 has pkcs11-provider only in backports.
            printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                >/etc/apt/sources.list.d/bookworm-backports.sources
            apt-get update -qq
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pkcs11-provider >/dev/null 2>&1 ||
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports pkcs11-provider >/dev/null 2>&1 ||
            echo "pkcs11-provider could not be installed: HAProxy's SoftHSM2 rows will be skipped, nginx's use the libp11 engine" >&2
    fi
fi
find_provider
# Idle runs hold two sockets per connection in each terminator (client and origin side); a
# process cannot go past its hard RLIMIT_NOFILE, so the idle count is capped to fit it and the
# memory figure is scaled per connection.
ulimit -n 262144 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fd_limit="$(ulimit -n)"
[[ "$fd_limit" != unlimited ]] || fd_limit=1048576

# ---------------------------------------------------------------------------------------------
# Binaries
# ---------------------------------------------------------------------------------------------
if [[ -z "$tlsgate_bin" || -z "$load_bin" ]]; then
    say "build (release): tlsgate, tlsgate-load, tlsgate-floor"
    (cd "$repo" && cargo build --release --locked -p tlsgate-mgmt -p tlsgate-benches >&2)
    tdir="${CARGO_TARGET_DIR:-$repo/target}"
    tlsgate_bin="${tlsgate_bin:-$tdir/release/tlsgate}"
    load_bin="${load_bin:-$tdir/release/tlsgate-load}"
fi
floor_bin="$(dirname "$load_bin")/tlsgate-floor"
for b in "$tlsgate_bin" "$load_bin" "$floor_bin"; do
    [[ -x "$b" ]] || { echo "not an executable: $b" >&2; exit 2; }
done
cpus="$(nproc)"
if ((quick && cpus < 2)); then
    echo "one CPU here: server and generator share it (the smoke still runs; figures mean little)" >&2
    server_cpu=0 load_cpu=0
fi
if ((server_cpu >= cpus || load_cpu >= cpus)); then
    echo "this machine has $cpus CPUs; --server-cpu $server_cpu / --load-cpu $load_cpu do not exist" >&2
    exit 2
fi

[[ -n "$out" ]] || out="$repo/benches/results/$(date -u +%Y-%m-%d)-side-by-side"
mkdir -p "$out/raw"
out="$(cd "$out" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/side-by-side.XXXXXX")"
((keep_work)) || trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir -p "$work/tmp" "$work/www/bytes" "$work/logs"
head -c "$bulk_bytes" /dev/zero | tr '\0' x >"$work/www/bytes/$bulk_bytes"

# ---------------------------------------------------------------------------------------------
# One certificate set for everyone, and the same keys on a SoftHSM2 token
# ---------------------------------------------------------------------------------------------
say "certificates and token in $work"
(
    cd "$work"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
        -out ca.pem -days 30 -subj "/CN=side-by-side test CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign >/dev/null 2>&1
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ecdsa.key 2>/dev/null
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa.key 2>/dev/null
    for k in ecdsa rsa; do
        openssl req -new -key "$k.key" -subj "/CN=localhost" -out "$k.csr" 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$k.ext"
        openssl x509 -req -in "$k.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
            -extfile "$k.ext" -out "$k.pem" 2>/dev/null
        cat "$k.pem" "$k.key" >"$k-haproxy.pem"
    done
    chmod 600 ./*.key ./*-haproxy.pem
)
softhsm_module=/usr/lib/softhsm/libsofthsm2.so
hsm_ok=1
if [[ " $stores " == *" softhsm "* ]]; then
    if [[ ! -e "$softhsm_module" ]]; then
        echo "SoftHSM2 is not installed ($softhsm_module): softhsm rows skipped" >&2
        hsm_ok=0
    else
        "$tlsgate_bin" token init-lab --dir "$work/token" --label bench >"$work/logs/token.log" 2>&1
        export SOFTHSM2_CONF="$work/token/softhsm2.conf"
        for k in ecdsa rsa; do
            "$tlsgate_bin" token import --token bench --pin "file:$work/token/user.pin" \
                --key-file "$work/$k.key" --label "bench-$k" >>"$work/logs/token.log" 2>&1
            python3 "$here/pkcs11-uri-pem.py" "pkcs11:token=bench;object=bench-$k;type=private" \
                >"$work/$k-uri.pem"
            cat "$work/$k.pem" "$work/$k-uri.pem" >"$work/$k-haproxy-hsm.pem"
        done
        if [[ -n "$pkcs11_provider" ]]; then
            sed -e "s|@PROVIDER@|$pkcs11_provider|" -e "s|@MODULE@|$softhsm_module|" \
                -e "s|@PIN_FILE@|$work/token/user.pin|" "$configs/openssl-pkcs11.cnf" >"$work/openssl-pkcs11.cnf"
        elif [[ -n "$pkcs11_engine" ]]; then
            # The engine takes the PIN itself, not a file: this throwaway bench token's PIN is
            # written into the work folder's OpenSSL configuration (mode 600, removed at exit).
            (umask 077 && sed -e "s|@ENGINE@|$pkcs11_engine|" -e "s|@MODULE@|$softhsm_module|" \
                -e "s|@PIN@|$(cat "$work/token/user.pin")|" "$configs/openssl-pkcs11-engine.cnf" \
                >"$work/openssl-pkcs11-engine.cnf")
        fi
    fi
fi

# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------
first_line() { "$@" 2>&1 </dev/null | head -n 1 || true; }
{
    echo "date         $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc        $cpus"
    echo "cpu          $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel       $(uname -sr)"
    echo "os           $(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown}")"
    echo "memory       $(grep MemTotal /proc/meminfo | awk '{print $2 " kB"}')"
    echo "governor     $(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo n/a)"
    echo "loadavg      $(cut -d' ' -f1-3 /proc/loadavg) (before)"
    echo "tlsgate      $(first_line "$tlsgate_bin" --version) ($(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo "generator    $(first_line "$load_bin" --version)"
    echo "haproxy      $(first_line haproxy -v)"
    echo "nginx        $(first_line nginx -v)"
    echo "openssl      $(first_line openssl version)"
    echo "ab           $(dpkg-query -W -f '${Version}' apache2-utils 2>/dev/null || echo n/a) (apache2-utils: the TCP floor's client)"
    echo "softhsm2     $(dpkg-query -W -f '${Version}' softhsm2 2>/dev/null || echo n/a)"
    echo "pkcs11-prov  $(dpkg-query -W -f '${Version}' pkcs11-provider 2>/dev/null || echo n/a)"
    echo "libp11-eng   $(dpkg-query -W -f '${Version}' libengine-pkcs11-openssl 2>/dev/null || echo n/a)"
    hsm_peers="pkcs11-provider (HAProxy, nginx)"
    [[ -n "$pkcs11_provider" ]] || hsm_peers="libp11 engine (nginx); HAProxy has no way to the token here"
    [[ -n "$pkcs11_provider" || -n "$pkcs11_engine" ]] || hsm_peers="none (no peer SoftHSM2 rows)"
    echo "peer tokens  $hsm_peers"
    echo "pinning      servers on CPU $server_cpu, generator and origin on CPU $load_cpu"
    echo "bounds       runs=$runs duration=${duration}s concurrency=$concurrency idle=$idle_conns x $idle_runs runs bulk=${bulk_bytes}B"
    echo "suites       TLS13_AES_128_GCM_SHA256 / TLS_ECDHE_{ECDSA,RSA}_WITH_AES_128_GCM_SHA256, group x25519"
} >"$out/machine.txt"
cat "$out/machine.txt" >&2

say "crypto floor on CPU $server_cpu"
taskset -c "$server_cpu" "$floor_bin" --pin-cpu "$server_cpu" --seconds "$( ((quick)) && echo 0.1 || echo 1)" \
    --json "$out/floor.json" >"$out/floor.txt"
cat "$out/floor.txt" >&2

# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------
origin_port=$port_base
declare -A port=([tlsgate-uring]=$((port_base + 1)) [tlsgate-portable]=$((port_base + 2))
    [haproxy]=$((port_base + 3)) [nginx]=$((port_base + 4)))
# tlsgate's metrics endpoints: their handshake counter confirms full vs resumed after each run.
declare -A metrics_port=([tlsgate-uring]=$((port_base + 5)) [tlsgate-portable]=$((port_base + 6)))
declare -A pid=() pids=() why=()
# 300 descriptors beside the connections: tlsgate refuses to start without its reserve of 256
# plus its per-core sockets (listeners, ring, wakers), which is more than HAProxy and nginx need.
if [[ "$fd_limit" != unlimited ]] && ((2 * (idle_conns + 300) + 300 > fd_limit)); then
    capped=$(((fd_limit - 300) / 2 - 300))
    echo "idle connections capped at $capped (from $idle_conns): RLIMIT_NOFILE is $fd_limit here" | tee -a "$out/machine.txt" >&2
    idle_conns=$capped
fi
maxconn=$((idle_conns + 300))

render() { # TEMPLATE OUTPUT KEY=VALUE...
    local tpl="$1" dst="$2"; shift 2
    local args=()
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$tpl" >"$dst"
}

wait_port() { # PORT PID
    local i
    for i in $(seq 1 200); do
        kill -0 "$2" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    return 1
}

# A port someone else already listens on would pass wait_port at once, and the run would measure
# that process instead of the one it started: every port must be free before anything starts.
for p in "$origin_port" "${port[@]}" "${metrics_port[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        echo "port $p on 127.0.0.1 is in use by another process; choose other ports with --port-base" >&2
        exit 1
    fi
done

render "$configs/origin.conf" "$work/origin.conf" "DIR=$work" "LISTEN=127.0.0.1:$origin_port" "MAXCONN=$((maxconn * 2))" "NOFILE=$fd_limit"
taskset -c "$load_cpu" nginx -e "$work/origin-error.log" -c "$work/origin.conf" >"$work/logs/origin.log" 2>&1 </dev/null &
origin_pid=$!

stop_server() { # NAME
    local p="${pid[$1]:-}"
    if [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; then
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    fi
    pid[$1]=""
}

cleanup() {
    for s in "${!pid[@]}"; do stop_server "$s"; done
    if kill -0 "$origin_pid" 2>/dev/null; then kill "$origin_pid" 2>/dev/null || true; wait "$origin_pid" 2>/dev/null || true; fi
    # The work folder holds test keys and a token: gone unless asked for.
    if ((keep_work)); then echo "work files kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

start_server() { # NAME KEY STORE -> pid[NAME], pids[NAME] or why[NAME]
    local s="$1" key="$2" store="$3" dir="$work/run-$1-$2-$3" listen="127.0.0.1:${port[$1]}"
    mkdir -p "$dir/tmp"
    why[$s]="" pid[$s]="" pids[$s]=""
    local env=() cmd=()
    case "$s" in
        tlsgate-*)
            local io="${s#tlsgate-}" pkcs11="" keyref="file:$work/$key.key"
            if [[ "$store" == softhsm ]]; then
                pkcs11="[pkcs11]\nmodule = \"$softhsm_module\"\ntoken = \"bench\"\npin = \"file:$work/token/user.pin\"\n"
                keyref="pkcs11:token=bench;object=bench-$key;type=private"
            fi
            render "$configs/tlsgate.toml" "$dir/tlsgate.toml" "PKCS11=$pkcs11" "IO=$io" \
                "LISTEN=$listen" "BACKEND=127.0.0.1:$origin_port" "CERT=$work/$key.pem" \
                "KEY=$keyref" "MAXCONN=$maxconn" "METRICS=127.0.0.1:${metrics_port[$s]}"
            sed -i 's/\\n/\n/g' "$dir/tlsgate.toml"
            cmd=("$tlsgate_bin" serve --config "$dir/tlsgate.toml")
            ;;
        haproxy|nginx)
            local keyfile="$work/$key.key" crt="$work/$key-haproxy.pem" variant=""
            # The TCP floor's store: the same relay without TLS (see "TCP floor" below); its
            # templates take the same placeholders and have no certificate or key.
            [[ "$store" != tcp ]] || variant="-tcp"
            if [[ "$store" == softhsm ]]; then
                if [[ -n "$pkcs11_provider" ]]; then
                    env=(OPENSSL_CONF="$work/openssl-pkcs11.cnf")
                    keyfile="$work/$key-uri.pem" crt="$work/$key-haproxy-hsm.pem"
                elif [[ "$s" == nginx && -n "$pkcs11_engine" ]]; then
                    # nginx loads `engine:NAME:ID` keys itself; the engine is initialised by
                    # the OpenSSL configuration (nginx does not call ENGINE_init).
                    env=(OPENSSL_CONF="$work/openssl-pkcs11-engine.cnf")
                    keyfile="\"engine:pkcs11:pkcs11:token=bench;object=bench-$key;type=private\""
                elif [[ "$s" == haproxy ]]; then
                    why[$s]="no OpenSSL pkcs11-provider (Debian 12: bookworm-backports), and Debian 12's HAProxy 2.6 is built without engine support"
                    return 1
                else
                    why[$s]="neither OpenSSL's pkcs11-provider nor the libp11 engine is installed"
                    return 1
                fi
            fi
            if [[ "$s" == haproxy ]]; then
                render "$configs/haproxy$variant.cfg" "$dir/haproxy.cfg" "DIR=$dir" "LISTEN=$listen" \
                    "BACKEND=127.0.0.1:$origin_port" "CRT=$crt" "MAXCONN=$maxconn"
                cmd=(haproxy -db -f "$dir/haproxy.cfg")
            else
                render "$configs/nginx$variant.conf" "$dir/nginx.conf" "DIR=$dir" "LISTEN=$listen" \
                    "BACKEND=127.0.0.1:$origin_port" "CERT=$work/$key.pem" "KEY=$keyfile" \
                    "MAXCONN=$((maxconn * 2))" "NOFILE=$fd_limit" \
                    "MASTER=$([[ "$store" == softhsm ]] && echo 'master_process off;' || true)"
                # -e: the error log before the configuration is read (not /var/log as non-root).
                cmd=(nginx -e "$dir/nginx-error.log" -c "$dir/nginx.conf")
            fi
            ;;
    esac
    env "${env[@]}" taskset -c "$server_cpu" "${cmd[@]}" >"$dir/server.log" 2>&1 </dev/null &
    local p=$!
    if ! wait_port "${port[$s]}" "$p"; then
        local last
        last="$(grep -v '^\s*$' "$dir/server.log" | tail -n 1 | cut -c1-160 || true)"
        why[$s]="did not start: ${last:-exited without a word, or not listening on ${port[$s]} within 10 s}"
        # The one start failure that is a reason rather than a defect: tlsgate's io_uring probe
        # saying the kernel or sandbox refuses io_uring (the data plane's `UringUnavailable`).
        local probe
        probe="$(grep -o 'io_uring unavailable: .*' "$dir/server.log" | head -n 1 | cut -c1-200 || true)"
        if [[ "$s" == tlsgate-uring && -n "$probe" ]]; then
            why[$s]="$probe"
            uring_unavailable=1
        fi
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
        return 1
    fi
    pid[$s]=$p
    # nginx: the worker is a child of the master; measure both.
    local all="$p" child
    for _ in $(seq 1 40); do
        child="$(pgrep -P "$p" | tr '\n' ',' || true)"
        [[ "$s" != nginx || -n "$child" ]] && break
        sleep 0.05
    done
    [[ -z "$child" ]] || all="$p,${child%,}"
    pids[$s]="$all"
}

restart_server() { # NAME KEY STORE: a fresh process (idle runs: its memory growth is not hidden
    # by what earlier runs freed into its allocator); non-zero (said) when it did not start
    stop_server "$1"
    start_server "$1" "$2" "$3" && return 0
    echo "  $1 did not restart: ${why[$1]}" >&2
    return 1
}

count_where() { # SERVER KEY STORE -> where the server keeps its count of full and resumed
    # handshakes (server-handshakes.py): tlsgate's metrics endpoint, HAProxy's stats socket,
    # nginx's stream log of `$ssl_session_reused`.
    case "$1" in
        tlsgate-*) echo "127.0.0.1:${metrics_port[$1]}" ;;
        haproxy) echo "$work/run-haproxy-$2-$3/stats.sock" ;;
        nginx) echo "$work/run-nginx-$2-$3/handshakes.log" ;;
    esac
}

count_before() { # SERVER WHERE REPORT LABEL -> REPORT.before; non-zero (said) when unread
    python3 "$here/server-handshakes.py" count "$1" "$2" >"$3.before" && return 0
    echo "  FAILED $4: no handshake count" >&2
    return 1
}

count_after() { # SERVER WHERE REPORT TEST SLOTS LABEL -> REPORT.server (the run's counts);
    # non-zero (said) when they contradict the test or the client's report
    local rc=0
    if ! python3 "$here/server-handshakes.py" delta "$1" "$2" "$3.before" "$3.server" \
        --test "$4" --slots "$5" --client "$3"; then
        echo "  FAILED $6: the server's count contradicts the test" >&2
        rc=1
    fi
    rm -f "$3.before"
    return "$rc"
}

wait_port "$origin_port" "$origin_pid" || { echo "the origin did not start:" >&2; cat "$work/logs/origin.log" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# TCP floor: the peers relaying plain TCP (no TLS) through the same origin, measured by ApacheBench
# (`ab`: HTTP/1.0, a new connection per request, the answer read to the origin's close), like a
# handshake run's connections without TLS. What a relay spends per connection here is the
# kernel's TCP work for the two connections plus the relay's own; a handshake run's cost less
# this is what TLS adds. tlsgate has no plain-TCP relay, so only the peers are measured.
# ---------------------------------------------------------------------------------------------
tcp_floor_peers=() floor_status=0
for s in $servers; do [[ "$s" == haproxy || "$s" == nginx ]] && tcp_floor_peers+=("$s"); done
if ((${#tcp_floor_peers[@]})); then
    if ! command -v ab >/dev/null; then
        echo "TCP floor: ab is not installed (apache2-utils)" | tee -a "$out/skipped.txt" >&2
        # Under CI nothing may be missing (the test command installs it).
        [[ "${CI:-}" != true && "${CI:-}" != 1 ]] || floor_status=1
    else
        say "TCP floor: ${tcp_floor_peers[*]} relaying plain TCP, ab on CPU $load_cpu"
        for run in $(seq 1 "$runs"); do
            for s in "${tcp_floor_peers[@]}"; do
                if ! start_server "$s" plain tcp; then
                    echo "  TCP floor: $s did not start: ${why[$s]}" >&2
                    floor_status=1
                    continue
                fi
                json="$out/raw/tcp-floor-$s-run$run.json"
                if ! python3 "$here/independent-load.py" --target "127.0.0.1:${port[$s]}" --test tcp \
                    --duration "$duration" --concurrency "$concurrency" --server-pids "${pids[$s]}" \
                    --load-cpu "$load_cpu" --json "$json" 2>"$json.err"; then
                    echo "  TCP floor: $s run $run failed: $(tail -n 1 "$json.err")" >&2
                    floor_status=1
                fi
                [[ -s "$json.err" ]] || rm -f "$json.err"
                stop_server "$s"
                printf '  %-8s %-8s %-9s %-17s run %s done\n' plain tcp tcp "$s" "$run" >&2
            done
        done
    fi
fi

# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
load_args() { # TEST -> array load[], and slots: the connections tlsgate-load keeps going at once
    local common=(--insecure-skip-verify --sni localhost --group x25519 --timeout 10
        --suite TLS13_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)
    slots="$concurrency"
    case "$1" in
        full13) load=(--mode full --tls 1.3 --concurrency "$concurrency" --duration "$duration") ;;
        full12) load=(--mode full --tls 1.2 --concurrency "$concurrency" --duration "$duration") ;;
        resume13) load=(--mode resume --tls 1.3 --concurrency "$concurrency" --duration "$duration") ;;
        resume12) load=(--mode resume --tls 1.2 --concurrency "$concurrency" --duration "$duration") ;;
        bulk) load=(--mode bulk --tls 1.3 --concurrency 2 --connections 2 --duration "$duration"
            --response-bytes "$bulk_bytes"); slots=2 ;;
        idle) load=(--mode idle --tls 1.3 --concurrency 4 --connections "$idle_conns"
            --duration 120 --hold 1) ;;
    esac
    load+=("${common[@]}")
    if ((server_closes)) && [[ "$1" == full* || "$1" == resume* ]]; then load+=(--server-closes); fi
}

status=0
uring_unavailable=0
python3 "$here/side-by-side-report.py" header >"$out/runs.csv"
: >"$out/skipped.txt"
for key in $keys; do
    for store in $stores; do
        [[ "$store" != softhsm || $hsm_ok == 1 ]] || continue
        cell_tests="$tests"
        if [[ "$store" == softhsm ]]; then
            cell_tests=""
            for t in $tests; do
                if [[ " $hsm_tests " == *" $t "* ]]; then cell_tests="$cell_tests $t"; fi
            done
        fi
        [[ -n "$cell_tests" ]] || continue
        say "key=$key store=$store: starting $servers"
        avail=()
        for s in $servers; do
            if start_server "$s" "$key" "$store"; then
                avail+=("$s")
            elif [[ "$s" == tlsgate-* ]] && ! [[ "$s" == tlsgate-uring && $uring_unavailable == 1 ]]; then
                # Our own server failing to start is a failure of the run, never a skip.
                echo "  FAILED: $s ($key, $store) $(printf '%s' "${why[$s]}")" >&2
                echo "  (log: $work/run-$s-$key-$store/server.log)" >&2
                status=1
            else
                echo "  skip $s ($key, $store): ${why[$s]}" | tee -a "$out/skipped.txt" >&2
            fi
        done
        ((${#avail[@]})) || continue
        n=${#avail[@]}
        for t in $cell_tests; do
            load_args "$t"
            cell_runs=$runs
            [[ "$t" != idle ]] || cell_runs=$idle_runs
            for run in $(seq 1 "$cell_runs"); do
                for i in $(seq 0 $((n - 1))); do
                    s="${avail[$(((i + run - 1) % n))]}"
                    if [[ "$t" == idle ]] && ! restart_server "$s" "$key" "$store"; then
                        status=1; continue
                    fi
                    if [[ -z "${pid[$s]}" ]] || ! kill -0 "${pid[$s]}" 2>/dev/null; then
                        echo "  $s is not running (log: $work/run-$s-$key-$store/server.log)" >&2
                        status=1; continue
                    fi
                    json="$out/raw/$key-$store-$t-$s-run$run.json"
                    # The server's own count of full and resumed handshakes, read before and
                    # after each generator's run (never during one): what confirms that a run
                    # measured what it says. A contradiction fails the harness.
                    where="$(count_where "$s" "$key" "$store")" label="$key $store $t $s run $run" counted=0
                    if [[ "$t" != idle ]]; then
                        if count_before "$s" "$where" "$json" "$label"; then counted=1; else status=1; fi
                    fi
                    perf_pid=""
                    if ((syscalls)); then
                        perf stat -x, -e 'syscalls:sys_enter_*' -p "${pids[$s]}" -o "$json.syscalls" &
                        perf_pid=$!
                        sleep 0.5
                    fi
                    prof_pid=""
                    if ((profile)); then
                        perf record -q -e cpu-clock -F 2999 -p "${pids[$s]}" -o "$json.perf" 2>/dev/null &
                        prof_pid=$!
                        sleep 0.5
                    fi
                    if ! taskset -c "$load_cpu" "$load_bin" --target "127.0.0.1:${port[$s]}" "${load[@]}" \
                        --server-pid "${pids[$s]}" --json "$json" --output none 2>"$json.err"; then
                        echo "  FAILED $key $store $t $s run $run: $(tail -n 1 "$json.err")" >&2
                        status=1
                    fi
                    [[ -s "$json.err" ]] || rm -f "$json.err"
                    if [[ -n "$perf_pid" ]]; then kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" || true; fi
                    if [[ -n "$prof_pid" ]]; then
                        kill -INT "$prof_pid" 2>/dev/null || true; wait "$prof_pid" || true
                        # Flat, by symbol: "[k]" kernel, "[.]" user space. Only the text is kept.
                        perf report -i "$json.perf" --stdio --no-children --sort sym -q \
                            --percent-limit 0.2 >"$json.profile" 2>/dev/null || true
                        rm -f "$json.perf" "$json.perf.old"
                    fi
                    if ((counted)) && ! count_after "$s" "$where" "$json" "$t" "$slots" "$label"; then
                        status=1
                    fi
                    python3 "$here/side-by-side-report.py" row "$json" "$key" "$store" "$t" "$s" "$run" >>"$out/runs.csv" || true
                    printf '  %-8s %-8s %-9s %-17s run %s done\n' "$key" "$store" "$t" "$s" "$run" >&2
                    if ((independent)); then
                        if [[ "$t" == bulk ]] && ! command -v h2load >/dev/null; then
                            [[ $run != 1 || $i != 0 ]] || echo "  independent bulk client: h2load is not installed (nghttp2-client)" | tee -a "$out/skipped.txt" >&2
                        else
                            ind="$out/raw/$key-$store-$t-$s-run$run-independent.json"
                            counted=0
                            if [[ "$t" == idle ]]; then
                                restart_server "$s" "$key" "$store" || { status=1; continue; }
                            elif count_before "$s" "$where" "$ind" "independent $label"; then
                                counted=1
                            else
                                status=1
                            fi
                            if ! python3 "$here/independent-load.py" --target "127.0.0.1:${port[$s]}" --test "$t" \
                                --duration "$duration" --concurrency "$concurrency" --server-pids "${pids[$s]}" \
                                --load-cpu "$load_cpu" --bulk-bytes "$bulk_bytes" --bulk-requests "$bulk_requests" \
                                --idle-connections "$idle_conns" --json "$ind" 2>"$ind.err"; then
                                echo "  FAILED independent $key $store $t $s run $run: $(tail -n 1 "$ind.err")" >&2
                                status=1
                            fi
                            [[ -s "$ind.err" ]] || rm -f "$ind.err"
                            if ((counted)) && ! count_after "$s" "$where" "$ind" "$t" "$concurrency" "independent $label"; then
                                status=1
                            fi
                            python3 "$here/side-by-side-report.py" row "$ind" "$key" "$store" "$t" "$s" "$run" >>"$out/runs.csv" || true
                        fi
                    fi
                done
            done
        done
        for s in "${avail[@]}"; do stop_server "$s"; done
    done
done
echo "loadavg      $(cut -d' ' -f1-3 /proc/loadavg) (after)" >>"$out/machine.txt"

python3 "$here/side-by-side-report.py" table "$out" | tee "$out/table.md"
if ((quick)); then
    # The CI smoke: every tlsgate run must have succeeded without a single error. Only io_uring
    # refused by the kernel or sandbox (the probe's reason, printed above) excuses the io_uring
    # rows; any other start failure already failed the run.
    ours=()
    for s in $servers; do
        [[ "$s" == tlsgate-* ]] || continue
        [[ "$s" == tlsgate-uring && $uring_unavailable == 1 ]] && continue
        ours+=("$s")
    done
    if ((${#ours[@]})) && ! python3 "$here/side-by-side-report.py" check "$out" ${ours[@]+"${ours[@]}"}; then
        status=1
    fi
fi
((floor_status == 0)) || status=1
echo
echo "raw results: $out"
exit "$status"
