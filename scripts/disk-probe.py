#!/usr/bin/env python3
"""How long this machine's disk takes to make 8 KiB durable, with the CPUs idle and with one
of them busy (a spinning process at nice 19), for a few seconds each.

It prints the latency percentiles and every write slower than 3 ms with the fraction of the
second it started at, which shows a stall that comes back at a fixed period. On the
development machines of this project, a busy CPU makes every disk request started at a fixed
phase of each 100 ms wait 15-20 ms (fdatasync, O_DSYNC and plain O_DIRECT writes alike), while
an idle machine shows none: the floor under any durable acknowledgement there.

Usage: scripts/disk-probe.py [folder] (default: the system's temporary folder).
"""
import os
import subprocess
import sys
import tempfile
import time


def probe(folder, seconds=4.0):
    fd, path = tempfile.mkstemp(dir=folder, prefix="disk-probe-")
    block = b"x" * 8192
    times, slow = [], []
    end = time.time() + seconds
    try:
        while time.time() < end:
            t = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            d = time.perf_counter() - t
            times.append(d)
            if d > 0.003:
                slow.append((time.time() % 1, d * 1000))
    finally:
        os.close(fd)
        os.unlink(path)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(len(times) * q))] * 1000
    return len(times), pick(0.5), pick(0.99), times[-1] * 1000, slow


def report(label, result):
    n, p50, p99, worst, slow = result
    print(f"{label}: {n} syncs, p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {worst:.1f} ms, "
          f"{len(slow)} over 3 ms")
    if slow:
        print("  slow ones (phase in the second, ms):",
              ", ".join(f"{phase:.3f}:{ms:.1f}" for phase, ms in slow[:12]))


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
    report("CPUs idle", probe(folder))
    spinner = subprocess.Popen(["nice", "-n", "19", "sh", "-c", "while :; do :; done"])
    try:
        report("one CPU busy (nice 19)", probe(folder))
    finally:
        spinner.kill()
        spinner.wait()


if __name__ == "__main__":
    main()
