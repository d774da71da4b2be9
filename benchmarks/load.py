"""Many clients on one worker at once: every result correct and isolated, with the latency of a
synchronous op and the worker's memory under that load. `python -m benchmarks.load [CLIENTS]`."""
from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch

import torchremote as tr

OPS_EACH = 20


def run(url: str, worker_pid: int, clients: int = 100, timeout_s: float = 120.0) -> dict:
    """`clients` threads, each its own connection: sends a tensor, runs OPS_EACH synchronous ops on
    it, and checks every value and that it sees only its own objects. Bounded by `timeout_s`."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    worker = psutil.Process(worker_pid)
    base = worker.memory_info().rss
    peak = [base]
    start = threading.Barrier(clients)

    def client(i: int) -> None:
        try:
            with tr.connect(url, name=f"load{i}", timeout=timeout_s) as w:
                x = torch.full((256,), float(i)).send(w)
                start.wait(timeout=timeout_s)
                mine = []
                for k in range(OPS_EACH):
                    t0 = time.perf_counter()
                    value = (x + k).sum().item()
                    mine.append(time.perf_counter() - t0)
                    if value != 256.0 * (i + k):
                        raise AssertionError(f"client {i} op {k}: {value}")
                if {row.owner for row in w.objects()} != {w.client_id}:
                    raise AssertionError(f"client {i} sees objects that are not its own")
            with lock:
                latencies.extend(mine)
        except Exception as e:  # collected: an exception in a thread would pass unnoticed
            with lock:
                failures.append(f"{i}: {e!r}")

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], worker.memory_info().rss)
            time.sleep(0.01)

    done = threading.Event()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, timeout_s - (time.perf_counter() - t0)))
    done.set()
    wall = time.perf_counter() - t0
    hung = sum(t.is_alive() for t in threads)
    latencies.sort()
    return {
        "clients": clients, "ops": len(latencies), "failures": failures, "hung": hung, "wall_s": wall,
        "p50_us": statistics.median(latencies) * 1e6 if latencies else float("nan"),
        "p99_us": latencies[int(0.99 * (len(latencies) - 1))] * 1e6 if latencies else float("nan"),
        "worker_peak_extra_bytes": peak[0] - base,
    }


def main() -> None:
    clients = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    proc = subprocess.Popen([sys.executable, "-m", "torchremote", "worker", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        r = run(proc.stdout.readline().strip(), proc.pid, clients)
    finally:
        proc.kill()
    print(f"{r['clients']} clients x {OPS_EACH} sync ops: {len(r['failures'])} failures, {r['hung']} hung, "
          f"p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs, worker peak extra RSS "
          f"{r['worker_peak_extra_bytes'] / 2**20:.0f} MiB, {r['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
