#!/usr/bin/env bash
# Regenerates the fuzzing fixtures (a throwaway test PKI) and the seed corpora from real tools:
# ClientHellos captured from openssl s_client, gnutls-cli, curl and testssl.sh talking to
# openssl s_server through a recording relay, OCSP responses from `openssl ocsp`, a CRL from
# `openssl ca`, and the sample configurations of the README. Output: fuzz/corpus/<target>/ and
# the fixtures beside the fuzzing modules. Run from anywhere; it installs what it needs.
#
#   fuzz/make-seeds.sh            # everything (replaces the fixture PKI: OCSP seeds follow it)
#   fuzz/make-seeds.sh --keep-pki # keep the checked-in PKI, regenerate the seeds
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FUZZ=$ROOT/fuzz
DP_FIX=$ROOT/dataplane/src/fuzzing/fixtures
MG_FIX=$ROOT/mgmt/src/fuzzing/fixtures
KEEP_PKI=0
[[ ${1:-} == --keep-pki ]] && KEEP_PKI=1

need=()
for tool in openssl:openssl gnutls-cli:gnutls-bin curl:curl testssl:testssl.sh python3:python3; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
if ((${#need[@]})); then
    SUDO=; [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
cd "$WORK"
mkdir -p "$DP_FIX" "$MG_FIX"

# ---- the fixture PKI: CA and leaf (ECDSA P-256), valid for 100 years from when it was made ----
if ((KEEP_PKI)); then
    cp "$MG_FIX/ca.pem" "$MG_FIX/ca.key" "$MG_FIX/leaf.pem" .
    cp "$DP_FIX/leaf.key" .
else
    openssl ecparam -name prime256v1 -genkey -noout -out ca.ec
    openssl pkcs8 -topk8 -nocrypt -in ca.ec -out ca.key
    openssl req -x509 -new -key ca.key -subj "/CN=tlsgate fuzz CA" -days 36500 -sha256 \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -out ca.pem
    openssl ecparam -name prime256v1 -genkey -noout -out leaf.ec
    openssl pkcs8 -topk8 -nocrypt -in leaf.ec -out leaf.key
    openssl req -new -key leaf.key -subj "/CN=fuzz.example" -out leaf.csr
    printf 'subjectAltName=DNS:fuzz.example\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nauthorityInfoAccess=OCSP;URI:http://127.0.0.1:9/ocsp\n' > leaf.ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -set_serial 0x1234 -days 36500 \
        -sha256 -extfile leaf.ext -out leaf.pem 2>/dev/null
    cp ca.pem leaf.pem "$DP_FIX/"
    cp leaf.key "$DP_FIX/"
    cp ca.pem ca.key leaf.pem "$MG_FIX/"
fi

corpus() { mkdir -p "$FUZZ/corpus/$1"; echo "$FUZZ/corpus/$1"; }
# seed TARGET NAME [PREFIX-HEX] < bytes: one corpus file; PREFIX is the target's mode byte(s).
seed() {
    local dir; dir=$(corpus "$1")
    { [[ -n ${3:-} ]] && printf '%b' "$(sed 's/../\\x&/g' <<<"$3")"; cat; } > "$dir/$2"
}

# ---- OCSP responses from `openssl ocsp` (good, revoked, unknown, SHA-256 CertID, delegated) ----
: > index.txt
openssl ocsp -issuer ca.pem -cert leaf.pem -no_nonce -reqout req.der 2>/dev/null
openssl ocsp -issuer ca.pem -sha256 -cert leaf.pem -no_nonce -reqout req256.der 2>/dev/null
expiry=$(date -u -d '+100 years' +%y%m%d%H%M%SZ 2>/dev/null || echo 991231235959Z)
printf 'V\t%s\t\t1234\tunknown\t/CN=fuzz.example\n' "$expiry" > index.txt
openssl ocsp -index index.txt -rsigner ca.pem -rkey ca.key -CA ca.pem -reqin req.der \
    -respout good.der -ndays 36500 2>/dev/null
openssl ocsp -index index.txt -rsigner ca.pem -rkey ca.key -CA ca.pem -reqin req256.der \
    -respout good256.der -ndays 36500 2>/dev/null
openssl ocsp -index index.txt -rsigner ca.pem -rkey ca.key -CA ca.pem -reqin req.der \
    -respout nonext.der 2>/dev/null
printf 'R\t%s\t260101000000Z\t1234\tunknown\t/CN=fuzz.example\n' "$expiry" > index.txt
openssl ocsp -index index.txt -rsigner ca.pem -rkey ca.key -CA ca.pem -reqin req.der \
    -respout revoked.der -ndays 36500 2>/dev/null
: > index.txt
openssl ocsp -index index.txt -rsigner ca.pem -rkey ca.key -CA ca.pem -reqin req.der \
    -respout unknown.der -ndays 36500 2>/dev/null
# A delegated responder certificate (id-kp-OCSPSigning) issued by the CA.
openssl ecparam -name prime256v1 -genkey -noout -out resp.key
openssl req -new -key resp.key -subj "/CN=tlsgate fuzz OCSP responder" -out resp.csr
printf 'extendedKeyUsage=OCSPSigning\nkeyUsage=critical,digitalSignature\n' > resp.ext
openssl x509 -req -in resp.csr -CA ca.pem -CAkey ca.key -set_serial 0x77 -days 36500 -sha256 \
    -extfile resp.ext -out resp.pem 2>/dev/null
printf 'V\t%s\t\t1234\tunknown\t/CN=fuzz.example\n' "$expiry" > index.txt
openssl ocsp -index index.txt -rsigner resp.pem -rkey resp.key -CA ca.pem -reqin req.der \
    -respout delegated.der -ndays 36500 2>/dev/null
# Mode byte 0: checked as is; 1: re-signed by the fixture CA first (reaches past the signature).
for r in good good256 nonext revoked unknown delegated; do
    seed ocsp_response "$r" 00 < $r.der
    seed ocsp_response "$r-resigned" 01 < $r.der
done
printf '\x30\x03\x0a\x01\x01' | seed ocsp_response malformed-request 00
printf '\x30\x03\x0a\x01\x03' | seed ocsp_response try-later 00

# ---- PEM uploads: chains and CRLs (mode byte 0: chain, 1: CRL upload, 2: CRL file) ----
mkdir -p ca/newcerts && : > ca/index.txt && echo 01 > ca/crlnumber
cat > ca.cnf <<CNF
[ca]
default_ca = fz
[fz]
dir = ca
database = ca/index.txt
new_certs_dir = ca/newcerts
crlnumber = ca/crlnumber
certificate = ca.pem
private_key = ca.key
default_md = sha256
default_crl_days = 36500
CNF
openssl ca -config ca.cnf -gencrl -out empty.crl.pem 2>/dev/null
openssl ca -config ca.cnf -revoke leaf.pem -crl_reason keyCompromise 2>/dev/null
openssl ca -config ca.cnf -gencrl -out revoked.crl.pem 2>/dev/null
openssl crl -in revoked.crl.pem -outform DER -out revoked.crl.der
cat leaf.pem ca.pem | seed pem_upload chain 00
seed pem_upload leaf-only 00 < leaf.pem
cat ca.pem leaf.pem | seed pem_upload chain-wrong-order 00
{ cat leaf.key leaf.pem; echo "trailing text"; cat ca.pem; } | seed pem_upload chain-with-key 00
seed pem_upload crl-empty 01 < empty.crl.pem
seed pem_upload crl-revoked 01 < revoked.crl.pem
cat empty.crl.pem revoked.crl.pem | seed pem_upload crl-file-two 02
seed pem_upload crl-file-der 02 < revoked.crl.der

# ---- API JSON bodies (mode byte = which request) ----
seed api_json_bodies generate-key 00 <<<'{"type":"ec-p256","label":"web-2027","id":"01a2"}'
seed api_json_bodies import-key 01 < <(python3 -c 'import json,sys; print(json.dumps({"label":"old","pkcs8_pem":open("leaf.key").read()}))')
seed api_json_bodies csr 02 <<<'{"common_name":"www.example.com","sans":["www.example.com","*.example.com","10.0.0.1"]}'
python3 -c 'import json; print(json.dumps({"key":"web-2027","chain_pem":open("leaf.pem").read()+open("ca.pem").read()}))' | seed api_json_bodies put-cert 03
seed api_json_bodies put-cert-file-key 03 <<<'{"key":"file:keys/web.pem","chain_pem":""}'
seed api_json_bodies put-binding 04 <<<'{"certificates":[{"cert":"web","default":true,"names":["www.example.com"]},{"cert":"web-rsa"}]}'
python3 -c 'import json; print(json.dumps({"pem":open("revoked.crl.pem").read()}))' | seed api_json_bodies put-crl 05
seed api_json_bodies cert-id 06 <<<'web-2027.v2'

# ---- session tickets (mode byte 0: raw bytes as a ticket; 1: bit flips in a fresh ticket;
# 2: a fresh ticket presented at another time) ----
printf '\x01%.0s' {1..60} | seed ticket_decrypt ones 00
head -c 120 /dev/urandom | seed ticket_decrypt random 00
printf '\x00\x05\x00\x11\x40' | seed ticket_decrypt flip-header 01
printf '\x00\x40\x02\x00\x20\x07' | seed ticket_decrypt flip-body 01
printf '\x00\x00\x1c\x20' | seed ticket_decrypt later-2h 02
printf '\x01\x00\x00\x00\x3c' | seed ticket_decrypt earlier 02

# ---- ClientHellos: real clients against openssl s_server, through a relay that records each
# connection's first flight (the client's bytes before the server's first byte) ----
cat > relay.py <<'PY'
import os, socket, sys, threading
listen, upstream, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", listen)); srv.listen(64)
count = [0]; lock = threading.Lock()
def pipe(a, b, rec):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            if rec is not None and not rec["done"]: rec["buf"] += d
            b.sendall(d)
    except OSError: pass
    finally:
        try: b.shutdown(socket.SHUT_WR)
        except OSError: pass
def handle(c):
    with lock: count[0] += 1; n = count[0]
    u = socket.create_connection(("127.0.0.1", upstream))
    rec = {"buf": b"", "done": False}
    def back():
        try:
            first = True
            while True:
                d = u.recv(65536)
                if not d: break
                if first:
                    rec["done"] = True; first = False
                    if rec["buf"]:
                        open(os.path.join(out, "hello-%03d.bin" % n), "wb").write(rec["buf"])
                c.sendall(d)
        except OSError: pass
        finally:
            if not rec["done"] and rec["buf"]:
                open(os.path.join(out, "hello-%03d.bin" % n), "wb").write(rec["buf"])
            try: c.shutdown(socket.SHUT_WR)
            except OSError: pass
    t = threading.Thread(target=back); t.start()
    pipe(c, u, rec); t.join(); c.close(); u.close()
print("ready", flush=True)
while True:
    c, _ = srv.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
PY
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); RELAY=$(free_port)
mkdir -p hellos
openssl s_server -accept "$UP" -cert leaf.pem -key leaf.key -CAfile ca.pem -www -quiet \
    >/dev/null 2>&1 &
python3 relay.py "$RELAY" "$UP" hellos > relay.out &
for _ in $(seq 50); do grep -q ready relay.out 2>/dev/null && break; sleep 0.1; done
sc() { timeout 10 openssl s_client -connect "127.0.0.1:$RELAY" -servername fuzz.example -msg \
    -ign_eof "$@" < <(printf 'GET / HTTP/1.0\r\n\r\n') >/dev/null 2>&1 || true; }
sc
sc -tls1_2
sc -tls1_3
sc -alpn h2,http/1.1 -groups X25519:P-256
sc -tls1_3 -sess_out s13.pem
sc -tls1_3 -sess_in s13.pem                      # PSK resumption
sc -tls1_2 -sess_out s12.pem
sc -tls1_2 -sess_in s12.pem                      # session ticket
sc -tls1_2 -no_ticket -sess_out s12id.pem
sc -tls1_2 -no_ticket -sess_in s12id.pem         # session id
sc -noservername -tls1_2 -cipher ECDHE-ECDSA-AES128-GCM-SHA256
gc() { timeout 10 gnutls-cli --insecure -p "$RELAY" 127.0.0.1 "$@" </dev/null >/dev/null 2>&1 || true; }
gc
gc --priority 'NORMAL:-VERS-TLS1.3'
gc --sni-hostname fuzz.example --alpn h2
timeout 10 curl -sk --resolve "fuzz.example:$RELAY:127.0.0.1" "https://fuzz.example:$RELAY/" \
    -o /dev/null || true
timeout 10 curl -sk --tlsv1.2 --tls-max 1.2 --resolve "fuzz.example:$RELAY:127.0.0.1" \
    "https://fuzz.example:$RELAY/" -o /dev/null || true
# testssl.sh sends its own hand-made ClientHellos (every protocol, cipher lists, extensions).
timeout 300 testssl --quiet --warnings off --color 0 -p -f "127.0.0.1:$RELAY" \
    >/dev/null 2>&1 || true
sleep 1
python3 - hellos "$FUZZ/corpus" <<'PY'
import hashlib, os, sys
src, out = sys.argv[1], sys.argv[2]
seen = set(); kept = []
for name in sorted(os.listdir(src)):
    b = open(os.path.join(src, name), "rb").read()
    if not b or b[0] != 22 or hashlib.sha1(b).digest() in seen: continue
    seen.add(hashlib.sha1(b).digest()); kept.append((name, b))
kept = kept[:60]
for d in ("client_hello", "conn_core"):
    os.makedirs(os.path.join(out, d), exist_ok=True)
for name, b in kept:
    stem = name.rsplit(".", 1)[0]
    open(os.path.join(out, "client_hello", stem), "wb").write(b)
    # conn_core, raw mode (flags 0x00 inline, 0x01 offloaded): op 0 = client data, u16 LE length.
    for flags in (0, 1):
        n = len(b).to_bytes(2, "little")
        open(os.path.join(out, "conn_core", "%s-%d" % (stem, flags)), "wb").write(
            bytes([flags, 0]) + n + b)
print("kept %d ClientHellos" % len(kept))
PY

# ---- conn_core, scripted mode (flags bit 3: a real rustls client drives the connection) ----
for flags in 08 09 0a 0b 18 28 38 48 49 4b 88 8f; do
    printf '' | seed conn_core "scripted-$flags" "$flags"
    printf '\x02\x02\x02\x02\x10GET / HTTP/1.1\r\n\r\n\x02\x02' | seed conn_core "scripted-$flags-data" "$flags"
done

# ---- PROXY v2 (mode 0: encode fields then decode; 1: decode the bytes, re-encode, compare) ----
printf '\x0a\x01\x02\x03\x9c\x40\xc0\x00\x02\x01\x01\xbb' | seed proxy_v2 tcp4 0000
printf '\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x04\xd2\x0a\x00\x00\x01\x01\xbb\x02\x00\x0bexample.com' | seed proxy_v2 tcp6-mixed-tlv 0001
printf '\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a\x21\x11\x00\x0c\x0a\x01\x02\x03\xc0\x00\x02\x01\x9c\x40\x01\xbb' | seed proxy_v2 decode-tcp4 01
# mode 2: the tail is a client certificate whose identity becomes TLVs.
openssl x509 -in leaf.pem -outform DER | seed proxy_v2 identity-leaf 02
openssl x509 -in ca.pem -outform DER | seed proxy_v2 identity-ca 02

# ---- configuration files: the README's examples ----
python3 - "$ROOT/README.md" "$(corpus config_toml)" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
full = "\n".join(blocks)
open(sys.argv[2] + "/readme-all", "w").write(full)
for i, b in enumerate(blocks):
    open(sys.argv[2] + "/readme-%02d" % i, "w").write(b)
PY
cat > "$(corpus config_toml)/minimal" <<'TOML'
[[listener]]
name = "web"
bind = "127.0.0.1:8443"
backend = "127.0.0.1:8080"
[[listener.certificate]]
chain = "web.pem"
key = "file:web.key"
TOML
cat > "$(corpus config_toml)/custom-policy-mtls" <<'TOML'
[pkcs11]
token = "lab"
pin = "env:TLSGATE_PIN"
[dataplane]
cores = [0]
io = "portable"
[dataplane.limits]
max_client_hello_bytes = 4096
[[listener]]
name = "custom"
bind = "[::1]:0"
backend = "127.0.0.1:8080"
proxy_protocol = true
policy = "custom"
unknown_sni = "refuse"
[[listener.certificate]]
chain = "certs/internal-ecdsa.pem"
key = "pkcs11:token=lab;object=web%20key;id=%01%02;type=private"
names = ["www.example.com", "*.example.com"]
default = true
[listener.custom_policy]
versions = ["TLSv1.3", "TLSv1.2"]
suites = ["TLS_AES_256_GCM_SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384"]
groups = ["X25519", "P-384"]
[listener.client_auth]
mode = "optional"
ca = "zones/partners-ca.pem"
crls = ["zones/partners.crl.pem"]
[listener.session]
tickets = true
ticket_rotation_secs = 60
lifetime_secs = 600
cache_size = 0
fleet_secret = "pkcs11:token=lab;object=tickets;type=secret-key"
[api]
socket = "/run/tlsgate/api.sock"
socket_mode = 0o660
TOML
echo "seeds written under $FUZZ/corpus"
du -sh "$FUZZ/corpus"
