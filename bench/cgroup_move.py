#!/usr/bin/env python3
"""How long a fresh single-threaded process takes to move itself into a cgroup on cgroup v1,
through `cgroup.procs` (the whole process) and through `tasks` (its one thread), as a run's
process does before its run (agent/src/sandbox/cgroup.rs, `RunCgroup::join`).

Needs root and the v1 memory and pids hierarchies under /sys/fs/cgroup. Makes two groups
named lull-bench-move, removes them afterwards. Not a test: prints figures.

    python3 bench/cgroup_move.py [--moves 100] [--gap-ms 30]
"""

import argparse
import os
import sys
import time

ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("memory", "pids")
NAME = "lull-bench-move"


def move_times(file, moves, gap):
    """Forks `moves` children one after another; each writes "0" to `file` in both groups and
    reports how long that took. `gap` seconds of quiet between them."""
    times = []
    for _ in range(moves):
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                started = time.perf_counter()
                for controller in CONTROLLERS:
                    with open(f"{ROOT}/{controller}/{NAME}/{file}", "w") as handle:
                        handle.write("0")
                os.write(writer, repr(time.perf_counter() - started).encode())
            except BaseException:  # noqa: BLE001 - the parent reports a missing figure
                code = 1
            os._exit(code)
        os.close(writer)
        reported = os.read(reader, 100)
        os.close(reader)
        os.waitpid(pid, 0)
        if not reported:
            sys.exit(f"a child could not move itself through {file}")
        times.append(float(reported))
        time.sleep(gap)
    return sorted(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=100)
    parser.add_argument("--gap-ms", type=float, default=30.0)
    args = parser.parse_args()
    if not all(os.path.exists(f"{ROOT}/{c}/tasks") for c in CONTROLLERS):
        sys.exit("needs the cgroup v1 memory and pids hierarchies")
    for controller in CONTROLLERS:
        os.makedirs(f"{ROOT}/{controller}/{NAME}", exist_ok=True)
    try:
        for file in ("cgroup.procs", "tasks"):
            times = move_times(file, args.moves, args.gap_ms / 1000)
            n = len(times)
            print(
                f"{file:>12}: {n} moves, {args.gap_ms:g} ms apart: p50 {times[n // 2] * 1e3:.2f} ms,"
                f" p90 {times[n * 9 // 10] * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms,"
                f" {sum(t > 0.005 for t in times)} over 5 ms"
            )
    finally:
        for controller in CONTROLLERS:
            try:
                os.rmdir(f"{ROOT}/{controller}/{NAME}")
            except OSError:
                pass


if __name__ == "__main__":
    main()
