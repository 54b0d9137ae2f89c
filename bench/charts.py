#!/usr/bin/env python3
"""Turns the records `loadgen --json FILE` (and `ws_fanout --json FILE`) appended into SVG bar
charts (standard library only).

    python3 bench/charts.py bench/results/loadgen.jsonl bench/charts
    python3 bench/charts.py --peers bench/results/peers.json bench/charts   (bench/peers.py does this itself)

Writes dispatch.svg (tasks/s and latency by SQLite sync mode), scale.svg (coordinator and load
generator CPU, heartbeat latency), memory.svg (coordinator and agent RSS) and fanout-*.svg
(live-feed events published and delivered, delay p50/p99, by rate and message kind). For each kind of
run, the last record with the same parameters wins, so a rerun replaces its figure.
"""

import json
import sys
from html import escape
from pathlib import Path

WIDTH = 760
BAR_H = 22
GAP = 8
LEFT = 330
COLOURS = ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2"]


def chart(title, unit, rows, note=""):
    """rows: (label, value, colour index). Horizontal bars, value printed at the end."""
    top = 48
    height = top + len(rows) * (BAR_H + GAP) + 40
    peak = max((v for _, v, _ in rows if v == v), default=1.0) or 1.0
    span = WIDTH - LEFT - 110
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="sans-serif" font-size="13">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="12" y="24" font-size="16" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (label, value, colour) in enumerate(rows):
        y = top + i * (BAR_H + GAP)
        w = 0 if value != value else max(1, value / peak * span)
        out.append(
            f'<text x="{LEFT - 8}" y="{y + BAR_H * 0.7}" text-anchor="end">{escape(label)}</text>'
        )
        out.append(
            f'<rect x="{LEFT}" y="{y}" width="{w:.1f}" height="{BAR_H}" '
            f'fill="{COLOURS[colour % len(COLOURS)]}"/>'
        )
        shown = "n/a" if value != value else f"{value:,.2f}".rstrip("0").rstrip(".")
        out.append(f'<text x="{LEFT + w + 6:.1f}" y="{y + BAR_H * 0.7}">{shown} {escape(unit)}</text>')
    if note:
        out.append(f'<text x="12" y="{height - 14}" fill="#555">{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def peers_charts(rows, out):
    """The side-by-side run's rows (`bench/peers.py --json`) as two charts in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bars = [(r["system"], r["batch_median"], 0 if r["key"].startswith("lull") else 1) for r in rows]
    (out / "peers-throughput.svg").write_text(
        chart("Side by side: print(sum(range(1000))), batch", "tasks/s", bars,
              "median of the repetitions, same machine, same run; higher is better")
    )
    bars = []
    for r in rows:
        colour = 0 if r["key"].startswith("lull") else 1
        bars.append((f'{r["system"]}: p50', r["closed_p50_ms"], colour))
        bars.append((f'{r["system"]}: p99', r["closed_p99_ms"], colour + 2))
    (out / "peers-latency.svg").write_text(
        chart("Side by side: closed loop, 2 clients, submit → result", "ms", bars, "lower is better")
    )
    bars = []
    for r in rows:
        if "batch_p50_ms" not in r:
            continue  # a run from before bench/peers.py measured it
        colour = 0 if r["key"].startswith("lull") else 1
        bars.append((f'{r["system"]}: p50', r["batch_p50_ms"], colour))
        bars.append((f'{r["system"]}: p99', r["batch_p99_ms"], colour + 2))
    if bars:
        (out / "peers-batch-latency.svg").write_text(
            chart("Side by side: batch (all submitted, then collected in order), submit → result", "ms",
                  bars, "queueing included: the batch's tasks wait their turn; lower is better")
        )


def latest(records, bench, key):
    seen = {}
    for r in records:
        if r.get("bench") == bench:
            seen[key(r)] = r
    return list(seen.values())


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--peers":
        peers_charts(json.loads(Path(sys.argv[2]).read_text()), sys.argv[3])
        print(f"charts written to {sys.argv[3]}")
        return
    if len(sys.argv) != 3:
        sys.exit("usage: charts.py RESULTS.jsonl OUT_DIR | charts.py --peers PEERS.json OUT_DIR")
    records = [json.loads(l) for l in Path(sys.argv[1]).read_text().splitlines() if l.strip()]
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)

    dispatch = latest(
        records, "dispatch", lambda r: (r["sync"], r["tasks"], r["nodes"], r["slots"], r.get("batch", 1))
    )

    def dispatch_tag(r):
        tag = f'sync={r["sync"]}, {r["tasks"]:,} tasks'
        if r.get("batch", 1) > 1:
            tag += f', batches of {r["batch"]:,}'
        elif r.get("submitters") == 1:
            tag += ", 1 submitter"
        return tag

    if dispatch:
        rows = []
        for r in dispatch:
            tag = dispatch_tag(r)
            rows.append((f"{tag}: tasks/s", r["tasks_per_s"], 0))
        (out / "dispatch-throughput.svg").write_text(
            chart("Coordinator alone: dispatch throughput (submit → result recorded)", "tasks/s", rows,
                  "simulated agents over HTTP on 127.0.0.1; higher is better")
        )
        rows = []
        for r in dispatch:
            tag = dispatch_tag(r)
            rows.append((f"{tag}: submit→start p50", r["submit_to_start"]["p50_ms"], 2))
            rows.append((f"{tag}: submit→result p50", r["submit_to_result"]["p50_ms"], 0))
            rows.append((f"{tag}: submit→result p99", r["submit_to_result"]["p99_ms"], 1))
        (out / "dispatch-latency.svg").write_text(
            chart("Coordinator alone: latency under saturating load", "ms", rows, "lower is better")
        )

    scale = latest(records, "scale", lambda r: (r["nodes"], r["task_rate"], r["heartbeat_interval"]))
    if scale:
        rows = []
        for r in scale:
            tag = f'{r["nodes"]:,} nodes, {r["task_rate"]:g} tasks/s'
            rows.append((f"{tag}: coordinator", r["coordinator_cores"], 0))
            rows.append((f"{tag}: load generator", r["loadgen_cores"], 1))
        (out / "scale-cpu.svg").write_text(
            chart("Heartbeating nodes: CPU used (cores, over the window)", "cores", rows,
                  "1.0 = one core busy all the time; this VM has 2")
        )
        rows = []
        for r in scale:
            tag = f'{r["nodes"]:,} nodes, {r["task_rate"]:g} tasks/s'
            rows.append((f"{tag}: heartbeat p50", r["heartbeat"]["p50_ms"], 2))
            rows.append((f"{tag}: heartbeat p99", r["heartbeat"]["p99_ms"], 1))
        (out / "scale-heartbeat-latency.svg").write_text(
            chart("Heartbeat round trip", "ms", rows, "lower is better")
        )

    memory = latest(records, "memory", lambda r: (r["tasks"], r["nodes"]))
    agent = latest(records, "agent", lambda r: (r["executor"], r["cpus"]))
    if memory or agent:
        rows = []
        for r in memory:
            n, t = f'{r["nodes"]:,}', f'{r["tasks"]:,}'
            rows.append(("coordinator, empty", r["coordinator_rss_empty_mb"], 0))
            rows.append((f"coordinator, {n} nodes + {t} done", r["coordinator_rss_full_mb"], 0))
            rows.append((f"after restart, {t} stored", r["coordinator_rss_restart_mb"], 2))
            rows.append((f"after restart, + {n} nodes", r["coordinator_rss_restart_nodes_mb"], 2))
        for r in agent:
            rows.append(("agent, idle", r["idle_agent_mb"], 1))
            rows.append(("zygote, idle", r["idle_zygote_mb"], 3))
            rows.append(("agent, busy (peak)", r["busy_agent_peak_mb"], 1))
            rows.append(("zygote, busy (peak)", r["busy_zygote_peak_mb"], 3))
        (out / "memory.svg").write_text(
            chart("Resident memory (RSS)", "MB", rows, "from /proc/PID/status VmRSS")
        )
    fanout = latest(
        records, "fanout", lambda r: (r["clients"], r["asked_events_per_s"], r["batch_messages"])
    )
    if fanout:
        fanout.sort(key=lambda r: (r["asked_events_per_s"] or 0, r["batch_messages"]))

        def fanout_tag(r):
            kind = "arrays" if r["batch_messages"] else "one event each"
            return f'{r["clients"]:,} clients, {r["asked_events_per_s"] or 0:,.0f}/s, {kind}'

        rows = [(f"{fanout_tag(r)}", r["events_per_s"], 1 if r["batch_messages"] else 0) for r in fanout]
        (out / "fanout-throughput.svg").write_text(
            chart("Live feed: events published per second, every client following all", "events/s", rows,
                  "ws_fanout; clients, publisher and coordinator on the same 2 cores; higher is better")
        )
        rows = []
        for r in fanout:
            colour = 1 if r["batch_messages"] else 0
            rows.append((f"{fanout_tag(r)}: p50", r["delay"]["p50_ms"], colour))
            rows.append((f"{fanout_tag(r)}: p99", r["delay"]["p99_ms"], colour + 2))
        (out / "fanout-delay.svg").write_text(
            chart("Live feed: delay from publication to receipt", "ms", rows,
                  "the target is p99 ≤ 100 ms at 5,000 events/s; lower is better")
        )
    print(f"charts written to {out}")


if __name__ == "__main__":
    main()
