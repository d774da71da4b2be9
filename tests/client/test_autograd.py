"""Autograd bookkeeping on the client (torchremote/client/autograd.py): what torch answers locally -
requires_grad, is_leaf, grad_fn, which tensors hold a .grad - is answered with no round trip and
equals local torch; gradients themselves are the worker's, and equal local torch's."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchremote as tr

from test_pipelining import Spy


def both(fn, worker):
    """fn run on local tensors and on their pointers: (local result, remote result)."""
    return fn(lambda t: t), fn(lambda t: t.send(worker))


def fetched(v):
    return v.get() if isinstance(v, tr.RemoteTensor) else v.detach() if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("op", [F.hardswish, F.hardsigmoid, F.silu, F.gelu, torch.sgn,
                                lambda x: torch.meshgrid([x, x * 2], indexing="ij")[1],
                                lambda x: torch.zero_(x.clone()), lambda x: x.split([1, 2])[1],
                                lambda x: torch.norm(x, 0)],
                         ids=["hardswish", "hardsigmoid", "silu", "gelu", "sgn", "meshgrid", "zero_", "split",
                              "norm0"])
def test_outputs_require_grad_and_gradients_as_local(bob, op):
    def run(t):
        x = t(torch.tensor([-3.5, 0.5, 2.0])).requires_grad_()
        y = op(x)
        (g,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
        return y.requires_grad, y.is_leaf, y.grad_fn is None, fetched(g)

    local, remote = both(run, bob)
    assert remote[:3] == local[:3]
    assert (remote[3] is None) == (local[3] is None)
    if local[3] is not None:
        torch.testing.assert_close(remote[3], local[3])


def test_autograd_attributes_are_answered_without_a_round_trip(bob, monkeypatch):
    w = torch.randn(3, 2).send(bob).requires_grad_()
    x = torch.randn(4, 3).send(bob)
    spy = Spy(bob, monkeypatch)
    y = (x @ w).relu()
    loss = y.sum()
    assert (w.requires_grad, w.is_leaf, w.grad_fn, w.grad) == (True, True, None, None)
    assert (x.requires_grad, x.is_leaf) == (False, True)
    assert y.requires_grad and not y.is_leaf and y.grad_fn.name() == "ReluBackward0"
    assert y.grad_fn.next_functions[0][0].name() == "MmBackward0"
    loss.backward()
    assert w.grad is not None and w.grad.shape == w.shape and w.grad.dtype == w.dtype
    assert w.grad is w.grad  # one pointer, as torch gives one tensor
    assert x.grad is None
    assert spy.round_trips == 0
    torch.testing.assert_close(w.grad.get(), (x.get().T @ ((x.get() @ w.get()) > 0).float()))


def test_grads_accumulate_in_place_and_set_to_none_resets(bob):
    def run(t):
        w = t(torch.tensor([1., 2., 3.])).requires_grad_()
        (w * 2).sum().backward()
        first = w.grad
        (w ** 2).sum().backward()
        same = w.grad is first
        w.grad = None
        (w * 3).sum().backward()
        return fetched(first), same, fetched(w.grad)

    local, remote = both(run, bob)
    torch.testing.assert_close(remote[0], local[0])
    assert remote[1] is local[1] is True
    torch.testing.assert_close(remote[2], local[2])


def test_views_and_in_place_ops_share_history_as_in_torch(bob):
    def run(t):
        x = t(torch.tensor([1., 2., 3., 4.])).requires_grad_()
        y = t(torch.tensor([5., 6.])).requires_grad_()
        z = t(torch.tensor([7., 8.])).requires_grad_()
        b = x * 1
        other = b[2:]        # made before the in-place op on another view
        v = b[:2]
        v.mul_(y)            # the base's history now reaches y
        b.add_(1)
        other2 = b[2:] * z
        grads = torch.autograd.grad(other.sum(), [x, y], allow_unused=True, retain_graph=True)
        grads2 = torch.autograd.grad(other2.sum(), [x, y, z], allow_unused=True)
        return ([fetched(g) for g in grads], [fetched(g) for g in grads2], b.requires_grad, v.is_leaf,
                v.grad_fn is None)

    local, remote = both(run, bob)
    for r, l in zip(remote[0] + remote[1], local[0] + local[1]):
        assert (r is None) == (l is None)
        if l is not None:
            torch.testing.assert_close(r, l)
    assert remote[2:] == local[2:]


def test_retain_grad_and_inputs_and_errors(bob):
    def run(t):
        x = t(torch.tensor([1., 2.])).requires_grad_()
        h = x * 3
        h.retain_grad()
        out = (h ** 2).sum()
        out.backward(inputs=[x], retain_graph=True)
        only_x = h.grad is None
        out.backward()
        return only_x, fetched(h.grad), fetched(x.grad), h.retains_grad

    local, remote = both(run, bob)
    assert remote[0] == local[0] and remote[3] == local[3]
    torch.testing.assert_close(remote[1], local[1])
    torch.testing.assert_close(remote[2], local[2])


def test_double_backward(bob):
    def run(t):
        x = t(torch.tensor([1., 2., 3.])).requires_grad_()
        (g,) = torch.autograd.grad((x ** 3).sum(), x, create_graph=True)
        penalty = (g ** 2).sum()
        penalty.backward()
        return fetched(g), fetched(x.grad), g.requires_grad

    local, remote = both(run, bob)
    for r, l in zip(remote, local):
        if isinstance(l, torch.Tensor):
            torch.testing.assert_close(r, l)
        else:
            assert r == l


class Small(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(8, 8), nn.Tanh())])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.AdamW(p, lr=1e-2),
], ids=["sgd", "adamw"])
def test_every_training_step_first_or_warm_makes_one_round_trip(bob, monkeypatch, make_opt):
    torch.manual_seed(0)
    model = tr.send(Small(), bob)
    opt = make_opt(model.parameters())
    x, y = torch.randn(16, 8).send(bob), torch.randint(0, 3, (16,)).send(bob)
    spy = Spy(bob, monkeypatch)
    for step in range(3):
        before = spy.round_trips
        opt.zero_grad()                    # the first step's zero_grad included
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
        assert spy.round_trips - before == 1, f"step {step}"


class CallCounter:
    """Counts the ops a client queues for its worker."""

    def __init__(self, worker: tr.Worker, monkeypatch) -> None:
        self.calls = 0
        call = worker._call

        def counted(*a, **k):
            self.calls += 1
            return call(*a, **k)

        monkeypatch.setattr(worker, "_call", counted)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2),
    lambda p: torch.optim.RMSprop(p, lr=1e-2),
], ids=["sgd", "adam", "adamw", "rmsprop"])
def test_an_optimizer_step_costs_no_call_per_parameter(bob, monkeypatch, make_opt):
    """torch's defaults (no foreach=) on RemoteTensor parameters: the foreach path, so a step is a
    handful of ops whatever the number of parameters; the user's param groups keep foreach=None."""
    counts = []
    for layers in (1, 6):
        torch.manual_seed(0)
        model = tr.send(Small(layers), bob)
        opt = make_opt(model.parameters())
        x = torch.randn(4, 8).send(bob)
        for _ in range(2):
            opt.zero_grad()
            model(x).sum().backward()
            counter = CallCounter(bob, monkeypatch)
            opt.step()
            monkeypatch.undo()
        counts.append(counter.calls)
        assert all(g["foreach"] is None for g in opt.param_groups)
    params = (len(list(Small(1).parameters())), len(list(Small(6).parameters())))
    assert counts[1] == counts[0], (counts, params)  # 4 -> 14 parameters: not one more op


def test_foreach_choice_equals_local_training(bob):
    torch.manual_seed(0)
    local = Small()
    remote = tr.send(Small(), bob)
    remote.load_state_dict(local.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (local, remote)]
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    rx, ry = x.send(bob), y.send(bob)
    for _ in range(3):
        for model, opt, (a, b) in ((local, opts[0], (x, y)), (remote, opts[1], (rx, ry))):
            opt.zero_grad()
            F.cross_entropy(model(a), b).backward()
            opt.step()
    for (name, p), q in zip(local.named_parameters(), tr.get(remote).parameters()):
        torch.testing.assert_close(q, p.detach(), msg=name)
