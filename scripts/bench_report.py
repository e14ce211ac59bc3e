#!/usr/bin/env python3
"""Turns the load generator's JSON lines into the results section of docs/BENCHMARKS.md.

    scripts/bench_report.py target/bench/results.jsonl docs/BENCHMARKS.md

Medians over the runs of each scenario; the text between the results markers is replaced, the
rest of the file (analysis, profile) is kept.
"""
import datetime
import json
import os
import statistics
import sys

START, END = "<!-- results:start -->", "<!-- results:end -->"


def median(rows, key, sub=None):
    vals = []
    for r in rows:
        v = r.get(key)
        if sub is not None and isinstance(v, dict):
            v = v.get(sub)
        if isinstance(v, (int, float)):
            vals.append(float(v))
    return statistics.median(vals) if vals else None


def fmt(v, digits=2):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    s = f"{v:.{digits}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            mem = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({model}), {mem} RAM, shared with the load generator"


def main(results, doc):
    groups = {}
    def lagged_cell(rows):
        # Publishes the server shed with 503 are shown beside the lagged count, never hidden.
        # The most of any run, so one run's shedding is not hidden by the median.
        lagged = median(rows, "lagged_messages")
        refused = max((r.get("publishes_refused") or 0 for r in rows), default=0)
        return fmt(lagged) if not refused else f"{fmt(lagged)} (up to {fmt(refused)} publishes refused)"

    def cpu_cell(rows):
        total, kernel = median(rows, "server_cpu_us_per_delivery"), median(rows, "server_cpu_system_us_per_delivery")
        return fmt(total) if kernel is None else f"{fmt(total)} ({fmt(kernel)})"

    with open(results) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                groups.setdefault(r["name"], []).append(r)
    out = [START, "", f"Measured {datetime.date.today().isoformat()} on {machine()}.",
           f"Each figure is the median of {max(len(v) for v in groups.values()) if groups else 0} run(s) "
           "(`scripts/bench.sh`; raw lines in `target/bench/results.jsonl`).", ""]
    out.append("| scenario | conns | handshakes/s | events | deliveries expected / received | lost | deliveries/s "
               "| latency p50 / p90 / p99 / max (ms) | server CPU µs/delivery (of which kernel) | server CPU µs/event | KiB/idle conn | peak RSS MiB | lagged |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in groups.items():
        ev = median(rows, "events_published")
        cpu = median(rows, "server_cpu_secs")
        per_event = cpu * 1e6 / ev if cpu is not None and ev else None
        lat = "–"
        if median(rows, "latency_ms", "p50") is not None:
            lat = " / ".join(fmt(median(rows, "latency_ms", q), 1) for q in ("p50", "p90", "p99", "max"))
        exp, rec = median(rows, "deliveries_expected"), median(rows, "deliveries_received")
        peak = median(rows, "server_rss_kib_peak")
        out.append("| " + " | ".join([
            name, fmt(median(rows, "connections")), fmt(median(rows, "handshakes_per_sec"), 0), fmt(ev),
            f"{fmt(exp)} / {fmt(rec)}" if exp is not None else "–", fmt(median(rows, "lost")),
            fmt(median(rows, "deliveries_per_sec"), 0), lat,
            cpu_cell(rows), fmt(per_event, 1),
            fmt(median(rows, "server_kib_per_idle_connection"), 1),
            fmt(peak / 1024 if peak else None, 0), lagged_cell(rows),
        ]) + " |")
    broker = [(n, rows) for n, rows in groups.items() if median(rows, "broker_cpu_secs") is not None]
    if broker:
        out += ["", "NATS JetStream bus: the broker's CPU beside the gateway's (nats-server 2.9, file storage, "
                "on the same cores):", "",
                "| scenario | gateway CPU µs/delivery | gateway CPU µs/event | nats-server CPU µs/event |",
                "|---|---|---|---|"]
        for name, rows in broker:
            ev = median(rows, "events_published")
            cpu, bcpu = median(rows, "server_cpu_secs"), median(rows, "broker_cpu_secs")
            out.append("| " + " | ".join([
                name, fmt(median(rows, "server_cpu_us_per_delivery")),
                fmt(cpu * 1e6 / ev if cpu is not None and ev else None, 1),
                fmt(bcpu * 1e6 / ev if bcpu is not None and ev else None, 1),
            ]) + " |")
    hs = median(groups.get("handshake-tls-es256", []), "server_cpu_us_per_handshake")
    if hs is not None:
        out += ["", f"Server CPU per TLS 1.3 + ES256 handshake: {fmt(hs, 0)} µs (median)."]
    audit_rows = []
    for base in ("handshake-tls-es256", "handshake-plain"):
        on, off = groups.get(base, []), groups.get(base + "-noaudit", [])
        if not on or not off:
            continue
        cpu_on, cpu_off = median(on, "server_cpu_us_per_handshake"), median(off, "server_cpu_us_per_handshake")
        hs_on, hs_off = median(on, "handshakes_per_sec"), median(off, "handshakes_per_sec")
        cost = cpu_on - cpu_off if cpu_on is not None and cpu_off is not None else None
        audit_rows.append("| " + " | ".join([
            base, fmt(median(on, "audit_records_per_sec"), 0), fmt(median(on, "audit_records_connect"), 0),
            f"{fmt(hs_on, 0)} / {fmt(hs_off, 0)}", f"{fmt(cpu_on, 0)} / {fmt(cpu_off, 0)}", fmt(cost, 0),
        ]) + " |")
    if audit_rows:
        out += ["", "Audit log on connection setup (each connection: `connection.accepted`, written before the 101, "
                "and `subscription.created`):", "",
                "| scenario | audit records/s sustained | records in the connect phase | handshakes/s with / without audit "
                "| server CPU µs per connection with / without | audit cost µs per connection |",
                "|---|---|---|---|---|---|"] + audit_rows
    out += ["", END]
    text = open(doc).read() if os.path.exists(doc) else f"# Benchmarks\n\n{START}\n{END}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + "\n".join(out) + tail
    else:
        text += "\n" + "\n".join(out) + "\n"
    with open(doc, "w") as f:
        f.write(text)


def add_send_syscalls(results, perf_csv):
    """Adds the server's send system calls during a run (`perf stat -x,` output) to that run's
    line: their count and the frames delivered per call."""
    calls = 0
    for row in open(perf_csv):
        fields = row.strip().split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_") and fields[0].isdigit():
            calls += int(fields[0])
    with open(results) as f:
        lines = f.read().splitlines()
    last = json.loads(lines[-1])
    last["server_send_syscalls"] = calls
    received = last.get("deliveries_received")
    if received and calls:
        # The count includes the connection phase's few writes per connection (101, welcome,
        # subscribed), which are small beside a fan-out's.
        last["frames_per_send"] = round(received / calls, 2)
    lines[-1] = json.dumps(last)
    with open(results, "w") as f:
        f.write("\n".join(lines) + "\n")


def add_broker_cpu(results, before, after):
    """Adds the broker's CPU seconds during a run to that run's line (the last one)."""
    with open(results) as f:
        lines = f.read().splitlines()
    last = json.loads(lines[-1])
    last["broker_cpu_secs"] = round(float(after) - float(before), 3)
    lines[-1] = json.dumps(last)
    with open(results, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "--add-broker-cpu":
        add_broker_cpu(*sys.argv[2:5])
    elif sys.argv[1] == "--add-send-syscalls":
        add_send_syscalls(*sys.argv[2:4])
    else:
        main(sys.argv[1], sys.argv[2])
