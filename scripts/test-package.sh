#!/usr/bin/env bash
# The Debian package, installed for real into a throw-away root: builds it (scripts/package.sh
# --dev), then, in private mount and network namespaces, lays a tmpfs overlay over this machine's
# root and chroots into it, so `dpkg -i`, the postinst (the tlsgate user, the self-signed
# certificate), the service and `dpkg --purge` change nothing outside. Checks:
#   - the unit passes `systemd-analyze verify` and scores "OK" or better in `systemd-analyze
#     security`;
#   - the packaged config serves right after install: tlsgate runs as the tlsgate user with only
#     CAP_NET_BIND_SERVICE (as the unit starts it), binds port 443 of the private network
#     namespace, and curl completes a handshake verified against the packaged self-signed
#     certificate, through to a backend; `tlsgate ctl` answers on the packaged API socket;
#   - remove keeps the configuration, purge removes it, the user and the state directory.
# Needs root (namespaces, mounts, chroot). Without it: fails under CI=true, otherwise prints
# SKIPPED. Usage: scripts/test-package.sh [--deb FILE]   (--deb: test that package instead of
# building one from the debug build, e.g. a release package from scripts/package.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

skip() {
    if [[ ${CI:-} == true ]]; then
        echo "FAILED: package test: $1 (CI=true)" >&2
        exit 1
    fi
    echo "SKIPPED: package test: $1"
    [[ -n ${TLSGATE_SKIP_LOG:-} ]] && echo "SKIPPED: package test: $1" >>"$TLSGATE_SKIP_LOG"
    exit 0
}

[[ $(id -u) -eq 0 ]] || skip "needs root for mount and network namespaces and chroot"
ensure_packages adduser openssl curl util-linux systemd iproute2
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
grep -qw overlay /proc/filesystems || skip "the kernel has no overlay filesystem"

given=
if [[ ${1:-} == --deb ]]; then
    given=$(realpath "$2")
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/tlsgate-package.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [[ -n $given ]]; then
    deb=$given
else
    scripts/package.sh --dev --out "$work/deb"
    deb=$(ls "$work"/deb/tlsgate_*.deb)
fi
echo "package: $(basename "$deb") ($(du -h "$deb" | cut -f1))"

# Everything below runs in new mount, network and pid namespaces; they vanish with the command,
# and so does every process started in them (the pid namespace ends with its first process),
# whatever step fails.
unshare --mount --net --pid --fork --mount-proc --propagation private -- \
    bash -euo pipefail -s "$work" "$deb" <<'INNER'
work=$1
deb=$2
mkdir -p "$work/t"
mount -t tmpfs tmpfs "$work/t"
mkdir -p "$work/t/upper" "$work/t/work" "$work/t/root"
root=$work/t/root
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/t/upper,workdir=$work/t/work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
mount -t tmpfs tmpfs "$root/run"
ip link set lo up
cp "$deb" "$root/tmp/tlsgate.deb"
in_root() { chroot "$root" "$@"; }

echo "--- dpkg -i"
in_root env DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/tlsgate.deb
in_root getent passwd tlsgate
in_root stat -c '%U:%G %a %n' /var/lib/tlsgate /etc/tlsgate /etc/tlsgate/tlsgate.toml /etc/tlsgate/selfsigned.key
[[ $(in_root stat -c '%U %a' /var/lib/tlsgate) == "tlsgate 700" ]]
[[ $(in_root stat -c '%G %a' /etc/tlsgate/selfsigned.key) == "tlsgate 640" ]]
in_root test -x /usr/bin/tlsgate
in_root test -f /usr/share/bash-completion/completions/tlsgate
in_root test -f /usr/share/tlsgate/prometheus/alerts.yml

echo "--- systemd-analyze verify / security"
in_root systemd-analyze verify /usr/lib/systemd/system/tlsgate.service
score=$(in_root systemd-analyze security --offline=true /usr/lib/systemd/system/tlsgate.service | tail -1)
echo "$score"
grep -Eq 'exposure level for tlsgate.service: [0-9.]+ (OK|SAFE)' <<<"$score"

echo "--- start as the unit does: user tlsgate, only CAP_NET_BIND_SERVICE, the packaged config"
install -d -o "$(in_root id -u tlsgate)" -g "$(in_root id -g tlsgate)" -m 0750 "$root/run/tlsgate"
# chroot itself in the background (not the in_root function, which would fork a subshell), so
# $! is the pid that execs into tlsgate.
chroot "$root" setpriv --reuid tlsgate --regid tlsgate --init-groups --no-new-privs \
    --inh-caps -all,+net_bind_service --ambient-caps -all,+net_bind_service \
    --bounding-set -all,+net_bind_service \
    /usr/bin/tlsgate demo-backend --listen 127.0.0.1:8080 >"$work/backend.log" 2>&1 &
backend=$!
chroot "$root" setpriv --reuid tlsgate --regid tlsgate --init-groups --no-new-privs \
    --inh-caps -all,+net_bind_service --ambient-caps -all,+net_bind_service \
    --bounding-set -all,+net_bind_service \
    /usr/bin/tlsgate serve --config /etc/tlsgate/tlsgate.toml >"$work/serve.log" 2>&1 &
serve=$!
cleanup() { kill "$serve" "$backend" 2>/dev/null || true; wait "$serve" "$backend" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do
    in_root test -S /run/tlsgate/api.sock && break
    kill -0 "$serve" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
    sleep 0.1
done
body=$(curl -sS --max-time 10 --cacert "$root/etc/tlsgate/selfsigned.pem" https://localhost/package-test)
echo "curl https://localhost/ -> $body"
[[ -n $body ]]
status=$(grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs)' "/proc/$serve/status" | tr -s '\t' ' ')
echo "$status"
tlsgate_uid=$(in_root id -u tlsgate)
grep -q "^Uid: $tlsgate_uid $tlsgate_uid $tlsgate_uid $tlsgate_uid" <<<"$status"
grep -q '^CapEff: 0000000000000400' <<<"$status"   # CAP_NET_BIND_SERVICE (bit 10) only
grep -q '^NoNewPrivs: 1' <<<"$status"
in_root tlsgate ctl --socket /run/tlsgate/api.sock listeners list
kill -TERM "$serve"
wait "$serve" || { echo "serve exited $?"; cat "$work/serve.log"; exit 1; }
kill "$backend"; wait "$backend" 2>/dev/null || true
trap - EXIT

echo "--- dpkg -r keeps the configuration; dpkg --purge removes it, the user and the state"
in_root dpkg -r tlsgate
in_root test ! -e /usr/bin/tlsgate
in_root test -f /etc/tlsgate/tlsgate.toml
in_root dpkg --purge tlsgate
in_root test ! -e /etc/tlsgate
in_root test ! -e /var/lib/tlsgate
! in_root getent passwd tlsgate
! in_root dpkg -s tlsgate >/dev/null 2>&1
echo "package test: ok"
INNER
