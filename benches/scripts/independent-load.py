#!/usr/bin/env python3
"""One run of an independent client against a TLS terminator, reported like tlsgate-load.

    independent-load.py --target HOST:PORT --test TEST --duration SECS --concurrency N
                        --server-pids PID[,PID...] --load-cpu CPU --json FILE
                        [--bulk-bytes N] [--bulk-requests N] [--idle-connections N] [--hold S]

Clients (none of them ours):
  full13 full12      OpenSSL `s_time -new -www /`: a full handshake and one GET / per connection
                     (N processes)
  resume13 resume12  OpenSSL `s_time -reuse -www /`: one full handshake, then every connection
                     resumes the session and does one GET / (N processes; without reading an
                     answer a TLS 1.3 client never gets a ticket); its progress marks ('r'
                     resumed, '*' not) confirm from the client side that they resumed
  bulk               nghttp2's `h2load --h1` with 2 keep-alive connections, GET /bytes/N for a
                     fixed number of requests
  tcp                ApacheBench (`ab`, N concurrent) over plain HTTP/1.0: a new connection per
                     GET /, read to the close (the TCP floor: a relay without TLS)
  idle               Python's `ssl` module (OpenSSL): --idle-connections TLS 1.3 connections
                     opened one after another, each handshake completed and nothing sent, held
                     --hold seconds; the server's RSS growth from before the first to after the
                     last, per connection

The server's CPU time (user + system, /proc/PID/stat of every PID) and its wake-ups (voluntary
context switches of every thread, /proc/PID/task/*/status) are read before and after;
the JSON has the fields side-by-side-report.py reads from tlsgate-load's report, and
"generator_name". Exits non-zero when the client failed or nothing completed.
"""
import argparse
import json
import os
import re
import resource
import socket
import ssl
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu(pids):
    """(user, system) seconds of these processes, threads included."""
    user = system = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # Fields 14 and 15 (utime, stime) counted from 1; the split starts at field 3.
        user += int(fields[11]) / TICK
        system += int(fields[12]) / TICK
    return user, system


def switches(pids):
    """Voluntary context switches of these processes, all threads: each is the process going to
    sleep for lack of work and being woken again (a wake-up)."""
    n = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    m = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", f.read(), re.M)
            except FileNotFoundError:
                continue
            n += int(m.group(1)) if m else 0
    return n


def rss_kib(pids):
    """Resident memory of these processes, KiB (VmRSS, as tlsgate-load reads it)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
        total += int(m.group(1)) if m else 0
    return total


def idle(args, pids):
    """Opens --idle-connections TLS 1.3 connections with Python's ssl module (OpenSSL), holds
    them, and returns (units, errors, confirm, rss) with the server's RSS before and loaded."""
    os.sched_setaffinity(0, {int(args.load_cpu)})
    # One descriptor per held connection.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    host, port = args.target.rsplit(":", 1)
    held, errors, in_a_row, negotiated = [], 0, 0, {}
    before = rss_kib(pids)
    for _ in range(args.idle_connections):
        if in_a_row >= 10:
            # A server that stopped taking connections (its limit, its file limit) would
            # otherwise cost a timeout per remaining connection.
            print(f"idle: 10 failures in a row; stopped after {len(held)} connections",
                  file=sys.stderr)
            break
        in_a_row += 1
        try:
            sock = socket.create_connection((host, int(port)), timeout=10)
        except OSError as e:
            errors += 1
            print(f"idle: connect: {e}", file=sys.stderr)
            continue
        try:
            tls = ctx.wrap_socket(sock, server_hostname="localhost")
        except (OSError, ssl.SSLError) as e:
            sock.close()
            errors += 1
            print(f"idle: handshake: {e}", file=sys.stderr)
            continue
        key = f"{tls.version()} {tls.cipher()[0]}"
        negotiated[key] = negotiated.get(key, 0) + 1
        held.append(tls)
        in_a_row = 0
    loaded = rss_kib(pids)
    time.sleep(args.hold)
    for tls in held:
        tls.close()
    return len(held), errors, {"negotiated": negotiated}, (before, loaded)


def s_time(args, resume):
    version = "-tls1_3" if args.test.endswith("13") else "-tls1_2"
    cmd = ["taskset", "-c", str(args.load_cpu), "openssl", "s_time", "-connect", args.target,
           "-reuse" if resume else "-new", "-time", str(args.duration), version, "-www", "/"]
    if version == "-tls1_3":
        cmd += ["-ciphersuites", "TLS_AES_128_GCM_SHA256"]
    else:
        cmd += ["-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True)
             for _ in range(args.concurrency)]
    units = resumed = fresh = failed = 0
    for p in procs:
        out, _ = p.communicate(timeout=args.duration + 60)
        m = re.findall(r"(\d+) connections in [\d.]+ real seconds", out)
        if p.returncode != 0 or not m:
            failed += 1
            sys.stderr.write(out[-2000:])
            continue
        units += int(m[-1])
        # The reuse pass prints one mark per connection after "Now timing with session id reuse."
        tail = out.split("session id reuse.", 1)[1] if resume and "session id reuse." in out else out
        marks = "".join(re.findall(r"^[r*]+$", tail, re.M))
        resumed += marks.count("r")
        fresh += marks.count("*")
    return units, failed, {"resumed": resumed, "not_resumed": fresh}


