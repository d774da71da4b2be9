"""Training steps through pointers against local torch, across model sizes (part of `make bench`).

Every workload runs the same unchanged step function locally and on a worker process, in
interleaved rounds; the table gives medians, the remote/local ratio of those medians, the client's
CPU per step (all its threads), the torch calls the client intercepts per step and the round trips
per step. Also: a chain of small ops whose old pointers are dropped, and what a federated round
costs the coordinator per worker.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchremote as tr
import torchremote.client.tensor as tensor_module


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- models -------------------------------------------------------------------------------------------

def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))


def mlp_4x256() -> nn.Module:
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(256, 256), nn.ReLU())], nn.Linear(256, 10))


def mlp_1024() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


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


class TinyLM(nn.Module):
    """A small GPT: token and position embeddings, causal attention blocks, a head tied to the
    token embedding."""

    def __init__(self, vocab: int = 1000, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Embedding(64, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def hf_gpt2():
    """Hugging Face's GPT2LMHeadModel, 2 layers of width 64, when transformers is installed."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    return lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64))


def under_bf16_autocast(loss_fn: Callable) -> Callable:
    """The same loss, its forward in `torch.autocast(<the data's device type>, torch.bfloat16)`."""
    def loss(model: nn.Module, *data: torch.Tensor) -> torch.Tensor:
        with torch.autocast(data[0].device.type, dtype=torch.bfloat16):
            return loss_fn(model, *data)
    return loss


def workloads() -> list[tuple]:
    """(name, model factory, data factory, loss, optimizer factory)."""
    sgd = lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)      # noqa: E731
    adamw = lambda p: torch.optim.AdamW(p, lr=1e-3)               # noqa: E731
    tokens = lambda: (torch.randint(0, 1000, (4, 33)),)           # noqa: E731
    rows = [
        ("tiny MLP 20-32-3, batch 32, SGD", tiny_mlp, lambda: (torch.randn(32, 20), torch.randint(0, 3, (32,))),
         classify, sgd),
        ("MLP 4 x 256, batch 64, SGD", mlp_4x256, lambda: (torch.randn(64, 256), torch.randint(0, 10, (64,))),
         classify, sgd),
        ("transformer LM 2 x 64, 4 x 32 tokens, AdamW", TinyLM, tokens, lm_loss, adamw),
        ("same, bf16 autocast", TinyLM, tokens, under_bf16_autocast(lm_loss), adamw),
    ]
    gpt2 = hf_gpt2()
    if gpt2 is not None:
        rows.append(("HF GPT2LMHeadModel 2 x 64, 4 x 32 tokens, AdamW", gpt2, tokens,
                     lambda m, idx: m(input_ids=idx[:, :-1], labels=idx[:, :-1]).loss, adamw))
    rows += [
        ("MLP 1024-1024-1024-10, batch 256, SGD", mlp_1024,
         lambda: (torch.randn(256, 1024), torch.randint(0, 10, (256,))), classify, sgd),
        ("CNN 2 conv + linear, batch 64 x 3x32x32, SGD", cnn,
         lambda: (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))), classify, sgd),
    ]
    return rows


# --- counting -----------------------------------------------------------------------------------------

@contextmanager
def counting(worker: tr.Worker):
    """Counts the torch calls the client intercepts and the round trips it makes."""
    counts = {"calls": 0, "round_trips": 0}
    dispatch = tensor_module._dispatch

    def counted_dispatch(*a, **k):
        counts["calls"] += 1
        return dispatch(*a, **k)

    saved = {name: getattr(worker, name) for name in ("_call_sync", "_request", "_run_sync")}

    def round_trip(fn):
        def wrapper(*a, **k):
            counts["round_trips"] += 1
            return fn(*a, **k)
        return wrapper

    tensor_module.use_dispatcher(counted_dispatch)
    for name, fn in saved.items():
        setattr(worker, name, round_trip(fn))
    try:
        yield counts
    finally:
        tensor_module.use_dispatcher(dispatch)
        for name in saved:
            delattr(worker, name)


