"""Federated averaging over three hospitals whose data never leaves them.

Each hospital is a worker process that publishes its own shard as private data (tags "#train").
Every round, the coordinator sends a copy of the global model to each hospital, trains the copies
there in parallel, fetches only the trained weights and averages them. The weights derive from
the hospital's data, so each fetch is a release request; each hospital approves, by a rule of its
own, only model weights trained for at least MIN_LOCAL_STEPS steps, and nothing else.

    python examples/federated_averaging.py [--rounds 5] [--local-steps 10]
    python examples/federated_averaging.py --hospital 2 --port 3002   # one hospital on its own
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchremote as tr
from torchremote.client.federated import average_state_dicts

FEATURES, CLASSES = 20, 3
MIN_LOCAL_STEPS = 5


def shard(hospital: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Hospital `hospital`'s patients: the same underlying rule, a different population."""
    g = torch.Generator().manual_seed(100 + hospital)
    rule = torch.Generator().manual_seed(0)
    w = torch.randn(FEATURES, CLASSES, generator=rule)
    x = torch.randn(n, FEATURES, generator=g) + 0.5 * hospital
    return x, (x @ w).argmax(1)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def federated_averaging(global_model: nn.Module, shards: list, rounds: int, local_steps: int,
                        lr: float = 0.1, report=None) -> nn.Module:
    """The algorithm, the same for local tensors and for pointers to data on workers."""
    for round_ in range(1, rounds + 1):
        clients = []
        for x, y in shards:
            model = copy.deepcopy(global_model)
            if isinstance(x, tr.RemoteTensor):
                tr.send(model, x.worker)          # the model goes to the data
            clients.append((model, torch.optim.SGD(model.parameters(), lr=lr), x, y))
        for _ in range(local_steps):              # one step on every hospital in turn: they overlap
            for model, opt, x, y in clients:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        trained = [tr.get(model).state_dict() for model, _, _, _ in clients]  # only weights come back
        global_model.load_state_dict(average_state_dicts(trained, [len(y) for _, y in shards]))
        if report:
            report(round_, global_model)
    return global_model


def serve_hospital(hospital: int, port: int) -> None:
    server = tr.start_worker(id=f"hospital-{hospital}", port=port)
    x, y = shard(hospital)
    server.publish(x, tags=["#train", "#x"], description=f"hospital {hospital} features", private=True)
    server.publish(y, tags=["#train", "#y"], description=f"hospital {hospital} labels", private=True)
    shapes = {tuple(p.shape) for p in make_model().parameters()}

    def trained_weights_only(request) -> bool:
        """This hospital's rule: a tensor shaped like a model parameter, trained for long enough."""
        return request.shape in shapes and request.steps >= MIN_LOCAL_STEPS

    server.auto_approve(trained_weights_only)
    print(server.url, flush=True)
    server.serve_forever()


def start_hospitals(n: int) -> tuple[list[subprocess.Popen], list[str]]:
    procs = [subprocess.Popen([sys.executable, __file__, "--hospital", str(i), "--port", "0"],
                              stdout=subprocess.PIPE, text=True) for i in range(n)]
    return procs, [p.stdout.readline().strip() for p in procs]


@contextlib.contextmanager
def hospitals(n: int):
    """`n` hospital processes and a connection to each: yields (workers, their (x, y) training
    shards as pointers); everything is closed and stopped after."""
    procs, urls = start_hospitals(n)
    workers = []
    try:
        workers = [tr.connect(url) for url in urls]
        yield workers, [(w.search("#train", "#x")[0], w.search("#train", "#y")[0]) for w in workers]
    finally:
        for w in workers:
            w.close()
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
            p.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--hospital", type=int, help="serve this hospital's shard instead")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.hospital is not None:
        return serve_hospital(args.hospital, args.port)

    start = time.perf_counter()
    with hospitals(3) as (_, shards):
        test_x, test_y = zip(*(shard(i, 128) for i in range(3)))
        test_x, test_y = torch.cat(test_x), torch.cat(test_y)

        def report(round_: int, model: nn.Module) -> None:
            with torch.no_grad():
                accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
            print(f"round {round_}: test accuracy {accuracy:.1%}  ({time.perf_counter() - start:.1f} s)",
                  flush=True)

        torch.manual_seed(0)
        federated_averaging(make_model(), shards, args.rounds, args.local_steps, report=report)


if __name__ == "__main__":
    main()
