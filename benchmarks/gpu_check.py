"""A worker's GPU beside local CUDA eager, in one run: bf16 autocast training of a small transformer
and of GPT-2 (2 layers), the worker's peak memory of a checkpointed and a plain step, and a 1 GiB
move from this process to the worker's GPU.

    make gpu-check                      # or: python -m benchmarks.gpu_check [--device cuda]

Exits 0 with "no CUDA device" where there is none. `--device cpu` runs the same checks on the CPU
(a dry run of the script itself, on machines without a GPU).
"""
from __future__ import annotations

import argparse
import copy
import os
import secrets
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import torchremote as tr


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.n1(h)
        h = h + self.attn(x, x, x, need_weights=False)[0]
        return h + self.mlp(self.n2(h))


class SmallTransformer(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 256, layers: int = 4, checkpointed: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        self.checkpointed = checkpointed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointed else block(h)
        return self.head(h)


def bf16_steps(model: nn.Module, tokens: torch.Tensor, device_type: str, steps: int) -> tuple[list[float], float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, start = [], 0.0
    for i in range(steps + 1):
        if i == 1:  # the first step warms up (plans, kernels)
            start = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(device_type, dtype=torch.bfloat16):
            logits = model(tokens)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, (time.perf_counter() - start) / steps


def gpt2() -> nn.Module | None:
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=512, n_positions=128,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return _Logits(transformers.GPT2LMHeadModel(config))


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens).logits


def peak_memory() -> int:
    """Run on the worker (`bob.run`): its GPU's peak allocation since the last reset."""
    import torch
    return torch.cuda.max_memory_allocated()


def reset_peak_memory() -> None:
    import torch
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    token = secrets.token_hex(16)
    with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
        f.write(token)
    proc = subprocess.Popen([sys.executable, "-m", "torchremote", "worker", "--port", "0", "--device", str(device),
                             "--allow-code", "--token-file", f.name], stdout=subprocess.PIPE, text=True)
    failures = []
    try:
        bob = tr.connect(proc.stdout.readline().strip(), token=token)
        dev = bob.device
        print(f"worker on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})")
        print(f"| check | local {device.type} eager | torchremote | ratio | equal |")
        print("| --- | --- | --- | --- | --- |")
        torch.manual_seed(0)
        tokens = torch.randint(0, 512, (8, 128))
        for name, make in [("small transformer bf16 step", lambda: SmallTransformer()),
                           ("GPT-2 (2 layers) bf16 step", gpt2)]:
            model = make()
            if model is None:
                print(f"| {name} | - | - | - | transformers is not installed |")
                continue
            local = copy.deepcopy(model).to(device)
            want, t_local = bf16_steps(local, tokens.to(device), device.type, args.steps)
            model.to(dev)
            got, t_remote = bf16_steps(model, tokens.to(dev), dev.type, args.steps)
            close = all(abs(a - b) <= 2e-2 * max(1.0, abs(a)) for a, b in zip(want, got))
            if not close:
                failures.append(name)
            print(f"| {name} | {t_local * 1e3:.1f} ms | {t_remote * 1e3:.1f} ms | {t_remote / t_local:.2f}x | "
                  f"{'yes' if close else 'NO'} (last loss {want[-1]:.4f} / {got[-1]:.4f}) |")
        if device.type == "cuda":
            for checkpointed in (False, True):
                bob.run(reset_peak_memory)
                model = SmallTransformer(layers=8, checkpointed=checkpointed).to(dev)
                bf16_steps(model, torch.randint(0, 512, (16, 256)).to(dev), dev.type, 1)
                peak = bob.run(peak_memory)
                print(f"| worker peak memory, {'checkpointed' if checkpointed else 'plain'} step | - | "
                      f"{peak / 2 ** 20:.0f} MiB | - | - |")
                del model
        data = torch.randn(2 ** 28)  # 1 GiB of float32
        t0 = time.perf_counter()
        local = data.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_local = time.perf_counter() - t0
        for how, move in [("x.to(dev)", lambda: data.to(dev)), ("x.send(worker)", lambda: data.send(bob))]:
            data[: 2 ** 21].clone().to(dev).sum().item()  # warm-up: first-use costs out of the figure
            t0 = time.perf_counter()
            remote = move()
            torch.remote.synchronize(dev)
            t_remote = time.perf_counter() - t0
            same = torch.equal(remote[:1000].get(), data[:1000])
            if not same:
                failures.append(f"1 GiB {how}")
            print(f"| 1 GiB to the {device.type}, {how} | {1 / t_local:.2f} GiB/s | {1 / t_remote:.2f} GiB/s | "
                  f"{t_remote / t_local:.2f}x | {'yes' if same else 'NO'} |")
            del remote
        del local
        bob.close()
    finally:
        proc.terminate()
        proc.wait(10)
        os.unlink(f.name)
    if failures:
        sys.exit(f"gpu check failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
