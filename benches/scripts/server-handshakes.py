#!/usr/bin/env python3
"""How many full and resumed handshakes a server says it made: the side-by-side harness's
server-side confirmation of what a run measured (used by side-by-side.sh).

    server-handshakes.py count SERVER WHERE
        prints {"full": N, "resumed": M}, the server's totals so far
    server-handshakes.py delta SERVER WHERE BEFORE OUT --test TEST --slots N --client JSON
        the counts since BEFORE (a `count` output) into OUT; exits 1 when they contradict TEST
        or the client's own count (the `units` of its report, JSON)

Where each server keeps its count (WHERE):
  tlsgate-*  its metrics endpoint, HOST:PORT: tlsgate_handshakes_total{kind="full"|"resumed",
             result="ok"}, summed over the other labels
  haproxy    its stats socket: the frontend's ssl_sess (new sessions: full handshakes) and
             ssl_reused_sess (resumed) from `show stat`
  nginx      its stream access log, one `$ssl_session_reused` per connection (`r` resumed, `.`
             not), written through a buffer that nginx flushes every 100 ms

`delta` waits until the count has stopped moving (tlsgate publishes its cores' counters once
a second, nginx flushes its log every 100 ms), so the count holds all of the finished run.

What contradicts a test: any resumed handshake in a full run; in a resumed run, more full
handshakes than the client's slots (each makes one before resuming: tlsgate-load's warm-up,
s_time's first connection) plus 1 % of the run; in either, fewer handshakes than the client
made (less 1 %). Bulk runs are counted, not judged.
"""
import json
import re
import socket
import sys
import time
import urllib.request

METRIC = re.compile(r'^tlsgate_handshakes_total\{([^}]*)\}\s+([0-9.eE+]+)\s*$')
# The endpoint is on 127.0.0.1: never through an HTTP proxy the environment may name.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def tlsgate(where):
    with DIRECT.open(f"http://{where}/metrics", timeout=5) as r:
        text = r.read().decode()
    counts = {"full": 0, "resumed": 0}
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("result") == "ok" and labels.get("kind") in counts:
            counts[labels["kind"]] += int(float(m.group(2)))
    return counts


def haproxy(where):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(where)
    s.sendall(b"show stat\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    lines = data.decode().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"unexpected answer to `show stat`: {lines[:1]}")
    head = lines[0][2:].split(",")
    for line in lines[1:]:
        row = dict(zip(head, line.split(",")))
        if row.get("svname") == "FRONTEND":
            return {"full": int(row["ssl_sess"]), "resumed": int(row["ssl_reused_sess"])}
    raise ValueError("no FRONTEND line in `show stat`")


def nginx(where):
    try:
        with open(where) as f:
            marks = f.read().split()
    except FileNotFoundError:
        marks = []
    return {"full": marks.count("."), "resumed": marks.count("r")}


# Each server's reader, and how long its count must stay the same before it is taken as
# complete: tlsgate's cores publish their counters once a second, nginx flushes its log buffer
# every 100 ms, HAProxy counts live.
SERVERS = {"tlsgate": (tlsgate, 1.2), "nginx": (nginx, 0.3), "haproxy": (haproxy, 0.0)}


def count(server, where, settle=False):
    """With settle, waits (at most 10 s) until the count has not changed for the server's
    quiet time, so everything a finished run did is in it."""
    kind = "tlsgate" if server.startswith("tlsgate-") else server
    if kind not in SERVERS:
        raise ValueError(f"unknown server {server}")
    read, quiet = SERVERS[kind]
    counts = read(where)
    if not settle or not quiet:
        return counts
    start = time.monotonic()
    still_since = start
    while time.monotonic() - start < 10:
        time.sleep(0.2)
        again = read(where)
        if again != counts:
            counts, still_since = again, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
    return counts


def judge(test, slots, client, full, resumed):
    """Why the server's count contradicts the test and the client's count of handshakes
    (`client`, None when the client did not count them), or None."""
    total = full + resumed
    if test.startswith("full") and resumed:
        return f"the server resumed {resumed} of {total} handshakes in a full run"
    if test.startswith("resume"):
        allowed = slots + 0.01 * total
        if full > allowed:
            return (f"the server made {full} full handshakes of {total} in a resumed run (at "
                    f"most {allowed:.0f}: {slots} slots and 1 %)")
    if client is not None and (test.startswith("full") or test.startswith("resume")):
        # The server also counts the slots' first handshakes (and any that failed after its
        # handshake ended), so it may count a little more than the client, never less.
        if total < 0.99 * client:
            return f"the server counted {total} handshakes where the client made {client}"
    return None


def client_units(path):
    """The handshakes the client counted (its JSON's `units`), or None."""
    try:
        with open(path) as f:
            units = json.load(f).get("units")
    except (OSError, ValueError):
        return None
    return units if isinstance(units, int) else None


def main():
    args = sys.argv[1:]
    try:
        return run(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"server-handshakes: cannot read the count of {' '.join(args[1:3])}: {e}",
              file=sys.stderr)
        return 1


def run(args):
    if len(args) == 3 and args[0] == "count":
        print(json.dumps(count(args[1], args[2])))
        return 0
    if len(args) == 11 and args[0] == "delta" and args[5:10:2] == ["--test", "--slots", "--client"]:
        server, where, before_path, out = args[1:5]
        test, slots, client = args[6], int(args[8]), client_units(args[10])
        with open(before_path) as f:
            before = json.load(f)
        now = count(server, where, settle=True)
        full = now["full"] - before["full"]
        resumed = now["resumed"] - before["resumed"]
        why = judge(test, slots, client, full, resumed)
        with open(out, "w") as f:
            json.dump({"server": server, "full": full, "resumed": resumed, "client": client,
                       "contradiction": why}, f)
            f.write("\n")
        if why:
            print(f"server-handshakes: {server} {test}: {why}", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
