"""mycelya-torch's in-process "mock" backend, measured like torchremote: prints one JSON object.

It has no socket at all (the "remote" machine is a thread of this process), so its figures bound
what its dispatch costs, not a network. It runs in its own virtual environment (.venv-mycelya,
made by `make bench` where `pip install mycelya-torch` builds: it compiles against torch).
"""
from __future__ import annotations

import importlib.metadata
import json

import torch

from benchmarks.timing import per_call

MiB = 1 << 20


def main() -> None:
    import mycelya_torch
    machine = mycelya_torch.RemoteMachine("mock")
    device = machine.device("cpu")
    x = torch.ones(10).to(device)
    big = torch.randint(0, 255, (64 * MiB,), dtype=torch.uint8)
    print(json.dumps({
        "version": importlib.metadata.version("mycelya-torch"),
        "sync_small_op_us": per_call(lambda: (x + 1).sum().item(), 200) * 1e6,
        "send_get_64mib_mib_s": 2 * 64 / per_call(lambda: big.to(device).cpu(), 1, 3),
    }))


if __name__ == "__main__":
    main()