@contextmanager
def worker_process():
    """A `torchremote worker` process on loopback and a client of it, both gone after."""
    worker = subprocess.Popen([sys.executable, "-m", "torchremote", "worker", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        client = tr.connect(worker.stdout.readline().strip())
        try:
            yield client
        finally:
            client.close()
    finally:
        worker.kill()
        worker.wait()


def make_step(model: nn.Module, opt, loss_fn: Callable, data: tuple) -> Callable[[], float]:
    def step() -> float:
        opt.zero_grad()
        loss = loss_fn(model, *data)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def training_sizes(bob: tr.Worker, steps: int, rounds: int) -> dict:
    out = {}
    for name, make_model, make_data, loss_fn, make_opt in workloads():
        torch.manual_seed(0)
        local_model, data = make_model(), make_data()
        remote_model = tr.send(copy.deepcopy(local_model), bob)
        remote_data = tuple(t.send(bob) for t in data)
        local = make_step(local_model, make_opt(local_model.parameters()), loss_fn, data)
        remote = make_step(remote_model, make_opt(remote_model.parameters()), loss_fn, remote_data)
        first_loss = (local(), remote())
        with counting(bob) as counts:
            remote()
        local_ms, remote_ms, cpu_ms = [], [], []
        for _ in range(rounds):
            for fn, times in ((local, local_ms), (remote, remote_ms)):
                fn()
                c0, t0 = cpu_seconds(), time.perf_counter()
                for _ in range(steps):
                    fn()
                times.append((time.perf_counter() - t0) / steps * 1e3)
                if fn is remote:
                    cpu_ms.append((cpu_seconds() - c0) / steps * 1e3)
        lm, rm, cm = statistics.median(local_ms), statistics.median(remote_ms), statistics.median(cpu_ms)
        out[name] = {"local_ms": lm, "remote_ms": rm, "ratio": rm / lm, "client_cpu_ms": cm,
                     "calls": counts["calls"], "round_trips": counts["round_trips"],
                     "client_cpu_us_per_call": cm * 1e3 / counts["calls"],
                     "first_losses_equal": math.isclose(*first_loss, rel_tol=1e-4)}
        del remote_model, remote_data
    return out


def dropped_chain(bob: tr.Worker, n: int = 3000, rounds: int = 5) -> dict:
    """`y = y + 1` n times, each old pointer dropped at once, then one fetch."""
    def run(y):
        for _ in range(n):
            y = y + 1
        return y.get() if isinstance(y, tr.RemoteTensor) else y

    local, remote, cpu = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run(torch.ones(10))
        local.append((time.perf_counter() - t0) / n * 1e6)
        start = torch.ones(10).send(bob)
        bob.sync()
        c0, t0 = cpu_seconds(), time.perf_counter()
        run(start)
        remote.append((time.perf_counter() - t0) / n * 1e6)
        cpu.append((cpu_seconds() - c0) / n * 1e6)
    lo, re = statistics.median(local), statistics.median(remote)
    return {"local_us": lo, "remote_us": re, "ratio": re / lo, "client_cpu_us": statistics.median(cpu)}


def pointer_bytes(bob: tr.Worker, n: int = 100_000) -> float:
    """Client memory per live RemoteTensor: RSS growth over n pointers, in this fresh process."""
    import gc
    import psutil
    me = psutil.Process()
    x = torch.ones(4).send(bob)
    x + 0
    gc.collect()
    bob.sync()
    before = me.memory_info().rss
    keep = [x + 0 for _ in range(n)]
    bob.sync()
    grown = me.memory_info().rss - before
    del keep
    bob.sync()
    return grown / n


def federated_coordinator(rounds: int = 3, local_steps: int = 10) -> dict:
    """examples/federated_averaging.py with three hospital processes: the coordinator's CPU per
    worker per round."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "examples" / "federated_averaging.py"
    spec = importlib.util.spec_from_file_location("federated_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with example.hospitals(3) as (workers, shards):
        torch.manual_seed(0)
        example.federated_averaging(example.make_model(), shards, 1, local_steps)  # warm-up
        c0, t0 = cpu_seconds(), time.perf_counter()
        example.federated_averaging(example.make_model(), shards, rounds, local_steps)
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    per = rounds * len(workers)
    return {"cpu_ms_per_worker_round": cpu / per * 1e3, "wall_ms_per_round": wall / rounds * 1e3,
            "local_steps": local_steps}


def run(results: dict, quick: bool = False) -> None:
    """The training cases in a process of their own, with one worker process: local torch there
    shares the machine with nothing but that worker (the rest of the bench keeps peers running)."""
    args = [sys.executable, "-m", "benchmarks.training"] + (["--quick"] if quick else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    results.update(json.loads(out.stdout.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    quick = parser.parse_args().quick
    results: dict = {}
    with worker_process() as bob:
        results["training_sizes"] = training_sizes(bob, steps=5 if quick else 20, rounds=3 if quick else 5)
        results["dropped_chain"] = dropped_chain(bob, 1000 if quick else 3000)
        results["pointer_bytes"] = pointer_bytes(bob)
    results["federated"] = federated_coordinator(2 if quick else 3)
    print("\n".join(report(results)), file=sys.stderr)
    print(json.dumps(results))


def report(results: dict) -> list[str]:
    lines = ["", "### 4. Training step across sizes (worker process; data already on the worker; medians of "
             "interleaved rounds)", "",
             "| workload | local ms | remote ms | remote / local | client CPU ms per step | torch calls per step "
             "| client CPU µs per call | round trips per step |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results["training_sizes"].items():
        lines.append(f"| {name} | {r['local_ms']:.2f} | {r['remote_ms']:.2f} | {r['ratio']:.2f} | "
                     f"{r['client_cpu_ms']:.2f} | {r['calls']} | {r['client_cpu_us_per_call']:.1f} | {r['round_trips']} |")
    c, f = results["dropped_chain"], results["federated"]
    lines += ["", "| other | figure |", "| --- | ---: |",
              f"| chain `y = y + 1`, old pointers dropped: local | {c['local_us']:.1f} µs/op |",
              f"| same, remote (one fetch at the end) | {c['remote_us']:.1f} µs/op ({c['ratio']:.1f}x local; "
              f"client CPU {c['client_cpu_us']:.1f} µs/op) |",
              f"| federated averaging, 3 hospitals, {f['local_steps']} local steps: coordinator CPU per worker-round "
              f"| {f['cpu_ms_per_worker_round']:.1f} ms |",
              f"| same: wall time per round | {f['wall_ms_per_round']:.0f} ms |"]
    return lines


def targets(results: dict) -> list[tuple[str, float, float]]:
    sizes = results["training_sizes"]
    by_prefix = lambda p: next(v for k, v in sizes.items() if k.startswith(p))  # noqa: E731
    lm = by_prefix("transformer LM")
    warm_calls = sum(v["calls"] for v in sizes.values())
    warm_cpu = sum(v["client_cpu_ms"] for v in sizes.values()) * 1e3
    return [
        ("tiny MLP step <= 5 x local", by_prefix("tiny MLP")["ratio"], 5),
        ("4 x 256 MLP step <= 2.5 x local", by_prefix("MLP 4 x 256")["ratio"], 2.5),
        ("small transformer LM step <= 2.5 x local", lm["ratio"], 2.5),
        ("MLP 1024 step <= 1.3 x local", by_prefix("MLP 1024")["ratio"], 1.3),
        ("chain with dropped pointers <= 10 x a local op", results["dropped_chain"]["ratio"], 10),
        ("client CPU per torch call in a warm step <= 25 µs (all workloads)", warm_cpu / warm_calls, 25),
        ("coordinator CPU <= 10 ms per worker-round", results["federated"]["cpu_ms_per_worker_round"], 10),
        ("one round trip per training step (most over the workloads)",
         max(v["round_trips"] for v in sizes.values()), 1),
    ]


if __name__ == "__main__":
    main()
