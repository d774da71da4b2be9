"""The same small workloads on several workers, in alternating rounds of one run, so that drift on
a noisy machine hits every side alike: a pipelined chain (µs per op) and a synchronous op (µs)."""
from __future__ import annotations

import statistics
import subprocess

import torchremote as tr

from .timing import per_call


def chain_us(x: tr.RemoteTensor, chain: int = 2000) -> float:
    def run():
        y = x
        for _ in range(chain):
            y = y + 1
        return y.sum().item()
    return per_call(run, 1, 5) / chain * 1e6


def chain_and_sync(pointers: dict[str, tr.RemoteTensor], rounds: int = 3) -> dict:
    """{"chain_us_per_op": {side: median}, "sync_us": {side: median}} for each side's pointer."""
    out: dict = {"chain_us_per_op": {}, "sync_us": {}}
    for _ in range(rounds):
        for name, x in pointers.items():
            out["chain_us_per_op"].setdefault(name, []).append(chain_us(x))
            out["sync_us"].setdefault(name, []).append(per_call(lambda: (x + 1).sum().item(), 300) * 1e6)
    return {k: {name: statistics.median(v) for name, v in rows.items()} for k, rows in out.items()}


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait(timeout=10)
        p.stdout.close()
