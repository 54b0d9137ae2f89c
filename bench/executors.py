#!/usr/bin/env python3
"""Executor benchmark: N trivial tasks through one coordinator and one agent, per executor.

    cargo build --release --bins && python3 bench/executors.py [--tasks 1000] [--repeat 3]

Workload: the code string `print(sum(range(1000)))`; the result is its stdout.
Reports, per executor, with the sandbox level the agent actually used:
  - batch: submit all tasks (`POST /api/v1/tasks/batch`, 1,000 per request; one request per
    task with --one-by-one), then collect each result with `GET /api/v1/tasks/{id}?wait=60`;
    tasks/s = N / (first submit .. last result), median of --repeat runs with min-max;
  - closed loop: 2 clients, one task in flight each; latency submit -> result, p50/p99.
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


class Cluster:
    """A coordinator (no local agent) and one agent with 2 slots, in a temp dir."""

    def __init__(self, bin_dir, executor, cpus, sync, python=None):
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
            + (["--python", python] if python else []),
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
        if task["status"] != "completed" or task["result"] != EXPECTED:
            raise RuntimeError(f"task {task_id} ended {task['status']}: {task.get('error')}")
        return task

    def close(self):
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def batch(cluster, n, one_by_one=False, clients=4):
    """Submit all (one `POST /api/v1/tasks/batch` per 1,000 tasks, or one request per task
    from `clients` threads with `one_by_one`), then collect each result; tasks/s."""
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
    for task_id in sorted(ids):
        cluster.wait(task_id)
    return n / (time.perf_counter() - start)


def closed_loop(cluster, per_client, clients=2):
    latencies = []
    lock = threading.Lock()

    def client():
        mine = []
        for _ in range(per_client):
            t0 = time.perf_counter()
            cluster.wait(cluster.submit())
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--closed-loop", type=int, default=200, help="tasks per client in the closed loop")
    ap.add_argument("--executors", default="cold,zygote")
    ap.add_argument("--cpus", type=float, default=2)
    ap.add_argument("--sync", default="full", choices=["full", "normal"], help="the coordinator's SQLite durability")
    ap.add_argument("--bin-dir", default=os.path.join(os.path.dirname(__file__), "..", "target", "release"))
    ap.add_argument("--python", help="the agent's --python (the zygote must be built against the same version)")
    ap.add_argument("--one-by-one", action="store_true",
                    help="batch mode submits one task per request (4 threads) instead of POST /api/v1/tasks/batch")
    args = ap.parse_args()

    rows = []
    for executor in args.executors.split(","):
        cluster = Cluster(args.bin_dir, executor, args.cpus, args.sync, args.python)
        try:
            used = cluster.node.get("executor")
            level = (cluster.node.get("sandbox") or {}).get("level", "unknown")
            for _ in range(20):  # warm-up
                cluster.wait(cluster.submit())
            rates = [batch(cluster, args.tasks, args.one_by_one) for _ in range(args.repeat)]
            p50, p99 = closed_loop(cluster, args.closed_loop)
        finally:
            cluster.close()
        rows.append({"asked": executor, "executor": used, "sandbox": level,
                     "batch_median": statistics.median(rates), "batch_min": min(rates), "batch_max": max(rates),
                     "closed_p50_ms": p50, "closed_p99_ms": p99})
        print(json.dumps(rows[-1]), file=sys.stderr)

    print(f"\n{args.tasks} tasks of `{CODE}`, one agent with {args.cpus:g} slots, {os.cpu_count()} cores, "
          f"coordinator --sync {args.sync}\n")
    print("| executor | sandbox | batch tasks/s (median, min-max) | closed loop p50 | p99 |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = r["executor"] if r["executor"] == r["asked"] else f"{r['asked']} (ran {r['executor']})"
        print(f"| {name} | {r['sandbox']} | {r['batch_median']:.0f} ({r['batch_min']:.0f}-{r['batch_max']:.0f}) "
              f"| {r['closed_p50_ms']:.1f} ms | {r['closed_p99_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
