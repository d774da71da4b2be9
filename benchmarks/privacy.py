"""What provenance tracking costs: the same pipelined chain and synchronous op on published data,
once published open and once private (on two worker processes started alike from one file).

On private data every op records what its result derives from; on open data nothing is recorded.
The synchronous op on private data is approved by the owner's rule each time (a release request,
filed and approved on the worker), so it shows that cost too.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import torchremote as tr

from .side_by_side import chain_and_sync, stop

RULE_WORKER = r'''
import sys, torch, torchremote as tr
server = tr.start_worker(id=sys.argv[2], port=0)
server.publish_file(sys.argv[1], private=sys.argv[2] == "private")
server.auto_approve(lambda request: request.numel == 1)  # scalars may leave
print(server.url, flush=True)
server.serve_forever()
'''


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.safetensors"
        save_file({"data": torch.ones(10)}, str(path))
        procs = [subprocess.Popen([sys.executable, "-c", RULE_WORKER, str(path), kind], stdout=subprocess.PIPE,
                                  text=True) for kind in ("open", "private")]
        try:
            urls = [p.stdout.readline().strip() for p in procs]
            with tr.connect(urls[0]) as open_w, tr.connect(urls[1]) as private_w:
                (a,), (b,) = open_w.search("data"), private_w.search("data")
                return chain_and_sync({"open": a, "private": b})
        finally:
            stop(procs)


def report(results: dict) -> list[str]:
    r = results.get("privacy")
    if not r:
        return []
    chain, sync = r["chain_us_per_op"], r["sync_us"]
    return ["", "### 4d. Provenance: the same work on open and on private published data (medians of 3)", "",
            "| figure | open data | private data | ratio |", "| --- | ---: | ---: | ---: |",
            f"| pipelined chain, µs/op | {chain['open']:.1f} | {chain['private']:.1f} | "
            f"{chain['private'] / chain['open']:.2f}x |",
            f"| (x + 1).sum().item(), µs (private: a release request approved by a rule each time) | "
            f"{sync['open']:.0f} | {sync['private']:.0f} | {sync['private'] / sync['open']:.2f}x |"]
