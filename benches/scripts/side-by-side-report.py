#!/usr/bin/env python3
"""Turns tlsgate-load JSON reports (and independent-load.py's, which have the same fields and a
"generator_name") into the side-by-side tables (used by side-by-side.sh).

    side-by-side-report.py header                               the CSV header of runs.csv
    side-by-side-report.py row JSON KEY STORE TEST SERVER RUN   one CSV line for runs.csv
    side-by-side-report.py table OUT_DIR                        medians and ratios (Markdown),
                                                                also OUT_DIR/summary.json
    side-by-side-report.py check OUT_DIR SERVER...              non-zero unless every run of
                                                                these servers had no error

Figures per test:
  full*/resume*  server CPU µs per handshake (lower is better); handshakes/s
  bulk           server CPU seconds per GB of response body; MB/s of body
  idle           server RSS growth per idle TLS connection (KiB), i.e. MiB per 10,000
A crypto floor (OUT_DIR/floor.json from tlsgate-floor --json) adds "÷floor" for handshake rows;
the TCP floor (OUT_DIR/raw/tcp-floor-*.json: the peers relaying plain TCP) gets a table of its own.
The main tables are tlsgate-load's; "Two generators" puts each ratio as tlsgate-load measured it
beside the independent client's, and marks a disagreement over 15 %.
"""
import csv
import json
import os
import statistics
import sys

SERVERS = ["tlsgate-uring", "tlsgate-portable", "haproxy", "nginx"]
PEERS = ["haproxy", "nginx"]
TESTS = ["full13", "full12", "resume13", "resume12", "bulk", "idle"]
FIELDS = [
    "key", "store", "test", "server", "run", "ok", "errors", "rate", "srv_cpu_us", "gen_cpu_us",
    "srv_busy", "gen_busy", "p50_us", "p99_us", "mb_s", "srv_s_per_gb", "rss_bytes_per_conn",
    "srv_sys_us", "file", "generator", "srv_wakeups", "srv_full", "srv_resumed",
]


def row(path, key, store, test, server, run):
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, ValueError):
        r = {}
    srv = r.get("server") or {}
    gen = r.get("generator") or {}
    # The server's own count of the run's handshakes (server-handshakes.py), when it was read.
    try:
        with open(path + ".server") as f:
            counted = json.load(f)
    except (OSError, ValueError):
        counted = {}
    lat = r.get("latency_us") or {}
    body = r.get("body_bytes") or 0
    srv_cpu_us = srv.get("cpu_us")
    bulk = test == "bulk"
    s_per_gb = (srv_cpu_us / 1e6) / (body / 1e9) if (bulk and srv_cpu_us is not None and body) else ""
    rate = r.get("requests_per_s") if r.get("unit") == "request" else r.get("handshakes_per_s")
    values = [
        key, store, test, server, run, r.get("units", 0), r.get("errors_total", ""),
        fmt(rate), fmt(srv.get("us_per_unit")), fmt(gen.get("us_per_unit")),
        fmt(srv.get("cores_busy"), 2), fmt(gen.get("cores_busy"), 2),
        lat.get("p50", ""), lat.get("p99", ""), fmt(r.get("body_bytes_per_s", 0) / 1e6, 1),
        fmt(s_per_gb, 3), fmt(srv.get("rss_bytes_per_connection")),
        fmt(srv.get("system_us_per_unit")), os.path.basename(path),
        r.get("generator_name") or "tlsgate-load", fmt(srv.get("wakeups_per_unit"), 2),
        counted.get("full", ""), counted.get("resumed", ""),
    ]
    csv.writer(sys.stdout).writerow(values)


def clean(r):
    """A run counts when it succeeded and fewer than 1 % of its attempts failed (a rare reset
    at close is reported but does not void a run's figures)."""
    ok, errors = num(r["ok"]) or 0, num(r["errors"])
    return ok > 0 and errors is not None and errors <= 0.01 * (ok + errors)


def check(out, servers):
    """Exit status for CI: every run of `servers` succeeded without a single error."""
    with open(os.path.join(out, "runs.csv")) as f:
        runs = [r for r in csv.DictReader(f) if r["server"] in servers]
    bad = [r for r in runs if not num(r["ok"]) or num(r["errors"]) != 0]
    for r in bad:
        print(f"check: {r['server']} {r['key']} {r['store']} {r['test']} run {r['run']}: "
              f"ok={r['ok']} errors={r['errors']} ({r['file']})", file=sys.stderr)
    seen = {r["server"] for r in runs}
    for s in servers:
        if s not in seen:
            print(f"check: no run of {s}", file=sys.stderr)
    return 1 if bad or not set(servers) <= seen else 0


