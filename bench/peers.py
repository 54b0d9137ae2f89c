#!/usr/bin/env python3
"""Lull side by side with Celery, RQ and Ray: the same N trivial tasks on the same machine, in one run.

    cargo build --release --bins && python3 bench/peers.py [--tasks 1000] [--repeat 3] [--closed-loop 600]

Workload: the code string `print(sum(range(1000)))`; the result is its stdout.
The systems are measured in --repeat rounds, each system once per round, in turn (started,
warmed up with 20 tasks, measured, stopped), so that a VM whose speed drifts within minutes
moves every system alike; a ratio between two systems is the median of their per-round ratios.
For every system, in every round: batch (submit all, then collect; tasks/s = N / (first
submit .. last result); the table gives the median of the rounds with min-max), then one more
batch of N for its latencies, submit -> result p50/p99 over every round's, its results
collected one at a time in the order submitted: a task's latency runs from just before its
submission (its request's, for Lull's batch requests) to the moment the client has its result;
and closed loop (2 clients, one task in flight each, --closed-loop tasks per client split over
the rounds; latency submit -> result, p50/p99).

  - Lull: coordinator (--sync full) + one agent with 2 slots, over HTTP, zygote executor with
    the strongest sandbox this host allows (printed), and cold with --cold-tasks. Batch mode
    submits with `POST /api/v1/tasks/batch` (1,000 per request), as the others submit from
    one client in a loop, and collects the results with `GET /api/v1/tasks/wait?ids=&wait=`
    (1,000 per request, as Ray's `ray.get(list)` collects them; `--collect each`: one
    `GET /api/v1/tasks/{id}?wait=` per task, as Celery's `result.get()`). The closed loop
    submits each task and waits for its result in one request (`POST /api/v1/tasks?wait=60`),
    as Ray's `ray.get(f.remote(code))` does in one call.
  - Celery 5 + Redis broker and result backend, --pool=prefork --concurrency=2, a task that
    exec()s the code with stdout captured.
  - RQ with 2 workers (each forks per job), the same function.
  - Ray with num_cpus=2, a remote function that exec()s the code.
  - bare-python: a fresh `python3 -I -c CODE` per task, 2 at a time, nothing else — the floor
    for Lull's cold executor (--cold-tasks per batch).
  - fork-server: a warm Python process that forks a child per task (stdout on a pipe, the code
    exec()'d, os._exit), serving 2 clients over a Unix socket, nothing else — no sandbox, no
    HTTP, no queue: the floor for Lull's zygote executor (the issue's "warm Python fork server").

The peers are installed by this script into a virtualenv (bench/.venv-peers, from PyPI) and
started on 127.0.0.1 only: a private redis-server on a free port (no persistence), Celery and
RQ workers, a local Ray instance. Everything is stopped afterwards. Not a test: it asserts only
that every result is right. Writes the table to stdout, the rows with --json, and three SVG charts
(bench/charts/peers-throughput.svg, peers-latency.svg, peers-batch-latency.svg; --charts DIR).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CODE = "print(sum(range(1000)))"
EXPECTED = str(sum(range(1000))) + "\n"
VENV = os.path.join(HERE, ".venv-peers")
PEER_PACKAGES = ["celery[redis]>=5,<6", "redis>=5", "rq>=2", "ray>=2.40"]

JOB_MODULE = '''
import contextlib, io

def run_code(code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"__name__": "__main__"})
    return out.getvalue()
'''

CELERY_MODULE = '''
import os
from celery import Celery
from lull_bench_job import run_code

url = os.environ["LULL_BENCH_REDIS"]
app = Celery("lull_bench", broker=url, backend=url)
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

@app.task(name="run")
def run(code):
    return run_code(code)
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def in_order(sent, collect):
    """Batch latencies: `sent` is (time just before submission, handle) per task, in the order
    submitted; collects each handle in that order and returns the seconds each took from its
    submission to its result."""
    latencies = []
    for t0, handle in sent:
        collect(handle)
        latencies.append(time.perf_counter() - t0)
    return latencies


def measure(submit_all, one, n, repeat, per_client, batch_latencies):
    """submit_all(n) -> seconds for a batch; one() -> runs one task and checks it;
    batch_latencies(n) -> each task's seconds from submission to result in a batch of n,
    submitted all at once and collected one at a time in the order submitted. Returns the
    samples (tasks/s of each batch, latencies in ms), which pooled() makes a row of."""
    for _ in range(20):  # warm-up
        one()
    rates = [n / submit_all(n) for _ in range(repeat)]
    in_batch = sorted(batch_latencies(n))
    if len(in_batch) != n:
        raise RuntimeError(f"{len(in_batch)} batch latencies for {n} tasks")
    latencies = []
    lock = threading.Lock()

    def client():
        mine = []
        for _ in range(per_client):
            t0 = time.perf_counter()
            one()
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {
        "rates": rates,
        "batch_latencies_ms": [t * 1000 for t in in_batch],
        "closed_latencies_ms": [t * 1000 for t in latencies],
    }


def pooled(rounds):
    """One row from a system's rounds (measure()'s results, oldest first): tasks/s median
    and min-max over every batch of every round, latency percentiles over every round's
    latencies together, each round's rate in `round_rates`."""
    rates = [rate for r in rounds for rate in r["rates"]]
    in_batch = sorted(t for r in rounds for t in r["batch_latencies_ms"])
    closed = sorted(t for r in rounds for t in r["closed_latencies_ms"])
    row = {k: v for k, v in rounds[0].items() if k not in ("rates", "batch_latencies_ms", "closed_latencies_ms")}
    row.update({
        "batch_median": statistics.median(rates),
        "batch_min": min(rates),
        "batch_max": max(rates),
        "batch_p50_ms": percentile(in_batch, 0.50),
        "batch_p99_ms": percentile(in_batch, 0.99),
        "closed_p50_ms": percentile(closed, 0.50),
        "closed_p99_ms": percentile(closed, 0.99),
        "round_rates": [statistics.median(r["rates"]) for r in rounds],
    })
    return row


