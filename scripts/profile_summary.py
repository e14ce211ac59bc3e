#!/usr/bin/env python3
"""Groups a `perf report --no-children --sort dso,symbol --stdio` listing of the server into
where the CPU goes per delivery, as a Markdown table.

    perf report -i target/bench/fanout-10k.perf.data --no-children --sort dso,symbol --stdio \
        | scripts/profile_summary.py --us-per-delivery 1.95

Groups are by symbol name, so they are approximate where the compiler inlined one module into
another (the session's code mostly appears under the upgrade task that runs it).
"""

import argparse
import re
import sys

GROUPS = [
    ("kernel: TCP send and loopback delivery", lambda dso, sym: dso == "[kernel.kallsyms]"),
    ("fan-out: dispatcher, filters, outbox push",
     lambda dso, sym: re.search(r"fanout::|filter::|outbox::Outbox::push|bus::", sym)),
    ("session and WebSocket writes (drain, framing, flush; the session loop runs inlined in the "
     "upgrade task, whose future is an `Either`)",
     lambda dso, sym: re.search(r"session::|ws::|outbox::|http::ws::upgrade|hyper::common::io::rewind|hyper_util::common::rewind"
                                r"|futures_util::future::either::Either<A,B> as core::future::future::Future>::poll", sym)),
    ("tokio: scheduler, wakers, timers, I/O readiness", lambda dso, sym: "tokio::" in sym),
    ("libc: memcpy/memcmp/malloc", lambda dso, sym: dso.startswith("libc")),
    ("metrics (prometheus)", lambda dso, sym: "prometheus::" in sym),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--us-per-delivery", type=float, required=True,
                    help="measured server CPU per delivery of the profiled run")
    args = ap.parse_args()
    totals: dict[str, float] = {}
    line = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*?)\s*(?:-\s+-\s*)?$")
    for raw in sys.stdin:
        m = line.match(raw)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3)
        group = next((name for name, test in GROUPS if test(dso, sym)), "other")
        totals[group] = totals.get(group, 0.0) + pct
    print("| where | share of server CPU | µs per delivery |")
    print("|---|---|---|")
    for name, _ in GROUPS + [("other", None)]:
        pct = totals.get(name, 0.0)
        print(f"| {name} | {pct:.1f}% | {pct / 100 * args.us_per_delivery:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