def fmt(v, digits=0):
    if v is None or v == "":
        return ""
    return f"{v:.{digits}f}"


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def generator(r):
    return r.get("generator") or "tlsgate-load"


def table(out):
    with open(os.path.join(out, "runs.csv")) as f:
        all_runs = list(csv.DictReader(f))
    runs = [r for r in all_runs if generator(r) == "tlsgate-load"]
    independent = [r for r in all_runs if generator(r) != "tlsgate-load"]
    floor = None
    try:
        with open(os.path.join(out, "floor.json")) as f:
            floor = json.load(f)
    except (OSError, ValueError):
        pass

    def cost_of(test, r):
        if test == "bulk":
            return num(r["srv_s_per_gb"])
        if test == "idle":
            v = num(r["rss_bytes_per_conn"])
            return v / 1024 if v is not None else None
        return num(r["srv_cpu_us"])

    def rate_of(test, r):
        return num(r["mb_s"]) if test == "bulk" else num(r["rate"])

    def summarize(runs):
        cells = {}
        for r in runs:
            cells.setdefault((r["key"], r["store"], r["test"]), {}).setdefault(r["server"], []).append(r)
        summary = []
        order = sorted(cells, key=lambda k: (k[0], k[1] != "software", TESTS.index(k[2])))
        for k in order:
            per = cells[k]
            entry = {"key": k[0], "store": k[1], "test": k[2], "servers": {}}
            for s, rs in per.items():
                ok = [r for r in rs if clean(r)]
                entry["servers"][s] = {
                    "runs": len(rs),
                    "clean_runs": len(ok),
                    "cost": median(cost_of(k[2], r) for r in ok),
                    "rate": median(rate_of(k[2], r) for r in ok),
                    "gen_cpu_us": median(num(r["gen_cpu_us"]) for r in ok),
                    "srv_sys_us": median(num(r.get("srv_sys_us")) for r in ok),
                    "srv_busy": median(num(r["srv_busy"]) for r in ok),
                    "srv_wakeups": median(num(r.get("srv_wakeups")) for r in ok),
                    "gen_busy": median(num(r["gen_busy"]) for r in ok),
                    "p99_us": median(num(r["p99_us"]) for r in ok),
                    "errors": sum(int(num(r["errors"]) or 0) for r in rs),
                    "generator": generator(rs[0]),
                    # The server's own count, summed over the runs where it was read.
                    "server_full": count_sum(rs, "srv_full"),
                    "server_resumed": count_sum(rs, "srv_resumed"),
                    "counted_runs": sum(1 for r in rs if num(r.get("srv_full")) is not None),
                }
            summary.append(entry)
        return summary

    summary = summarize(runs)
    independent_summary = summarize(independent)

    present = [s for s in SERVERS if any(s in e["servers"] for e in summary)]
    ours = [s for s in present if s.startswith("tlsgate")]
    peers = [s for s in PEERS if s in present]
    unit = {"bulk": "s/GB", "idle": "KiB/conn"}

    def cell(e, s, what, digits=0):
        v = e["servers"].get(s, {}).get(what)
        if v is None:
            return "-" if s in e["servers"] else "n/a"
        return f"{v:,.{digits}f}"

    def ratio(e, a, b, what):
        va = e["servers"].get(a, {}).get(what)
        vb = e["servers"].get(b, {}).get(what)
        if va is None or not vb:
            return "-"
        return f"{va / vb:.2f}"

    lines = []
    lines.append("### Server cost (medians; lower is better): CPU µs per handshake, "
                 "CPU s per GB (bulk), KiB RSS per idle connection (idle)")
    lines.append("")
    head = ["key", "store", "test", "unit"] + present
    head += [f"{o.replace('tlsgate-', '')}÷{p}" for o in ours for p in peers]
    if floor:
        head += [f"{s.replace('tlsgate-', '')}÷floor" for s in present]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * 4 + "---:|" * (len(head) - 4))
    for e in summary:
        t = e["test"]
        digits = 3 if t == "bulk" else (1 if t == "idle" else 0)
        cols = [e["key"], e["store"], t, unit.get(t, "µs/hs")]
        cols += [cell(e, s, "cost", digits) for s in present]
        cols += [ratio(e, o, p, "cost") for o in ours for p in peers]
        if floor:
            f = floor_for(floor, e["key"], t)
            for o in present:
                v = e["servers"].get(o, {}).get("cost")
                cols.append(f"{v / f:.2f}" if (v is not None and f) else "-")
        lines.append("| " + " | ".join(cols) + " |")

    lines.append("")
    lines.append("### Rate (medians; higher is better): handshakes/s, MB/s of body (bulk); "
                 "and the generator's own CPU µs per handshake / request")
    lines.append("")
    head = ["key", "store", "test"] + present
    head += [f"{o.replace('tlsgate-', '')}÷{p}" for o in ours for p in peers]
    head += [f"gen µs ({s.replace('tlsgate-', '')})" for s in present]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * 3 + "---:|" * (len(head) - 3))
    for e in summary:
        if e["test"] == "idle":
            continue
        digits = 1 if e["test"] == "bulk" else 0
        cols = [e["key"], e["store"], e["test"]]
        cols += [cell(e, s, "rate", digits) for s in present]
        cols += [ratio(e, o, p, "rate") for o in ours for p in peers]
        cols += [cell(e, s, "gen_cpu_us") for s in present]
        lines.append("| " + " | ".join(cols) + " |")

    hs = [e for e in summary if e["test"] not in ("bulk", "idle")]
    if hs:
        lines.append("")
        lines.append("### Where the server CPU per handshake goes (medians, µs): user space / "
                     "kernel (TCP, syscalls); user space as a multiple of the crypto floor")
        lines.append("")
        head = ["key", "store", "test"] + [f"{s} user/kernel" for s in present]
        if floor:
            head += [f"{s.replace('tlsgate-', '')} user÷floor" for s in present]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * 3 + "---:|" * (len(head) - 3))
        for e in hs:
            cols = [e["key"], e["store"], e["test"]]
            users = []
            for s in present:
                v = e["servers"].get(s, {})
                cost, sys_ = v.get("cost"), v.get("srv_sys_us")
                if cost is None or sys_ is None:
                    cols.append("-")
                    users.append(None)
                else:
                    cols.append(f"{cost - sys_:,.0f} / {sys_:,.0f}")
                    users.append(cost - sys_)
            if floor:
                f = floor_for(floor, e["key"], e["test"])
                cols += [f"{u / f:.2f}" if (u is not None and f) else "-" for u in users]
            lines.append("| " + " | ".join(cols) + " |")

    if independent_summary:
        by_cell = {(e["key"], e["store"], e["test"]): e for e in independent_summary}
        lines.append("")
        lines.append("### Two generators: tlsgate ÷ peer, server CPU per operation (idle: KiB per "
                     "connection; medians), as "
                     "tlsgate-load measured it / as the independent client measured it; "
                     "! marks a disagreement over 15 %; busy: the server's core, in cores, "
                     "under each client; wake-ups: the server's voluntary context switches per "
                     "operation under the independent client")
        lines.append("")
        head = ["key", "store", "test", "independent client"]
        head += [f"{o.replace('tlsgate-', '')}÷{p}" for o in ours for p in peers]
        head += [f"{s} (independent)" for s in present]
        head += [f"{s.replace('tlsgate-', '')} busy" for s in present]
        head += [f"{s.replace('tlsgate-', '')} wake-ups" for s in present]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * 4 + "---:|" * (len(head) - 4))
        for e in summary:
            ie = by_cell.get((e["key"], e["store"], e["test"]))
            if ie is None:
                continue
            name = next(iter(ie["servers"].values()))["generator"]
            digits = 3 if e["test"] == "bulk" else (1 if e["test"] == "idle" else 0)
            cols = [e["key"], e["store"], e["test"], name]
            for o in ours:
                for p in peers:
                    a, b = ratio(e, o, p, "cost"), ratio(ie, o, p, "cost")
                    mark = ""
                    if a != "-" and b != "-" and abs(float(a) - float(b)) > 0.15 * float(b):
                        mark = " !"
                    cols.append(f"{a} / {b}{mark}")
            cols += [cell(ie, s, "cost", digits) for s in present]
            # How busy the server's core was under each client: a client that cannot saturate
            # the server compares the servers at one offered rate, not at their limits.
            # Idle runs measure memory: how busy the core was and how often it woke say nothing.
            idle = e["test"] == "idle"
            cols += ["-" if idle else f"{cell(e, s, 'srv_busy', 2)} / {cell(ie, s, 'srv_busy', 2)}"
                     for s in present]
            # Sleeping and being woken again, per operation: what a server pays per wake-up is
            # spread over fewer operations when the client cannot load it.
            cols += ["-" if idle else cell(ie, s, "srv_wakeups", 2) for s in present]
            lines.append("| " + " | ".join(cols) + " |")
        summary_all = summary + [dict(e, generator="independent") for e in independent_summary]
    else:
        summary_all = summary

    lines += confirmation_lines(summary, independent_summary, present)

    tcp_floor = tcp_floor_summary(out)
    if tcp_floor:
        lines.append("")
        lines.append("### TCP floor: the peers relaying plain TCP (no TLS) through the same "
                     "origin, per connection (ApacheBench, HTTP/1.0, a new connection per "
                     "request; medians): the two connections' TCP work plus the relay's own, "
                     "which a handshake run pays too")
        lines.append("")
        lines.append("| relay | server CPU µs per connection | user / kernel | connections/s "
                     "| busy | runs |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for s, v in tcp_floor.items():
            cost, sys_ = v["cost"], v["srv_sys_us"]
            split = f"{cost - sys_:,.0f} / {sys_:,.0f}" if cost is not None and sys_ is not None else "-"
            rate = f"{v['rate']:,.0f}" if v["rate"] is not None else "-"
            lines.append(f"| {s}, no TLS | {fmt(cost) or '-'} | {split} | {rate} | "
                         f"{fmt(v['srv_busy'], 2) or '-'} | {v['clean_runs']} of {v['runs']} |")

    lines += syscall_lines(out, present)
    lines += profile_lines(out, present)

    errors = [(e, s, v["errors"], v["runs"], v["clean_runs"]) for e in summary_all
              for s, v in e["servers"].items() if v["errors"] or v["clean_runs"] < v["runs"]]
    if errors:
        lines.append("")
        lines.append("Errors (a run with 1 % or more failed attempts is left out of the medians):")
        for e, s, n, runs_, clean_runs in errors:
            lines.append(f"- {e['key']} {e['store']} {e['test']} {s} ({e['servers'][s]['generator']}): "
                         f"{n} errors in {runs_} runs, "
                         f"{runs_ - clean_runs} left out")
    skipped = os.path.join(out, "skipped.txt")
    if os.path.exists(skipped):
        with open(skipped) as f:
            text = f.read().strip()
        if text:
            lines.append("")
            lines.append("Skipped:")
            lines += [f"- {l.strip()}" for l in text.splitlines()]
    print("\n".join(lines))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"tlsgate-load": summary, "independent": independent_summary,
                   "tcp_floor": tcp_floor}, f, indent=1)
        f.write("\n")
    bars = []
    for e in summary:
        ie = {(x["key"], x["store"], x["test"]): x for x in independent_summary}.get(
            (e["key"], e["store"], e["test"]))
        for o in ours[:1]:
            for p in peers:
                label = f"{e['key']} {e['store']} {e['test']}: {o.replace('tlsgate-', '')}÷{p}"
                a = ratio(e, o, p, "cost")
                b = ratio(ie, o, p, "cost") if ie else "-"
                bars.append((label, num(a), num(b)))
    if bars:
        with open(os.path.join(out, "ratios.svg"), "w") as f:
            f.write(svg(bars))