def paired_ratio(ours, theirs):
    """Median over the rounds of one system's rate divided by another's in the same round:
    each pair measured minutes apart at most, so a VM whose speed drifts moves both."""
    return statistics.median(a / b for a, b in zip(ours["round_rates"], theirs["round_rates"]))


# ---------------------------------------------------------------------------------------------
# Peers, each run inside the virtualenv by `peers.py --peer NAME`
# ---------------------------------------------------------------------------------------------


def peer_celery(args, workdir, redis_url):
    env = dict(os.environ, LULL_BENCH_REDIS=redis_url, PYTHONPATH=workdir)
    worker = subprocess.Popen(
        [os.path.join(VENV, "bin", "celery"), "-A", "lull_bench_celery", "worker",
         "--pool=prefork", "--concurrency=2", "--loglevel=WARNING", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sys.path.insert(0, workdir)
        os.environ["LULL_BENCH_REDIS"] = redis_url
        import lull_bench_celery as bench_app

        deadline = time.time() + 60
        while not bench_app.app.control.ping(timeout=0.5):
            if time.time() > deadline:
                raise RuntimeError("the Celery worker did not come up")

        def check(out):
            if out != EXPECTED:
                raise RuntimeError(f"celery returned {out!r}")

        def one():
            check(bench_app.run.delay(CODE).get(timeout=60))

        def batch(n):
            t0 = time.perf_counter()
            results = [bench_app.run.delay(CODE) for _ in range(n)]
            for r in results:
                check(r.get(timeout=120))
            return time.perf_counter() - t0

        def batch_latencies(n):
            sent = [(time.perf_counter(), bench_app.run.delay(CODE)) for _ in range(n)]
            return in_order(sent, lambda r: check(r.get(timeout=120)))

        return measure(batch, one, args.tasks, args.repeat, args.closed_loop, batch_latencies)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def peer_rq(args, workdir, redis_url):
    env = dict(os.environ, PYTHONPATH=workdir)
    workers = [
        subprocess.Popen(
            [os.path.join(VENV, "bin", "rq"), "worker", "--url", redis_url, "--path", workdir,
             "--quiet", "lull_bench"],
            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    try:
        sys.path.insert(0, workdir)
        from redis import Redis
        from rq import Queue, Worker
        from lull_bench_job import run_code

        conn = Redis.from_url(redis_url)
        queue = Queue("lull_bench", connection=conn)
        deadline = time.time() + 60
        while len(Worker.all(connection=conn)) < 2:
            if time.time() > deadline:
                raise RuntimeError("the RQ workers did not come up")
            time.sleep(0.1)

        def result_of(job):
            result = job.latest_result(timeout=120)
            if result is None or result.type != result.Type.SUCCESSFUL or result.return_value != EXPECTED:
                raise RuntimeError(f"rq returned {result and result.return_value!r}")

        def one():
            result_of(queue.enqueue(run_code, CODE))

        def batch(n):
            t0 = time.perf_counter()
            jobs = [queue.enqueue(run_code, CODE) for _ in range(n)]
            for job in jobs:
                result_of(job)
            return time.perf_counter() - t0

        def batch_latencies(n):
            sent = [(time.perf_counter(), queue.enqueue(run_code, CODE)) for _ in range(n)]
            return in_order(sent, result_of)

        return measure(batch, one, args.tasks, args.repeat, args.closed_loop, batch_latencies)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()


def peer_ray(args, workdir, _redis_url):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _temp_dir=os.path.join(workdir, "ray"), configure_logging=False)
    try:
        namespace = {}
        exec(JOB_MODULE, namespace)  # defined here, so that Ray ships the function by value
        remote = ray.remote(namespace["run_code"])

        def check(out):
            if out != EXPECTED:
                raise RuntimeError(f"ray returned {out!r}")

        def one():
            check(ray.get(remote.remote(CODE)))

        def batch(n):
            t0 = time.perf_counter()
            for out in ray.get([remote.remote(CODE) for _ in range(n)]):
                check(out)
            return time.perf_counter() - t0

        def batch_latencies(n):
            sent = [(time.perf_counter(), remote.remote(CODE)) for _ in range(n)]
            return in_order(sent, lambda ref: check(ray.get(ref)))

        return measure(batch, one, args.tasks, args.repeat, args.closed_loop, batch_latencies)
    finally:
        ray.shutdown()


PEERS = {"celery": peer_celery, "rq": peer_rq, "ray": peer_ray}


def run_peer_here(args):
    """Inside the virtualenv: one peer, printed as one JSON line."""
    workdir = args.workdir
    result = PEERS[args.peer](args, workdir, args.redis_url)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def ensure_venv():
    python = os.path.join(VENV, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PEER_PACKAGES],
                   check=True)
    return python


def versions(python):
    code = ("import importlib.metadata as m\n"
            "print(' '.join(f'{p} {m.version(p)}' for p in ('celery', 'rq', 'ray', 'redis')))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def run_peer(python, name, args, workdir, redis_url):
    cmd = [python, os.path.abspath(__file__), "--peer", name, "--workdir", workdir, "--redis-url", redis_url,
           "--tasks", str(args.tasks), "--repeat", str(args.repeat), "--closed-loop", str(args.closed_loop)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def run_lull(args, executor, tasks):
    sys.path.insert(0, HERE)
    import executors as lull  # bench/executors.py

    cluster = lull.Cluster(args.bin_dir, executor, 2, "full", lull.resolve_python(args.python))
    try:
        level = (cluster.node.get("sandbox") or {}).get("level", "unknown")
        used = cluster.node.get("executor")

        def one():
            cluster.run()

        def batch(n):
            return n / lull.batch(cluster, n, collect=args.collect)

        def batch_latencies(n):
            sent = []
            while len(sent) < n:
                t0 = time.perf_counter()
                sent.extend((t0, task_id) for task_id in cluster.submit_many(min(1000, n - len(sent))))
            return in_order(sent, cluster.wait)

        result = measure(batch, one, tasks, args.repeat, args.closed_loop, batch_latencies)
        result["sandbox"] = level
        result["executor"] = used
        return result
    finally:
        cluster.close()


def two_at_a_time(one):
    """A batch for measure(): n calls of one(), two at a time from two threads; seconds."""
    import concurrent.futures

    def batch(n):
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: one(), range(n)))
        return time.perf_counter() - t0

    return batch


def two_at_a_time_latencies(one):
    """batch_latencies for measure(): n calls of one() handed to two threads at once (the
    "submission"), their results taken in order; each one's seconds from then to its result."""
    import concurrent.futures

    def batch_latencies(n):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            sent = [(time.perf_counter(), pool.submit(one)) for _ in range(n)]
            return in_order(sent, concurrent.futures.Future.result)

    return batch_latencies


def run_bare(args, tasks):
    """The floor for a fresh interpreter per task: `python3 -I -c CODE` (the interpreter Lull's
    agent is given, --python), two at a time from two threads, no Lull, no HTTP, no sandbox."""
    sys.path.insert(0, HERE)
    import executors as lull  # bench/executors.py

    python = lull.resolve_python(args.python)
    expected = str(sum(range(1000)))

    def one():
        out = subprocess.run([python, "-I", "-c", CODE], capture_output=True, text=True, check=True).stdout
        if out.strip() != expected:
            raise RuntimeError(f"python3 -I printed {out!r}")

    return measure(two_at_a_time(one), one, tasks, args.repeat, args.closed_loop,
                   two_at_a_time_latencies(one))


FORK_SERVER = r'''
import gc, os, selectors, socket, struct, sys

compile("pass", "<fork-server>", "exec")
gc.freeze()
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1])
server.listen(16)
selector = selectors.DefaultSelector()
selector.register(server, selectors.EVENT_READ, None)
print("ready", flush=True)
while True:
    for key, _ in selector.select():
        what = key.data
        if what is None:
            conn, _ = server.accept()
            selector.register(conn, selectors.EVENT_READ, ("client", conn, bytearray()))
        elif what[0] == "client":
            _, conn, pending = what
            data = conn.recv(65536)
            if not data:
                selector.unregister(conn)
                conn.close()
                continue
            pending.extend(data)
            while b"\n" in pending:
                line, _, rest = bytes(pending).partition(b"\n")
                pending[:] = rest
                read, write = os.pipe()
                pid = os.fork()
                if pid == 0:
                    try:
                        os.close(read)
                        os.dup2(write, 1)
                        exec(compile(line.decode(), "<string>", "exec"), {"__name__": "__main__"})
                        sys.stdout.flush()
                    finally:
                        os._exit(0)
                os.close(write)
                selector.register(read, selectors.EVENT_READ, ("child", conn, pid, bytearray()))
        else:
            _, conn, pid, out = what
            data = os.read(key.fd, 65536)
            if data:
                out.extend(data)
                continue
            selector.unregister(key.fd)
            os.close(key.fd)
            os.waitpid(pid, 0)
            conn.sendall(struct.pack("!I", len(out)) + bytes(out))
'''


def run_fork_server(args, tasks):
    """The floor for a fork per task from a warm interpreter (FORK_SERVER, in the interpreter
    Lull's agent is given, --python): two clients over a Unix socket, no Lull, no sandbox."""
    import struct

    sys.path.insert(0, HERE)
    import executors as lull  # bench/executors.py

    python = lull.resolve_python(args.python)
    workdir = tempfile.mkdtemp(prefix="lull-fork-server-")
    path = os.path.join(workdir, "socket")
    server = subprocess.Popen([python, "-I", "-c", FORK_SERVER, path], stdout=subprocess.PIPE, text=True)
    local = threading.local()

    def connection():
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
        return conn

    def receive(conn, n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise RuntimeError("the fork server closed the connection")
            data += chunk
        return data

    def one():
        conn = connection()
        conn.sendall(CODE.encode() + b"\n")
        (size,) = struct.unpack("!I", receive(conn, 4))
        out = receive(conn, size).decode()
        if out != EXPECTED:
            raise RuntimeError(f"the fork server's child printed {out!r}")

    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the fork server did not start")
        return measure(two_at_a_time(one), one, tasks, args.repeat, args.closed_loop,
                       two_at_a_time_latencies(one))
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def run_system(system, args, python, workdir, redis_url):
    """One system measured once (args.repeat batches): measure()'s result."""
    if system == "lull-zygote":
        return run_lull(args, "zygote", args.tasks)
    if system == "lull-cold":
        return run_lull(args, "cold", args.cold_tasks)
    if system == "bare-python":
        return run_bare(args, args.cold_tasks)
    if system == "fork-server":
        return run_fork_server(args, args.tasks)
    if system in PEERS:
        return run_peer(python, system, args, workdir, redis_url)
    raise SystemExit(f"unknown system {system!r}")


def system_name(system, row):
    return {
        "lull-zygote": f"Lull, zygote ({row.get('sandbox')} sandbox, a fresh process per task)",
        "lull-cold": f"Lull, cold ({row.get('sandbox')} sandbox, a new python3 per task)",
        "bare-python": "a fresh `python3 -I -c` per task, 2 at a time (no Lull, no sandbox)",
        "fork-server": "a warm Python fork server, a fork per task, 2 at a time (no Lull, no sandbox)",
        "celery": "Celery + Redis, prefork 2 (warm worker, no isolation)",
        "rq": "RQ, 2 workers (a fork per job, no sandbox)",
        "ray": "Ray, num_cpus=2 (warm worker, no isolation)",
    }[system]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--cold-tasks", type=int, default=200, help="tasks per batch for Lull's cold executor")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds: each system is measured once per round, in turn")
    ap.add_argument("--closed-loop", type=int, default=600,
                    help="tasks per client in the closed loop, split over the rounds (600: 200 "
                         "per round, enough for the p50 to settle within a few per cent)")
    ap.add_argument("--systems", default="lull-zygote,lull-cold,bare-python,fork-server,celery,rq,ray")
    ap.add_argument("--bin-dir", default=os.path.join(HERE, "..", "target", "release"))
    ap.add_argument("--collect", default="batch", choices=["batch", "each"],
                    help="how Lull's batch mode collects results: 1,000 per request or one request each")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--charts", default=os.path.join(HERE, "charts"), help="write the SVG charts here ('' for none)")
    ap.add_argument("--python", default="clean",
                    help="Lull agent's --python and bare-python's interpreter (the zygote must embed the same "
                         "version); default `clean`: a virtual environment with nothing installed "
                         "(bench/.venv-bare, see executors.clean_python); `python3` for the host's own")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return run_peer_here(args)

    systems = args.systems.split(",")
    rows = []
    workdir = tempfile.mkdtemp(prefix="lull-peers-")
    redis = None
    try:
        peers = [s for s in systems if s in PEERS]
        python = ensure_venv() if peers else None
        if python:
            print(f"peers: {versions(python)}", file=sys.stderr)
        with open(os.path.join(workdir, "lull_bench_job.py"), "w") as f:
            f.write(JOB_MODULE)
        with open(os.path.join(workdir, "lull_bench_celery.py"), "w") as f:
            f.write(CELERY_MODULE)
        if "celery" in peers or "rq" in peers:
            port = free_port()
            redis = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 30
            while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
                if time.time() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            redis_url = f"redis://127.0.0.1:{port}/0"
        else:
            redis_url = ""
        # Round by round, each system once per round, in turn: this VM's speed drifts by a
        # quarter within minutes, which would favour whichever system ran in a fast spell.
        per_round = argparse.Namespace(**vars(args))
        per_round.repeat = 1
        per_round.closed_loop = -(-args.closed_loop // args.repeat)
        rounds = {system: [] for system in systems}
        for number in range(1, args.repeat + 1):
            for system in systems:
                if system in PEERS and redis is not None:
                    subprocess.run(["redis-cli", "-p", str(port), "flushall"], capture_output=True)
                result = run_system(system, per_round, python, workdir, redis_url)
                rounds[system].append(result)
                print(f"round {number}/{args.repeat}: {system} {statistics.median(result['rates']):.0f} tasks/s",
                      file=sys.stderr)
        for system in systems:
            row = pooled(rounds[system])
            row["system"] = system_name(system, row)
            row["key"] = system
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        if redis is not None:
            redis.send_signal(signal.SIGTERM)
            try:
                redis.wait(timeout=10)
            except subprocess.TimeoutExpired:
                redis.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    lull_row = next((r for r in rows if r["key"] == "lull-zygote"), None)
    for r in rows:
        if lull_row:
            r["lull_zygote_ratio"] = paired_ratio(lull_row, r)
    cold_row = next((r for r in rows if r["key"] == "lull-cold"), None)
    bare_row = next((r for r in rows if r["key"] == "bare-python"), None)
    print(f"\n`{CODE}`, {args.tasks} tasks per batch (Lull cold and bare python: {args.cold_tasks}), "
          f"{args.repeat} rounds (each system once per round, in turn; median of the rounds); "
          f"closed loop: 2 clients x {per_round.closed_loop} per round; {os.cpu_count()} cores\n")
    print("| system | batch tasks/s (median, min-max) | batch latency p50 | p99 | closed loop p50 | p99 "
          "| Lull zygote / it (batch, paired by round) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['lull_zygote_ratio']:.2f}" if lull_row else ""
        print(f"| {r['system']} | {r['batch_median']:.0f} ({r['batch_min']:.0f}-{r['batch_max']:.0f}) "
              f"| {r['batch_p50_ms']:.0f} ms | {r['batch_p99_ms']:.0f} ms "
              f"| {r['closed_p50_ms']:.1f} ms | {r['closed_p99_ms']:.1f} ms | {ratio} |")
    if cold_row and bare_row:
        cold_row["bare_python_ratio"] = paired_ratio(cold_row, bare_row)
        each = ", ".join(f"{a / b:.0%}" for a, b in zip(cold_row["round_rates"], bare_row["round_rates"]))
        print(f"\nLull cold / bare python, round by round: {each}; median {cold_row['bare_python_ratio']:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.charts:
        sys.path.insert(0, HERE)
        import charts

        charts.peers_charts(rows, args.charts)
        print(f"\ncharts: {args.charts}/peers-throughput.svg, {args.charts}/peers-latency.svg, "
              f"{args.charts}/peers-batch-latency.svg")


if __name__ == "__main__":
    main()
