"""What activation checkpointing saves: the peak memory of training steps of a deep MLP (4 blocks of
4 layers, 1024 wide, batch 4096), with and without `torch.utils.checkpoint` (`use_reentrant=False`
and `True`) around each block, locally and on a worker process.

Each configuration runs in a fresh process (and, remote, a fresh worker): the figure is the rise of
the computing process's peak RSS (`VmHWM`) over its RSS after the model was built, so the model
itself is not in it; what is left is activations, gradients and optimizer state. Both processes
take large blocks from mmap (`MALLOC_MMAP_THRESHOLD_`), so that RSS follows live memory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# large blocks straight from mmap, and back to the system when freed: RSS then follows live memory
# (glibc would otherwise keep freed 4 MiB blocks in its heap, and the peak would say little)
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

STEP = r'''
import json, sys, torch, torch.nn as nn
from torch.utils.checkpoint import checkpoint

def rss(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

where, mode = sys.argv[1], sys.argv[2]  # plain, non-reentrant, reentrant
torch.manual_seed(0)
blocks = nn.ModuleList(nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.ReLU())])
                       for _ in range(4))
x = torch.randn(4096, 1024, requires_grad=True)  # reentrant checkpoints need an input that does
pid = None
if where == "remote":
    import torchremote as tr
    proc = subprocess_worker = __import__("subprocess").Popen(
        [sys.executable, "-m", "torchremote", "worker", "--port", "0"], stdout=__import__("subprocess").PIPE,
        text=True)
    w = tr.connect(proc.stdout.readline().strip())
    blocks, x, pid = tr.send(blocks, w), x.send(w), proc.pid
    w.sync()
else:
    pid = __import__("os").getpid()
optimizer = torch.optim.SGD(blocks.parameters(), lr=0.01)
before = rss(pid, "VmRSS:")
for _ in range(2):
    optimizer.zero_grad()
    h = x
    for block in blocks:
        h = block(h) if mode == "plain" else checkpoint(block, h, use_reentrant=mode == "reentrant")
    loss = h.pow(2).mean()
    loss.backward()
    optimizer.step()
    loss.item()
print(json.dumps({"peak_rise": rss(pid, "VmHWM:") - before}))
if where == "remote":
    w.close()
    proc.kill()
'''


MODES = ("plain", "non-reentrant", "reentrant")


def run() -> dict:
    out = {}
    for where in ("local", "remote"):
        for mode in MODES:
            done = subprocess.run([sys.executable, "-c", STEP, where, mode],
                                  capture_output=True, text=True, timeout=600, env=ENV)
            if done.returncode != 0:
                raise RuntimeError(f"checkpointing bench ({where}, {mode}) failed: {done.stderr[-2000:]}")
            out[f"{where}, {mode}"] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rise"]
    return out


def report(results: dict) -> list[str]:
    r = results.get("checkpointing")
    if not r:
        return []
    mib = 1 << 20
    rows = ["", "### 4f. Activation checkpointing: peak memory of a training step (deep MLP, 4 blocks x 4 "
            "layers of 1024, batch 4096; rise of the computing process's peak RSS)", "",
            "| where | plain, MiB | use_reentrant=False, MiB | use_reentrant=True, MiB |",
            "| --- | ---: | ---: | ---: |"]
    for where in ("local", "remote"):
        if f"{where}, non-reentrant" not in r:
            continue  # results of an older run
        rows.append(f"| {'local torch' if where == 'local' else 'on the worker'} | "
                    + " | ".join(f"{r[f'{where}, {mode}'] / mib:.0f}" for mode in MODES) + " |")
    return rows


if __name__ == "__main__":
    print("\n".join(report({"checkpointing": run()})))