def count_sum(rs, field):
    values = [num(r.get(field)) for r in rs]
    values = [v for v in values if v is not None]
    return int(sum(values)) if values else None


def confirmation_lines(summary, independent_summary, present):
    """How each handshake cell's kind was confirmed: the servers' own counts, per generator."""
    by_cell = {(e["key"], e["store"], e["test"]): e for e in independent_summary}
    cells = [e for e in summary if e["test"] != "idle"]
    if not any(v.get("counted_runs") for e in cells for v in e["servers"].values()):
        return []
    lines = ["", "### Full or resumed, as each server counted them: full / resumed handshakes "
             "over the cell's runs, under tlsgate-load; under the independent client (tlsgate: "
             "`tlsgate_handshakes_total{kind}`; HAProxy: `ssl_sess` / `ssl_reused_sess`; nginx: "
             "`$ssl_session_reused` in its stream log). A resumed run's few full handshakes are "
             "the clients' first ones; a count that contradicts the test fails the harness", ""]
    head = ["key", "store", "test"] + present
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * 3 + "---:|" * len(present))

    def counted(e, s):
        v = (e or {}).get("servers", {}).get(s)
        if not v or not v.get("counted_runs"):
            return "-"
        return f"{v['server_full']:,} / {v['server_resumed']:,}"

    for e in cells:
        ie = by_cell.get((e["key"], e["store"], e["test"]))
        cols = [e["key"], e["store"], e["test"]]
        cols += [f"{counted(e, s)}; {counted(ie, s)}" if ie else counted(e, s) for s in present]
        lines.append("| " + " | ".join(cols) + " |")
    return lines


