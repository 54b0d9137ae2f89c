#!/usr/bin/env python3
"""Executor benchmark: N trivial tasks through one coordinator and one agent, per executor.

    cargo build --release --bins && python3 bench/executors.py [--tasks 1000] [--repeat 3] [--levels all]

Workload: the code string `print(sum(range(1000)))`; the result is its stdout.
Reports, per executor and per sandbox level (`--levels`: the agent's --max-sandbox-level; by
default only the strongest this host allows, `--levels all` for every level it reaches), with
the sandbox level the agent actually used:
  - batch: submit all tasks (`POST /api/v1/tasks/batch`, 1,000 per request; one request per
    task with --one-by-one), then collect the results (`GET /api/v1/tasks/wait?ids=..&wait=60`,
    1,000 tasks per request; one `GET /api/v1/tasks/{id}?wait=60` per task with
    --collect each); tasks/s = N / (first submit .. last result), median of --repeat runs
    with min-max;
  - closed loop: 2 clients, one task in flight each, each submitted and its result waited
    for in one request (`POST /api/v1/tasks?wait=60`; `--requests two`: the submission, then
    `GET /api/v1/tasks/{id}?wait=60`); latency submit -> result, p50/p99;
  - idle node: one task at a time, each after --idle-gap seconds of quiet (a user with an
    idle node); latency submit -> result, p50 and max.
With `--compare A,B` (two directories of binaries, as --bin-dir) it measures one executor at
one level in `--pairs` interleaved pairs instead (A then B, then B then A, ...) and prints
each pair and how many B won: the A/B of two builds on a VM whose speed drifts within minutes.
Everything runs on 127.0.0.1 and is stopped afterwards. This is a benchmark, not a test:
it asserts nothing about speed.
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

CODE = "print(sum(range(1000)))"
EXPECTED = str(sum(range(1000)))
BARE_VENV = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv-bare")


def clean_python():
    """The interpreter the benchmarks give Lull's agent (`--python`) and the bare-python row
    unless told otherwise: a virtual environment with nothing installed (bench/.venv-bare, made
    once from the `python3` on PATH, without pip). Its `site` reads only its own empty
    site-packages, not the base installation's, whose `.pth` files run at every interpreter
    start: on the VM of BENCHMARKS.md an injected one imports ~70 modules, 60+ ms per start.
    The peers run in a virtual environment of their own likewise (bench/.venv-peers)."""
    python = os.path.join(BARE_VENV, "bin", "python3")
    if not os.path.exists(python):
        subprocess.run([resolve_python("python3"), "-m", "venv", "--without-pip", BARE_VENV], check=True)
    return python


def resolve_python(asked):
    """--python: `clean` (the default) for clean_python(), else a path or a name on PATH, as
    the interpreter's own `sys.executable` (the real one, not a shim that runs it)."""
    if asked == "clean":
        return clean_python()
    python = shutil.which(asked) or asked
    return subprocess.run([python, "-c", "import sys; print(sys.executable)"], capture_output=True,
                          text=True, check=True).stdout.strip()


_local = threading.local()


def call(method, url, body=None, timeout=120):
    """One request on this thread's keep-alive connection (as a real client would keep one)."""
    parts = urllib.parse.urlsplit(url)
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    data = None if body is None else json.dumps(body).encode()
    path = parts.path + ("?" + parts.query if parts.query else "")
    for attempt in (1, 2):
        conn = conns.get(parts.netloc)
        reused = conn is not None
        if conn is None:
            conn = conns[parts.netloc] = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
        except (http.client.HTTPException, OSError):
            conn.close()
            del conns[parts.netloc]
            if attempt == 2 or not reused:
                raise
            continue
        if resp.status >= 400:
            raise RuntimeError(f"{method} {url}: {resp.status} {payload[:200]!r}")
        return json.loads(payload)


def check(task):
    if task["status"] != "completed" or task["result"] != EXPECTED:
        raise RuntimeError(f"task {task['task_id']} ended {task['status']}: {task.get('error')}")


