"""What the memory budget's accounting costs: the same pipelined chain and synchronous op on two
worker processes, one with the budget and per-client limits on (the defaults), one with both off
(`--max-memory 0 --max-client-bytes 0`), in alternating rounds of one run."""
from __future__ import annotations

import subprocess
import sys

import torch

import torchremote as tr

from .side_by_side import chain_and_sync, stop

SETTINGS = {"budget on (defaults)": [], "budget off": ["--max-memory", "0", "--max-client-bytes", "0"]}


def run(rounds: int = 3) -> dict:
    procs = [subprocess.Popen([sys.executable, "-m", "torchremote", "worker", "--port", "0", *flags],
                              stdout=subprocess.PIPE, text=True) for flags in SETTINGS.values()]
    try:
        workers = [tr.connect(p.stdout.readline().strip()) for p in procs]
        try:
            return chain_and_sync({name: torch.ones(10).send(w) for name, w in zip(SETTINGS, workers)}, rounds)
        finally:
            for w in workers:
                w.close()
    finally:
        stop(procs)


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