def tcp_floor_summary(out):
    """Medians of raw/tcp-floor-SERVER-runN.json (independent-load.py --test tcp), per peer, over
    the runs that count (`clean`)."""
    runs = {}
    raw = os.path.join(out, "raw")
    for name in sorted(os.listdir(raw)) if os.path.isdir(raw) else []:
        if not (name.startswith("tcp-floor-") and name.endswith(".json")):
            continue
        server = name[len("tcp-floor-"):].rsplit("-run", 1)[0]
        try:
            with open(os.path.join(raw, name)) as f:
                r = json.load(f)
        except (OSError, ValueError):
            r = {}
        runs.setdefault(server, []).append(r)
    summary = {}
    for s in [p for p in PEERS if p in runs]:
        ok = [r for r in runs[s] if clean({"ok": r.get("units"), "errors": r.get("errors_total")})]
        srv = [r.get("server") or {} for r in ok]
        summary[s] = {
            "runs": len(runs[s]),
            "clean_runs": len(ok),
            "cost": median(v.get("us_per_unit") for v in srv),
            "srv_sys_us": median(v.get("system_us_per_unit") for v in srv),
            "srv_busy": median(v.get("cores_busy") for v in srv),
            "rate": median(r.get("connections_per_s") for r in ok),
        }
    return summary


