#!/usr/bin/env python3
"""Where processes wait on the kernel: samples every process in uninterruptible sleep (state D),
pass after pass over /proc (`--interval-ms` between passes) for `--seconds`, and counts each
one's command and the top of its kernel stack (`/proc/PID/stack`, readable by root). Run it
while a benchmark runs, for example:

    python3 bench/executors.py --executors zygote --idle 0 --closed-loop 0 --tasks 3000 --repeat 1 &
    sleep 4; python3 bench/stalls.py --seconds 4

Not a test: prints the most frequent stacks.
"""

import argparse
import collections
import os
import time


def sample(counts):
    """One pass over /proc: counts each process in state D by command and stack."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as handle:
                stat = handle.read()
            command, rest = stat.split("(", 1)[1].rsplit(")", 1)
            if rest.split()[0] != "D":
                continue
            with open(f"/proc/{pid}/stack") as handle:
                frames = [line.split()[1].split("+")[0] for line in handle if line.strip()]
        except (OSError, IndexError):
            continue  # the process ended, or its stack is not readable
        counts[f"{command} | {' < '.join(frames[:7])}"] += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--interval-ms", type=float, default=0.5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    counts = collections.Counter()
    passes = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        sample(counts)
        passes += 1
        time.sleep(args.interval_ms / 1000)
    print(f"{passes} passes, {sum(counts.values())} processes seen in state D")
    for key, count in counts.most_common(args.top):
        print(count, key)


if __name__ == "__main__":
    main()
