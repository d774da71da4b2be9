"""`torch.compile` of a model on a worker runs it correctly, eagerly op by op (dynamo never traces
torchremote's own code, so it never fails inside it). Inductor cannot compile a graph on the remote
device (its data is on the worker): the parts that make tensors there run eagerly too."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import bits
from test_module import TinyTransformer


def _train(model, tokens, targets, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(tokens), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_compiled_model_trains_like_local_eager(bob):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 16), torch.nn.Flatten(), torch.nn.Linear(128, 32),
                                torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 20))
    local = copy.deepcopy(model)
    tokens, targets = torch.randint(0, 20, (4, 8)), torch.randint(0, 20, (4,))
    expected = _train(local, tokens, targets)
    model.to(bob.device)
    compiled = torch.compile(model)  # inductor: every op on a pointer runs eagerly
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no graph-break or recompilation warnings
        losses = _train(compiled, tokens.to(bob.device), targets.to(bob.device))
        for _ in range(10):  # new input objects each call: no recompilation storm
            compiled(torch.randint(0, 20, (4, 8)).to(bob.device))
    assert losses == expected
    for p, q in zip(model.parameters(), local.parameters()):
        assert torch.equal(bits(p.get()), bits(q))


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_factories_on_the_remote_device_inside_a_compiled_forward(bob, backend):
    """`torch.arange(T, device=x.device)` and a mask made on the device are captured into a graph on
    the remote device. aot_eager runs it on the worker with torch's own kernels; inductor cannot
    compile for the device, and torch's fallback exception turns that graph into eager ops: no
    internal error, and no warning from torchremote's own code being traced."""
    torch.manual_seed(0)
    model = TinyTransformer()
    local = copy.deepcopy(model)
    tokens, targets = torch.randint(0, 20, (4, 8)), torch.randint(0, 20, (4,))
    expected = _train(local, tokens, targets)
    model.to(bob.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Dynamo")
        losses = _train(torch.compile(model, backend=backend), tokens.to(bob.device), targets.to(bob.device))
    assert losses == expected
    for p, q in zip(model.parameters(), local.parameters()):
        assert torch.equal(bits(p.get()), bits(q))


def test_a_compiled_function_of_pointers_equals_local(bob):
    @torch.compile
    def f(a, b):
        return (a * b).sin().cumsum(0) + 1

    torch.manual_seed(0)
    for shape in [(4, 3), (5, 2), (4, 3)]:  # new shapes and new objects every call
        a, b = torch.randn(shape), torch.randn(shape)
        got = f(a.to(bob.device), b.to(bob.device))
        assert got.device == bob.device and torch.equal(got.get(), f(a, b))

