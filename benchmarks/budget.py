"""What the memory budget's accounting costs: the same pipelined chain and synchronous op on two
worker processes, one with the budget and per-client limits on (the defaults), one with both off
(`--max-memory 0 --max-client-bytes 0`), in alternating rounds of one run."""
from __future__ import annotations

import statistics
import subprocess
import sys

import torch

import torchremote as tr

from .timing import per_call

SETTINGS = {"budget on (defaults)": [], "budget off": ["--max-memory", "0", "--max-client-bytes", "0"]}


def _chain_us(x: tr.RemoteTensor, chain: int = 2000) -> float:
    def run():
        y = x
        for _ in range(chain):
            y = y + 1
        return y.sum().item()
    return per_call(run, 1, 5) / chain * 1e6


def run(rounds: int = 3) -> dict:
    out: dict = {"chain_us_per_op": {}, "sync_us": {}}
    procs = [subprocess.Popen([sys.executable, "-m", "torchremote", "worker", "--port", "0", *flags],
                              stdout=subprocess.PIPE, text=True) for flags in SETTINGS.values()]
    try:
        workers = [tr.connect(p.stdout.readline().strip()) for p in procs]
        try:
            xs = [torch.ones(10).send(w) for w in workers]
            for _ in range(rounds):  # alternate, so drift on a noisy machine hits both alike
                for name, x in zip(SETTINGS, xs):
                    out["chain_us_per_op"].setdefault(name, []).append(_chain_us(x))
                    out["sync_us"].setdefault(name, []).append(per_call(lambda: (x + 1).sum().item(), 300) * 1e6)
        finally:
            for w in workers:
                w.close()
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
            p.stdout.close()
    return {k: {name: statistics.median(v) for name, v in rows.items()} for k, rows in out.items()}


def report(results: dict) -> list[str]:
    r = results.get("budget")
    if not r:
        return []
    on, off = "budget on (defaults)", "budget off"
    chain, sync = r["chain_us_per_op"], r["sync_us"]
    return ["", "### 4e. Memory budget: the same work with the accounting on and off (medians of alternating rounds)", "",
            "| figure | budget on | budget off | difference |", "| --- | ---: | ---: | ---: |",
            f"| pipelined chain, µs/op | {chain[on]:.1f} | {chain[off]:.1f} | {chain[on] - chain[off]:+.1f} µs |",
            f"| (x + 1).sum().item(), µs | {sync[on]:.0f} | {sync[off]:.0f} | {sync[on] - sync[off]:+.0f} µs |"]


if __name__ == "__main__":
    print("\n".join(report({"budget": run()})))