def h2load(args):
    url = f"https://{args.target}/bytes/{args.bulk_bytes}"
    cmd = ["taskset", "-c", str(args.load_cpu), "h2load", "--h1", "-n", str(args.bulk_requests),
           "-c", "2", "-m", "1", url]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, text=True, timeout=args.duration * 20 + 120)
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored", p.stdout)
    if p.returncode != 0 or not m:
        sys.stderr.write(p.stdout[-2000:])
        return 0, 1, {}
    ok, failed, errored = (int(x) for x in m.groups())
    return ok, failed + errored, {}


def ab(args):
    cmd = ["taskset", "-c", str(args.load_cpu), "ab", "-q", "-c", str(args.concurrency),
           "-t", str(args.duration), "-n", "100000000", f"http://{args.target}/"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, text=True, timeout=args.duration + 120)
    done = re.search(r"Complete requests:\s+(\d+)", p.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", p.stdout)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", p.stdout)
    if p.returncode != 0 or not done or not failed:
        sys.stderr.write(p.stdout[-2000:])
        return 0, 1, {}
    errors = int(failed.group(1)) + (int(non2xx.group(1)) if non2xx else 0)
    return int(done.group(1)) - errors, errors, {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--test", required=True,
                    choices=["full13", "full12", "resume13", "resume12", "bulk", "tcp", "idle"])
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--server-pids", required=True)
    ap.add_argument("--load-cpu", default="1")
    ap.add_argument("--json", required=True)
    ap.add_argument("--bulk-bytes", type=int, default=1048576)
    ap.add_argument("--bulk-requests", type=int, default=1000)
    ap.add_argument("--idle-connections", type=int, default=10000)
    ap.add_argument("--hold", type=float, default=1.0)
    args = ap.parse_args()
    pids = [int(p) for p in args.server_pids.split(",") if p]

    before, woke, t0 = cpu(pids), switches(pids), time.monotonic()
    rss = None
    if args.test == "idle":
        name, unit = "python ssl (OpenSSL)", "handshake"
        units, errors, confirm, rss = idle(args, pids)
    elif args.test == "bulk":
        name, unit = "h2load --h1", "request"
        units, errors, confirm = h2load(args)
    elif args.test == "tcp":
        name, unit = "ab", "connection"
        units, errors, confirm = ab(args)
    else:
        name, unit = "openssl s_time", "handshake"
        units, errors, confirm = s_time(args, args.test.startswith("resume"))
    after, wall = cpu(pids), time.monotonic() - t0
    woke = switches(pids) - woke
    user, system = after[0] - before[0], after[1] - before[1]
    cpu_us = (user + system) * 1e6
    report = {
        "generator_name": name,
        "unit": unit,
        "units": units,
        "errors_total": errors,
        "handshakes_per_s": units / wall if unit == "handshake" else None,
        "requests_per_s": units / wall if unit == "request" else None,
        "connections_per_s": units / wall if unit == "connection" else None,
        "body_bytes": units * args.bulk_bytes if unit == "request" else 0,
        "body_bytes_per_s": units * args.bulk_bytes / wall if unit == "request" else 0,
        "server": {
            "cpu_us": cpu_us,
            "us_per_unit": cpu_us / units if units else None,
            "system_us_per_unit": system * 1e6 / units if units else None,
            "cores_busy": (user + system) / wall,
            "wakeups_per_unit": woke / units if units else None,
            "rss_kib_before": rss[0] if rss else None,
            "rss_kib_loaded": rss[1] if rss else None,
            "rss_bytes_per_connection": (rss[1] - rss[0]) * 1024 / units if rss and units else None,
        },
        "confirmed": confirm,
        "wall_s": wall,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    if units == 0:
        print(f"{name}: nothing completed", file=sys.stderr)
        return 1
    if args.test.startswith("resume") and confirm.get("not_resumed", 0) > 0.01 * units:
        print(f"{name}: {confirm['not_resumed']} of {units} connections did not resume",
              file=sys.stderr)
        return 1
    if args.test.startswith("full") and confirm.get("resumed", 0) > 0:
        print(f"{name}: {confirm['resumed']} connections resumed in a full-handshake run",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