def syscall_lines(out, present):
    """The "System calls per operation" section from raw/*.json.syscalls (perf stat -x, over
    each tlsgate-load run, --syscalls): the mean over runs of all calls per handshake / request,
    and the most frequent ones."""
    import glob
    import re
    per = {}
    for path in glob.glob(os.path.join(out, "raw", "*.json.syscalls")):
        m = re.match(r"(\w+)-(\w+)-(\w+)-(.+)-run\d+\.json\.syscalls$", os.path.basename(path))
        if not m:
            continue
        key, store, test, server = m.groups()
        try:
            with open(path[: -len(".syscalls")]) as f:
                units = json.load(f).get("units") or 0
        except (OSError, ValueError):
            continue
        counts = {}
        with open(path) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) < 3 or not parts[0].isdigit():
                    continue
                name = parts[2].replace("syscalls:sys_enter_", "")
                counts[name] = counts.get(name, 0) + int(parts[0])
        if units:
            per.setdefault((key, store, test, server), []).append(
                {n: c / units for n, c in counts.items()})
    if not per:
        return []
    lines = ["", "### System calls per operation (perf stat on the syscall tracepoints over each "
             "tlsgate-load run; mean over runs): all, then the most frequent", ""]
    head = ["key", "store", "test"] + present
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * 3 + "---|" * len(present))
    cells = sorted({k[:3] for k in per}, key=lambda k: (k[0], k[1] != "software", TESTS.index(k[2])))
    for k in cells:
        cols = list(k)
        for s in present:
            runs = per.get((*k, s))
            if not runs:
                cols.append("-")
                continue
            names = {n for r in runs for n in r}
            mean = {n: sum(r.get(n, 0) for r in runs) / len(runs) for n in names}
            total = sum(mean.values())
            top = sorted(mean.items(), key=lambda x: -x[1])[:4]
            digits = 1 if total < 100 else 0
            cols.append(f"**{total:.{digits}f}**: " + ", ".join(f"{n} {v:.1f}" for n, v in top))
        lines.append("| " + " | ".join(cols) + " |")
    return lines


