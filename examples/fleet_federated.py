"""Federated averaging on a Ray fleet: each worker is a hospital whose shard, published from its own
file as private data, never leaves it; the model is averaged worker to worker.

Every round the hospitals train their copy of the model on their own shard, then the weights are
averaged by an all-reduce between the workers. The weights derive from private data, so the
all-reduce is a release: each hospital's rule (`approve=`) lets go only tensors shaped like model
parameters trained for at least MIN_LOCAL_STEPS steps. The final model is fetched from the first
hospital under the same rule; the shards are never fetched (a `get` of one is refused).

    python examples/fleet_federated.py [--hospitals 3] [--rounds 5] [--local-steps 10]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ray
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import torchremote as tr

FEATURES, CLASSES, PER_HOSPITAL = 20, 3, 200
MIN_LOCAL_STEPS = 5


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))


PARAMETER_SHAPES = {tuple(p.shape) for p in make_model().parameters()}


def trained_weights_only(request) -> bool:
    """Each hospital's rule: a tensor shaped like a model parameter, trained for long enough."""
    return request.shape in PARAMETER_SHAPES and request.steps >= MIN_LOCAL_STEPS


def write_shards(directory: Path, n: int) -> str:
    """One private file per hospital: a shard of a shared classification task."""
    torch.manual_seed(0)
    w = torch.randn(FEATURES, CLASSES)
    for i in range(n):
        x = torch.randn(PER_HOSPITAL, FEATURES) + 0.3 * i  # each hospital's patients differ a little
        y = (x @ w).argmax(1)
        save_file({"x": x, "y": y}, str(directory / f"hospital-{i}.safetensors"),
                  metadata={"private": "true", "description": f"hospital {i}"})
    return str(directory / "hospital-{rank}.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    args = parser.parse_args()

    ray.init(num_cpus=args.hospitals, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as data:
        shards = write_shards(Path(data), args.hospitals)
        with tr.ray.start_workers(args.hospitals, num_cpus=1, host="127.0.0.1", publish={"#train": shards},
                                  approve=trained_weights_only) as fleet:
            data = [(w.search("#train", "x")[0], w.search("#train", "y")[0]) for w in fleet.workers]
            try:
                data[0][0].get()
            except (tr.ApprovalRequired, PermissionError):
                print("a hospital's shard cannot be fetched: its owner's rule does not release it")
            replicas = tr.replicate(make_model(), fleet.workers, group=fleet.group)
            optimizers = [torch.optim.SGD(r.parameters(), lr=0.1) for r in replicas]
            for round_ in range(args.rounds):
                for replica, opt, (x, y) in zip(replicas, optimizers, data):
                    for _ in range(args.local_steps):
                        opt.zero_grad()
                        F.cross_entropy(replica(x), y).backward()
                        opt.step()
                for same in zip(*(r.parameters() for r in replicas)):  # FedAvg: equal shards, plain mean
                    tr.all_reduce_(list(same), "avg", group=fleet.group)
                print(f"round {round_}: weights averaged across {args.hospitals} hospitals, worker to worker")
            model = tr.get(replicas[0])  # released by the first hospital's rule: trained weights
    torch.manual_seed(0)
    w = torch.randn(FEATURES, CLASSES)
    x = torch.randn(500, FEATURES) + 0.3
    accuracy = (model(x).argmax(1) == (x @ w).argmax(1)).float().mean().item()
    print(f"global model accuracy on fresh data like the hospitals': {accuracy:.1%}")
    ray.shutdown()


if __name__ == "__main__":
    main()
