"""Data-parallel training of a small GPT on a fleet of workers placed by Ray, driven from this script.

Ray starts one torchremote worker per actor; the fleet connects to each and forms a gloo group
among them. `tr.replicate` puts one copy of the model on each worker (sent once, then broadcast
worker to worker), each worker trains on its own part of every batch, and `tr.average_gradients`
all-reduces the gradients between the workers, as DDP does. At the end the replicas are compared
with one local model trained on the whole batches.

    python examples/fleet_data_parallel.py [--workers 4] [--steps 20]

On a real cluster only `ray.init(address="auto")` changes (and drop `host=`, so that each worker
listens on its node's address).
"""
from __future__ import annotations

import argparse
import copy
import time

import ray
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchremote as tr


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 512, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Embedding(64, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, and still tied on every replica

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="sequences per worker per step")
    args = parser.parse_args()
    n = args.workers

    ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
    torch.manual_seed(0)
    model = TinyGPT()
    whole = copy.deepcopy(model)  # the same model, trained here on the whole batches
    started = time.perf_counter()
    with tr.ray.start_workers(n, num_cpus=1, host="127.0.0.1") as fleet:
        print(f"fleet of {n} workers up in {time.perf_counter() - started:.1f} s: {[w.id for w in fleet.workers]}")
        replicas = tr.replicate(model, fleet.workers, group=fleet.group)
        optimizers = [torch.optim.AdamW(r.parameters(), lr=3e-3) for r in replicas]
        optimizer = torch.optim.AdamW(whole.parameters(), lr=3e-3)
        for step in range(args.steps):
            batch = torch.randint(0, 512, (args.batch * n, 33))
            losses = []
            for replica, opt, part, worker in zip(replicas, optimizers, batch.chunk(n), fleet.workers):
                opt.zero_grad()
                loss = lm_loss(replica, part.send(worker))
                loss.backward()
                losses.append(loss)
            tr.average_gradients(replicas, group=fleet.group)
            for opt in optimizers:
                opt.step()
            optimizer.zero_grad()
            local = lm_loss(whole, batch)
            local.backward()
            optimizer.step()
            if step % 5 == 0 or step == args.steps - 1:
                fleet_loss = sum(loss.item() for loss in losses) / n
                print(f"step {step:3d}  fleet loss {fleet_loss:.4f}  one model on the whole batch {local.item():.4f}")
        drift = max((p.get() - q).abs().max().item() for r in replicas
                    for p, q in zip(r.parameters(), whole.parameters()))
        print(f"largest difference between a replica's weights and the single model's: {drift:.2e}")
    ray.shutdown()


if __name__ == "__main__":
    main()