# Kernel symbols by the kind of work, first match wins (prefixes).
KERNEL_KINDS = [
    ("syscall entry/exit", ("entry_SYSCALL", "syscall_", "do_syscall", "exit_to_user",
                            "syscall_exit", "__x64_sys_", "__do_sys_", "__sys_", "ksys_",
                            "fpregs_", "switch_fpu", "restore_fpregs", "__fdget", "fput",
                            "__fput", "fget", "__fget")),
    ("io_uring", ("io_", "__io_")),
    ("scheduler, wakeups", ("schedule", "__schedule", "finish_task_switch", "pick_next",
                            "try_to_wake_up", "__wake_up", "wake_up", "enqueue_", "dequeue_",
                            "update_", "psi_", "ttwu_", "select_task_rq", "native_sched_clock",
                            "sched_", "__update_", "load_balance", "newidle_balance",
                            "prepare_task_switch", "__switch_to", "raw_spin_rq")),
    ("copies", ("copy_", "_copy_", "__copy_", "rep_movs", "memcpy", "__memcpy", "memmove",
                "csum_", "skb_copy", "__skb_datagram_iter", "simple_copy_to_iter")),
    ("memory", ("kmem_cache", "kmalloc", "__kmalloc", "kfree", "__kfree", "kmalloc_",
                "__alloc_pages", "get_page_from_freelist", "free_unref", "__free_pages",
                "page_", "__slab", "slab_", "___slab", "memcg_", "__memcg", "mod_memcg",
                "obj_cgroup", "refill_obj_stock", "drain_obj_stock", "__mod_")),
    ("TCP/IP, sockets, loopback", ("tcp", "__tcp", "inet", "__inet", "ip_", "__ip_", "ipv4",
                                   "sk_", "__sk_", "sock_", "__sock", "sock", "skb_", "__skb",
                                   "kfree_skb", "consume_skb", "dev_", "__dev_", "loopback",
                                   "netif_", "__netif", "net_rx", "process_backlog", "__napi",
                                   "napi_", "nf_", "__nf_", "raw_v4", "security_sock",
                                   "security_socket", "lock_sock", "release_sock", "release_sock",
                                   "__release_sock", "bpf_", "__cgroup_bpf", "validate_xmit",
                                   "fib_", "__fib", "neigh_", "dst_", "rt_", "__x4", "udp",
                                   "eth_", "sch_", "__qdisc", "qdisc", "do_softirq",
                                   "__do_softirq", "__local_bh", "local_bh", "irq_exit",
                                   "ep_", "__ep_", "sockfd_lookup", "move_addr_to",
                                   "__sys_connect", "__sys_accept", "do_accept", "__sys_socket")),
    ("files, descriptors", ("alloc_file", "d_alloc", "dput", "__d_", "d_instantiate",
                            "alloc_fd", "__alloc_fd", "fd_install", "close_fd", "filp_close",
                            "__close_fd", "file_close", "alloc_inode", "new_inode",
                            "iput", "evict", "destroy_inode", "__destroy_inode", "inode_",
                            "sock_alloc", "get_unused_fd", "put_unused_fd", "dentry_",
                            "__dentry", "locks_", "security_file", "security_inode",
                            "mntput", "mntget", "task_work", "percpu_counter")),
]


def kernel_kind(sym):
    for kind, prefixes in KERNEL_KINDS:
        if sym.startswith(prefixes):
            return kind
    return "other kernel"


