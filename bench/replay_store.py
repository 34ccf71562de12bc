"""What one jti check costs in each replay store, against the per-process memory store measured in the same run.

Each store records fresh keys (as every hook call does) from ``--processes`` processes of ``--threads`` threads
at once, sharing one store as gunicorn workers do; medians and p99 of one ``first_use`` call are printed.

    .venv/bin/python -m bench.replay_store [--calls 5000] [--processes 2] [--threads 8] [--redis-url URL]

checks/s counts from the moment every process has its store open and is released by the barrier until the
last check returns (process start-up and imports are not timed).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path


def make_store(kind: str, folder: str, redis_url: str):
    from app.cds.replay import HostReplayCache, MemoryReplayCache, RedisReplayCache
    from app.host_state import HostState

    if kind == "memory":
        return MemoryReplayCache()
    if kind == "host":
        return HostReplayCache(HostState(Path(folder) / "host-state.db"))
    return RedisReplayCache(redis_url)


def worker(kind: str, folder: str, redis_url: str, calls: int, threads: int, start, results) -> None:
    store = make_store(kind, folder, redis_url)
    store.first_use(f"warm-{uuid.uuid4()}", 60)
    timings: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        mine = []
        for _ in range(calls // threads):
            key = str(uuid.uuid4())
            began = time.perf_counter()
            store.first_use(key, 60)
            mine.append(time.perf_counter() - began)
        with lock:
            timings.extend(mine)

    start.wait()
    began = time.time()  # wall clock: comparable across processes
    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    results.put((began, time.time(), timings))


def measure(kind: str, redis_url: str, calls: int, processes: int, threads: int) -> tuple[float, float, float]:
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as folder:
        make_store(kind, folder, redis_url)  # create the file before the race
        start, results = spawn.Barrier(processes), spawn.Queue()
        args = (kind, folder, redis_url, calls, threads, start, results)
        children = [spawn.Process(target=worker, args=args) for _ in range(processes)]
        for child in children:
            child.start()
        runs = [results.get(timeout=300) for _ in children]
        for child in children:
            child.join(60)
    timings = sorted(t for _, _, mine in runs for t in mine)
    elapsed = max(end for _, end, _ in runs) - min(began for began, _, _ in runs)
    return statistics.median(timings) * 1e6, timings[int(len(timings) * 0.99)] * 1e6, len(timings) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="first_use calls per process")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--stores", default="memory,host,redis")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="a database the bench may fill")
    args = parser.parse_args()
    kinds = args.stores.split(",")
    rows = {kind: measure(kind, args.redis_url, args.calls, args.processes, args.threads) for kind in kinds}
    print(f"jti checks: {args.processes} processes x {args.threads} threads, {args.calls} calls each process")
    print(f"{'store':10}{'p50 us':>10}{'p99 us':>10}{'checks/s':>12}{'p50 vs memory':>16}")
    for kind, (p50, p99, rate) in rows.items():
        ratio = f"{p50 / rows['memory'][0]:.1f}x" if "memory" in rows else "-"
        print(f"{kind:10}{p50:>10.1f}{p99:>10.1f}{rate:>12.0f}{ratio:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
