"""Mixed precision: `torch.autocast(x.device.type, ...)` applies on the worker with its own device's
rules, the client's metadata predicts the same dtypes, and `torch.amp.GradScaler` drives the step,
all equal to local autocast on the same device (the workers here compute on the CPU)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from torchremote.client import inference
from conftest import bits, connected_worker, tiny_gpt2
from test_module import TinyTransformer


def _batch():
    torch.manual_seed(1)
    return torch.randint(0, 20, (6, 8)), torch.randint(0, 20, (6,))


def _bf16_steps(model, tokens, targets, device_type, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, dtypes = [], []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(device_type, dtype=torch.bfloat16):
            logits = model(tokens)
            loss = F.cross_entropy(logits, targets)
        dtypes.append((logits.dtype, loss.dtype))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, dtypes


def test_bf16_autocast_training_equals_local(bob):
    torch.manual_seed(0)
    model = TinyTransformer()
    local = copy.deepcopy(model)
    tokens, targets = _batch()
    expected, expected_dtypes = _bf16_steps(local, tokens, targets, "cpu")
    model.to(bob.device)
    losses, dtypes = _bf16_steps(model, tokens.to(bob.device), targets.to(bob.device), bob.device.type)
    assert expected_dtypes[0] == (torch.bfloat16, torch.float32)  # what local autocast gives
    assert dtypes == expected_dtypes and losses == expected
    for p, q in zip(model.parameters(), local.parameters()):
        assert p.dtype == torch.float32 and torch.equal(bits(p.get()), bits(q))


def test_outputs_match_local_dtype_for_dtype(bob):
    torch.manual_seed(0)
    a, b = torch.randn(4, 5), torch.randn(5, 3)
    ra, rb = a.to(bob.device), b.to(bob.device)
    calls = {
        "matmul": lambda x, y: x @ y,                      # lower precision
        "softmax": lambda x, y: torch.softmax(x @ y, -1),  # float32 on the CPU
        "add": lambda x, y: (x @ y) + y[:4, :3],           # widest input type
        "view": lambda x, y: (x @ y).view(12),
        "layer_norm": lambda x, y: F.layer_norm(x @ y, (3,)),
        "cat": lambda x, y: torch.cat([x @ y, y[:4, :3]]),
    }
    for dtype in (torch.bfloat16, torch.float16):
        for name, fn in calls.items():
            with torch.autocast("cpu", dtype=dtype):
                want = fn(a, b)
            with torch.autocast(bob.device.type, dtype=dtype):
                got = fn(ra, rb)
            assert got.dtype == want.dtype, (name, dtype)
            assert torch.equal(bits(got.get()), bits(want)), (name, dtype)


def test_plans_are_kept_per_autocast_state(bob):
    x = torch.randn(3, 3).to(bob.device)
    (x @ x)  # planned outside autocast first: the cached plan must not leak into autocast
    with torch.autocast(bob.device.type, dtype=torch.bfloat16):
        inside = x @ x
        with torch.autocast(bob.device.type, enabled=False):
            off = x @ x
    after = x @ x
    assert (inside.dtype, off.dtype, after.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert inside.get().dtype == torch.bfloat16 and off.get().dtype == torch.float32


def test_grad_scaler_fp16_steps_equal_local_including_skipped_ones(bob):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    local = copy.deepcopy(model)
    x, y = torch.randn(16, 8), torch.randn(16, 4)

    def run(model, x, y, device_type):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler(device_type, init_scale=2.0 ** 24, growth_interval=2)
        scales = []
        for _ in range(5):
            opt.zero_grad()
            with torch.autocast(device_type, dtype=torch.float16):
                loss = F.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        return scales

    expected = run(local, x, y, "cpu")
    model.to(bob.device)
    scales = run(model, x.to(bob.device), y.to(bob.device), bob.device.type)
    assert expected[0] < 2.0 ** 24  # the first steps overflowed and were skipped
    assert scales == expected
    for p, q in zip(model.parameters(), local.parameters()):
        assert torch.equal(bits(p.get()), bits(q))


def test_gpt2_bf16_autocast_equals_local_on_a_worker_process():
    model = tiny_gpt2()
    local = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 12))

    def steps(model, ids, device_type):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            with torch.autocast(device_type, dtype=torch.bfloat16):
                out = model(ids, labels=ids)
            out.loss.backward()
            opt.step()
            losses.append((out.logits.dtype, out.loss.item()))
        return losses

    expected = steps(local, ids, "cpu")
    with connected_worker() as w:
        model.to(w.device)
        assert steps(model, ids.to(w.device), w.device.type) == expected
    assert expected[0][0] == torch.bfloat16


def test_a_cuda_workers_dtypes_are_predicted_without_cuda_here():
    """A laptop planning for a GPU worker: fake CUDA tensors with CUDA's autocast rules; a call
    whose binding needs the real device (indexing) keeps its plan, since views keep their dtype."""
    a = torch.empty(4, 5, device="meta")
    b = torch.empty(5, 3, device="meta")
    fp16 = ("cuda", torch.float16)
    mm = inference.plan(torch.matmul, "matmul", None, [a, b], None, None, fp16)
    assert mm.outs[0].payload.dtype == torch.float16
    soft = inference.plan(torch.softmax, "softmax", None, [a, -1], None, None, fp16)
    assert soft.outs[0].payload.dtype == torch.float32
    view = inference.plan(torch.Tensor.__getitem__, "Tensor.__getitem__", None, [a, 1], None, None, fp16)
    assert view.outs[0].payload.dtype == torch.float32 and view.outs[0].view_of == 0
    assert not torch.is_autocast_enabled("cuda")  # the client's own state is left as it was