def profile_lines(out, present):
    """The "Where the CPU goes" section from raw/*.json.profile (perf report --sort sym over
    each tlsgate-load run, --profile): per server, the kernel's share of the samples and how it
    splits by kind of work, then the top kernel and user-space symbols; the mean over runs."""
    import glob
    import re
    per = {}
    for path in glob.glob(os.path.join(out, "raw", "*.json.profile")):
        m = re.match(r"(\w+)-(\w+)-(\w+)-(.+)-run\d+\.json\.profile$", os.path.basename(path))
        if not m:
            continue
        syms = {}
        with open(path) as f:
            for line in f:
                m2 = re.match(r"\s*([\d.]+)%\s+\[(k|\.)\]\s+(.+?)\s*$", line)
                if m2:
                    pct, space, sym = float(m2.group(1)), m2.group(2), m2.group(3)
                    key = ("k" if space == "k" else "u", sym)
                    syms[key] = syms.get(key, 0.0) + pct
        if syms:
            per.setdefault(m.groups(), []).append(syms)
    if not per:
        return []
    lines = ["", "### Where the CPU goes (perf record, cpu-clock, over each tlsgate-load run; "
             "share of the server's samples, mean over runs; symbols under 0.2 % left out)", ""]
    cells = sorted({k[:3] for k in per}, key=lambda k: (k[0], k[1] != "software", TESTS.index(k[2])))
    kinds = [k for k, _ in KERNEL_KINDS] + ["other kernel"]
    for cell in cells:
        lines.append(f"**{' '.join(cell)}**")
        lines.append("")
        head = ["server", "kernel"] + kinds + ["top kernel symbols", "top user-space symbols"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|" + "---:|" * (1 + len(kinds)) + "---|---|")
        for s in present:
            runs = per.get((*cell, s))
            if not runs:
                continue
            names = {n for r in runs for n in r}
            mean = {n: sum(r.get(n, 0) for r in runs) / len(runs) for n in names}
            kernel = {n[1]: v for n, v in mean.items() if n[0] == "k"}
            user = {n[1]: v for n, v in mean.items() if n[0] == "u"}
            by_kind = {k: 0.0 for k in kinds}
            for sym, v in kernel.items():
                by_kind[kernel_kind(sym)] += v
            top = lambda d: ", ".join(f"{n[:32]} {v:.1f}" for n, v in sorted(d.items(), key=lambda x: -x[1])[:5])
            cols = [s, f"{sum(kernel.values()):.0f} %"] + [f"{by_kind[k]:.1f}" for k in kinds]
            cols += [top(kernel), top(user)]
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    return lines


def svg(bars):
    """A horizontal bar chart of tlsgate ÷ peer (server CPU per operation) per cell, one bar per
    generator, with the line at 1.0 (parity): shorter is better for tlsgate."""
    row_h, bar_h, left, width, scale_max = 34, 12, 330, 360, 1.2
    height = 50 + row_h * len(bars) + 40
    x = lambda v: left + width * min(v, scale_max) / scale_max
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" '
           f'height="{height}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="10" y="20" font-size="14">tlsgate ÷ peer, server CPU per operation '
           '(lower is better; 1.0 = parity)</text>',
           '<rect x="10" y="30" width="12" height="10" fill="#3b6ea5"/>'
           '<text x="26" y="39">tlsgate-load</text>',
           '<rect x="120" y="30" width="12" height="10" fill="#e08a2c"/>'
           '<text x="136" y="39">independent client (s_time / h2load)</text>']
    for i, (label, a, b) in enumerate(bars):
        y = 55 + row_h * i
        out.append(f'<text x="{left - 8}" y="{y + bar_h + 4}" text-anchor="end">{label}</text>')
        for j, (v, colour) in enumerate(((a, "#3b6ea5"), (b, "#e08a2c"))):
            if v is None:
                continue
            yy = y + j * (bar_h + 2)
            out.append(f'<rect x="{left}" y="{yy}" width="{x(v) - left:.1f}" height="{bar_h}" '
                       f'fill="{colour}"/>')
            out.append(f'<text x="{x(v) + 4:.1f}" y="{yy + bar_h - 2}">{v:.2f}</text>')
    top, bottom = 50, 55 + row_h * len(bars)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{bottom}" '
                   f'stroke="{"#c00" if t == 1.0 else "#ccc"}" stroke-width="1"/>')
        out.append(f'<text x="{x(t):.1f}" y="{bottom + 14}" text-anchor="middle">{t:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def floor_for(floor, key, test):
    """The crypto floor in µs for a handshake of this kind; None for bulk and idle."""
    names = {
        "full13": f"full_tls13_{key}",
        "full12": f"full_tls12_{key}",
        "resume13": "resume_tls13",
        "resume12": "resume_tls12",
    }
    name = names.get(test)
    if name is None:
        return None
    v = floor.get("floors_us", {}).get(name)
    return v if v else None


def main():
    if len(sys.argv) == 8 and sys.argv[1] == "row":
        row(*sys.argv[2:8])
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        table(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "header":
        print(",".join(FIELDS))
    elif len(sys.argv) >= 4 and sys.argv[1] == "check":
        return check(sys.argv[2], sys.argv[3:])
    else:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