class Cluster:
    """A coordinator (no local agent) and one agent with 2 slots, in a temp dir."""

    def __init__(self, bin_dir, executor, cpus, sync, python=None, max_level=None):
        self.dir = tempfile.mkdtemp(prefix="lull-bench-")
        self.procs = []
        coord = subprocess.Popen(
            [os.path.join(bin_dir, "lull-coordinator"), "--listen", "127.0.0.1:0",
             "--data-dir", os.path.join(self.dir, "coord"), "--local-agents", "0",
             "--heartbeat-interval", "1", "--node-ttl", "5", "--sync", sync],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(coord)
        line = coord.stdout.readline().strip()
        self.url = line.rsplit(" ", 1)[-1]
        agent = subprocess.Popen(
            [os.path.join(bin_dir, "lull-agent"), "--coordinator", self.url,
             "--state-dir", os.path.join(self.dir, "agent"), "--cpus", str(cpus),
             "--heartbeat-interval", "1", "--executor", executor,
             # The benchmark's own client and coordinator share the host: with the owner policy
             # on, their CPU (and anything else running) would count as the owner's and pause it.
             "--owner-policy", "off"]
            + (["--python", python] if python else [])
            + (["--max-sandbox-level", max_level] if max_level else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(agent)
        deadline = time.time() + 60
        while True:
            nodes = call("GET", self.url + "/api/v1/nodes")["items"]
            if nodes and nodes[0].get("executor"):
                self.node = nodes[0]
                break
            if time.time() > deadline:
                raise RuntimeError("the agent did not join")
            time.sleep(0.05)

    def submit(self):
        return call("POST", self.url + "/api/v1/tasks", {"code": CODE})["task_id"]

    def submit_many(self, n):
        """`POST /api/v1/tasks/batch`: up to 1,000 tasks per request, as a client with many
        tasks at hand submits them."""
        ids = []
        while len(ids) < n:
            count = min(1000, n - len(ids))
            answer = call("POST", self.url + "/api/v1/tasks/batch", {"tasks": [{"code": CODE}] * count})
            ids.extend(answer["task_ids"])
        return ids

    def wait(self, task_id):
        task = call("GET", f"{self.url}/api/v1/tasks/{task_id}?wait=60")
        check(task)
        return task

    def run(self, requests="one"):
        """One task, its result waited for: in one request (`POST /api/v1/tasks?wait=60`, as a
        client that wants the result calls Lull), or with requests="two" a submission and then
        `GET /api/v1/tasks/{id}?wait=60`. A coordinator from before the one-request form
        (its answer has no `runs`) is asked again with the second request."""
        if requests == "two":
            return self.wait(self.submit())
        task = call("POST", self.url + "/api/v1/tasks?wait=60", {"code": CODE})
        if "runs" not in task:
            return self.wait(task["task_id"])
        check(task)
        return task

    def wait_all(self, task_ids, rounds=10):
        """`GET /api/v1/tasks/wait`: up to 1,000 tasks per request, as a client collecting a
        batch's results would (asked again while some are unfinished after 60 s, at most
        `rounds` times per 1,000)."""
        for first in range(0, len(task_ids), 1000):
            chunk = ",".join(str(t) for t in task_ids[first:first + 1000])
            for _ in range(rounds):
                answer = call("GET", f"{self.url}/api/v1/tasks/wait?ids={chunk}&wait=60")
                if answer["finished"] == answer["count"]:
                    break
            else:
                raise RuntimeError(f"{answer['count'] - answer['finished']} tasks unfinished after "
                                   f"{rounds} minutes")
            for task in answer["items"]:
                check(task)

    def close(self):
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def process_cpu(pid, reaped=False):
    """CPU seconds a process used so far; with `reaped`, also every process below it: the
    reaped ones (its children's times) and the live ones (the zygote's spare, runs not yet
    reaped)."""
    return process_ticks(pid, reaped) / os.sysconf("SC_CLK_TCK")


def process_ticks(pid, reaped):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
        for kid in children(pid):
            try:
                ticks += process_ticks(kid, reaped=True)
            except (FileNotFoundError, ProcessLookupError):
                pass  # reaped meanwhile: its time is in ours
    return ticks


def children(pid):
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids.extend(int(k) for k in f.read().split())
    return kids


class CpuMeter:
    """CPU per part over a stretch of the benchmark: coordinator, agent, zygote with its
    runs (or the cold executor's reaped launchers), this client. Kernel threads (namespace
    teardown, block I/O) are not counted anywhere."""

    def __init__(self, cluster):
        self.parts = {"coordinator": (cluster.procs[0].pid, False), "agent": (cluster.procs[1].pid, True)}
        for kid in children(cluster.procs[1].pid):
            with open(f"/proc/{kid}/comm") as f:
                if f.read().strip() == "lull-zygote":
                    # Its runs are reaped by it: they count with it, not with the agent.
                    self.parts["zygote+runs"] = (kid, True)
                    self.parts["agent"] = (cluster.procs[1].pid, False)
        self.start = self.read()

    def read(self):
        now = {name: process_cpu(pid, reaped) for name, (pid, reaped) in self.parts.items()}
        now["client"] = sum(os.times()[:2])
        return now

    def per_task_ms(self, n):
        end = self.read()
        return {name: (end[name] - self.start[name]) / n * 1000 for name in end}


def batch(cluster, n, one_by_one=False, clients=4, collect="batch"):
    """Submit all (one `POST /api/v1/tasks/batch` per 1,000 tasks, or one request per task
    from `clients` threads with `one_by_one`), then collect the results (1,000 per request,
    or one request each with collect="each"); tasks/s."""
    ids = []
    lock = threading.Lock()

    def submitter(count):
        for _ in range(count):
            task_id = cluster.submit()
            with lock:
                ids.append(task_id)

    start = time.perf_counter()
    if one_by_one:
        threads = [threading.Thread(target=submitter, args=(n // clients + (i < n % clients),))
                   for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        ids = cluster.submit_many(n)
    if collect == "each":
        for task_id in sorted(ids):
            cluster.wait(task_id)
    else:
        cluster.wait_all(sorted(ids))
    return n / (time.perf_counter() - start)


def closed_loop(cluster, per_client, clients=2, requests="one"):
    latencies = []
    lock = threading.Lock()

    def client():
        mine = []
        for _ in range(per_client):
            t0 = time.perf_counter()
            cluster.run(requests)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    return pick(0.50), pick(0.99)


def idle(cluster, count, gap, requests="one"):
    """One task at a time with `gap` seconds of quiet before each, as a user with an idle
    node meets it: latency submit -> result, p50 and max."""
    latencies = []
    for _ in range(count):
        time.sleep(gap)
        t0 = time.perf_counter()
        cluster.run(requests)
        latencies.append(time.perf_counter() - t0)
    latencies.sort()
    return latencies[len(latencies) // 2] * 1000, latencies[-1] * 1000


def measure_once(args, bin_dir, python, executor, asked_level, skip=None):
    """One executor at one level, with the binaries in `bin_dir`: a row, or None when the
    host settles at a level already in `skip` (a set of (executor, level), added to)."""
    cluster = Cluster(bin_dir, executor, args.cpus, args.sync, python, asked_level)
    try:
        used = cluster.node.get("executor")
        level = (cluster.node.get("sandbox") or {}).get("level", "unknown")
        if skip is not None:
            if (executor, level) in skip:
                print(f"{executor} at --max-sandbox-level {asked_level}: this host settles at {level}, "
                      f"measured already", file=sys.stderr)
                return None
            skip.add((executor, level))
        for _ in range(20):  # warm-up
            cluster.run(args.requests)
        meter = CpuMeter(cluster)
        rates = [batch(cluster, args.tasks, args.one_by_one, collect=args.collect)
                 for _ in range(args.repeat)]
        cpu = meter.per_task_ms(args.tasks * args.repeat)
        p50, p99 = closed_loop(cluster, args.closed_loop, requests=args.requests) if args.closed_loop else (None, None)
        idle_p50, idle_max = idle(cluster, args.idle, args.idle_gap, args.requests) if args.idle else (None, None)
    finally:
        cluster.close()
    return {"asked": executor, "executor": used, "sandbox": level, "asked_level": asked_level,
            "batch_median": statistics.median(rates), "batch_min": min(rates), "batch_max": max(rates),
            "closed_p50_ms": p50, "closed_p99_ms": p99, "idle_p50_ms": idle_p50, "idle_max_ms": idle_max,
            "cpu_ms_per_task": cpu}


def compare(args, python, runs):
    """--compare A,B: two builds' binaries measured in interleaved pairs (A then B, then B then
    A, ...), each measurement as one run of this script's, so that a VM whose speed drifts
    moves both sides of a pair alike. Prints each pair and how many B won."""
    dirs = args.compare.split(",")
    if len(dirs) != 2 or len(runs) != 1:
        raise SystemExit("--compare takes two binary directories, one executor and one level")
    (executor, asked_level), = runs
    pairs = []
    for number in range(args.pairs):
        order = dirs if number % 2 == 0 else dirs[::-1]
        pair = {d: measure_once(args, d, python, executor, asked_level) for d in order}
        pairs.append(pair)
        print(json.dumps({"pair": number + 1, **pair}), file=sys.stderr)

    a, b = dirs
    metrics = [("batch tasks/s", "batch_median", True), ("closed loop p50 ms", "closed_p50_ms", False),
               ("idle node p50 ms", "idle_p50_ms", False)]
    print(f"\n{executor}, {args.pairs} interleaved pairs, {args.tasks} tasks x {args.repeat} per batch "
          f"measurement; A = {a}, B = {b}\n")
    print("| pair | " + " | ".join(f"{name} A | B" for name, _, _ in metrics) + " | CPU per task ms A | B |")
    print("|---|" + "---|---|" * (len(metrics) + 1))

    def cell(row, key):
        return "-" if row[key] is None else f"{row[key]:.1f}" if key != "batch_median" else f"{row[key]:.0f}"

    for number, pair in enumerate(pairs, 1):
        cells = [f"{cell(pair[a], key)} | {cell(pair[b], key)}" for _, key, _ in metrics]
        cpu = [f"{sum(pair[d]['cpu_ms_per_task'].values()):.2f}" for d in (a, b)]
        print(f"| {number} | " + " | ".join(cells) + f" | {cpu[0]} | {cpu[1]} |")
    for name, key, higher_is_better in metrics:
        if pairs[0][a][key] is None:
            continue
        wins = sum((p[b][key] > p[a][key]) == higher_is_better for p in pairs)
        ratio = statistics.median(p[b][key] / p[a][key] for p in pairs)
        print(f"- {name}: B better in {wins} of {len(pairs)} pairs; B / A median {ratio:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--closed-loop", type=int, default=200, help="tasks per client in the closed loop (0: skip it)")
    ap.add_argument("--idle", type=int, default=20, help="tasks in the idle mode (0: skip it)")
    ap.add_argument("--idle-gap", type=float, default=0.2, help="seconds of quiet before each idle-mode task")
    ap.add_argument("--executors", default="cold,zygote")
    ap.add_argument("--levels", default="best",
                    help="sandbox levels to measure each executor at, strongest first, as the agent's "
                         "--max-sandbox-level: `best` (the strongest this host allows), `all` "
                         "(full,isolated,basic,none; a level this host settles below is skipped once "
                         "that level was measured), or a list such as full,none")
    ap.add_argument("--cpus", type=float, default=2)
    ap.add_argument("--sync", default="full", choices=["full", "normal"], help="the coordinator's SQLite durability")
    ap.add_argument("--bin-dir", default=os.path.join(os.path.dirname(__file__), "..", "target", "release"))
    ap.add_argument("--python", default="clean",
                    help="the agent's --python (the zygote must be built against the same version); "
                         "default `clean`: a virtual environment with nothing installed (bench/.venv-bare); "
                         "`python3` for the host's own")
    ap.add_argument("--collect", default="batch", choices=["batch", "each"],
                    help="batch mode collects results 1,000 per request (GET /api/v1/tasks/wait) or one "
                         "GET /api/v1/tasks/{id}?wait= per task")
    ap.add_argument("--compare", metavar="A,B",
                    help="two binary directories (as --bin-dir) measured in interleaved pairs, one executor "
                         "and one level: an A/B of two builds on a VM whose speed drifts")
    ap.add_argument("--pairs", type=int, default=4, help="pairs for --compare")
    ap.add_argument("--requests", default="one", choices=["one", "two"],
                    help="closed loop and idle node: a task and its result in one request "
                         "(POST /api/v1/tasks?wait=60) or two (the submission, then GET ?wait=60)")
    ap.add_argument("--one-by-one", action="store_true",
                    help="batch mode submits one task per request (4 threads) instead of POST /api/v1/tasks/batch")
    args = ap.parse_args()

    python = resolve_python(args.python)
    print(f"agent --python {python}", file=sys.stderr)
    rows = []
    levels = {"best": [None], "all": ["full", "isolated", "basic", "none"]}.get(args.levels, args.levels.split(","))
    runs = [(executor, asked) for executor in args.executors.split(",") for asked in levels]
    if args.compare:
        return compare(args, python, runs)
    measured = set()
    for executor, asked_level in runs:
        row = measure_once(args, args.bin_dir, python, executor, asked_level, skip=measured)
        if row is None:
            continue
        rows.append(row)
        print(json.dumps(rows[-1]), file=sys.stderr)

    print(f"\n{args.tasks} tasks of `{CODE}`, one agent with {args.cpus:g} slots, {os.cpu_count()} cores, "
          f"coordinator --sync {args.sync}, agent --python {python}, results collected "
          f"{'1,000 per request' if args.collect == 'batch' else 'one request each'}\n")
    print("| executor | sandbox | batch tasks/s (median, min-max) | closed loop p50 | p99 | idle node p50 (max) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = r["executor"] if r["executor"] == r["asked"] else f"{r['asked']} (ran {r['executor']})"
        closed = (f"| {r['closed_p50_ms']:.1f} ms | {r['closed_p99_ms']:.1f} ms "
                  if r["closed_p50_ms"] is not None else "| - | - ")
        sandbox = r["sandbox"] if r["asked_level"] in (None, r["sandbox"]) else f"{r['sandbox']} (asked {r['asked_level']})"
        print(f"| {name} | {sandbox} | {r['batch_median']:.0f} ({r['batch_min']:.0f}-{r['batch_max']:.0f}) "
              + closed
              + (f"| {r['idle_p50_ms']:.1f} ms ({r['idle_max_ms']:.1f}) |" if r["idle_p50_ms"] is not None else "| - |"))
    print("\nCPU per task in batch mode (ms; kernel threads not counted):")
    for r in rows:
        parts = ", ".join(f"{name} {ms:.2f}" for name, ms in r["cpu_ms_per_task"].items())
        print(f"- {r['executor']}, {r['sandbox']}: {parts}, total {sum(r['cpu_ms_per_task'].values()):.2f}")


if __name__ == "__main__":
    main()
