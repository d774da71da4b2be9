"""Fixtures: real workers on 127.0.0.1, in a thread (fast) or a separate process (isolation)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests run 60 examples each; HYPOTHESIS_PROFILE=thorough runs 500. Failures print the
# falsifying example and a seed (rerun with --hypothesis-seed=N).
settings.register_profile("default", max_examples=60, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

import torchremote as tr

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def server():
    """One in-process worker shared by the tests that only need a place to compute."""
    s = tr.start_worker(id="bob", host="127.0.0.1", port=0)
    yield s
    s.stop()


@pytest.fixture
def bob(server):
    w = tr.connect(server.url, name="test")
    yield w
    w.close()


@pytest.fixture
def fresh_server():
    """A worker of the test's own, for tests that inspect or break the worker."""
    s = tr.start_worker(id="fresh", host="127.0.0.1", port=0)
    yield s
    s.stop()


class WorkerProcess:
    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torchremote", "worker", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)})
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith(("ws://", "wss://")):
            self.proc.kill()
            raise RuntimeError(f"worker did not start: {self.url!r} {self.proc.stderr.read()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@contextmanager
def connected_worker(*args: str, token: str | None = None):
    """A `torchremote worker` process and a client connected to it, both cleaned up after."""
    process = WorkerProcess(*args)
    client = tr.connect(process.url, token=token)
    try:
        yield client
    finally:
        client.close()
        process.stop()


@pytest.fixture
def worker_process():
    """Start `torchremote worker` processes (through the CLI); all are killed at the end."""
    started: list[WorkerProcess] = []

    def start(*args: str, env: dict | None = None) -> WorkerProcess:
        started.append(WorkerProcess(*args, env=env))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor's elements, for bit-exact comparison (NaNs included)."""
    t = t.detach().resolve_conj().resolve_neg()
    dense = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))
    return dense.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def tiny_gpt2():
    """Hugging Face's GPT2LMHeadModel, 2 layers of width 32, dropout off (transformers is a test extra)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def assert_data_parallel_equals_one_model(model, workers, make_optimizer, steps=10, features=8, group=None):
    """Train replicas of `model` on `workers`, each on its part of every batch, gradients averaged
    between them; and a copy of `model` here on the whole batches: the weights must agree."""
    import copy

    import torch.nn.functional as F

    import torchremote as tr

    n = len(workers)
    whole = copy.deepcopy(model)
    replicas = tr.replicate(model, workers, group=group)
    optimizers = [make_optimizer(r.parameters()) for r in replicas]
    optimizer = make_optimizer(whole.parameters())
    for _ in range(steps):
        x, y = torch.randn(8 * n, features), torch.randn(8 * n, 1)
        for replica, opt, xs, ys, w in zip(replicas, optimizers, x.chunk(n), y.chunk(n), workers):
            opt.zero_grad()
            F.mse_loss(replica(xs.send(w)), ys.send(w)).backward()
        tr.average_gradients(replicas, group=group)
        for opt in optimizers:
            opt.step()
        optimizer.zero_grad()
        F.mse_loss(whole(x), y).backward()
        optimizer.step()
    for replica in replicas:
        for got, want in zip(replica.parameters(), whole.parameters()):
            torch.testing.assert_close(got.get(), want, atol=1e-5, rtol=1e-4)
