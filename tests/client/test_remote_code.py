"""Code that travels: worker.run, @tr.remote and custom autograd.Functions, only with --allow-code."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchremote as tr
from conftest import connected_worker

TOKEN = "code-token"


@pytest.fixture(scope="module")
def coder(tmp_path_factory):
    token = tmp_path_factory.mktemp("code") / "token"
    token.write_text(TOKEN)
    with connected_worker("--id", "coder", "--allow-code", "--token-file", str(token), token=TOKEN) as w:
        yield w


@pytest.fixture(scope="module")
def plain():
    with connected_worker("--id", "plain") as w:
        yield w


def train_step(model_params, x, y, lr):
    """A whole SGD step on a functional MLP: what one round trip can carry."""
    w1, b1, w2, b2 = model_params
    loss = F.cross_entropy(F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2), y)
    grads = torch.autograd.grad(loss, model_params)
    with torch.no_grad():
        for p, g in zip(model_params, grads):
            p.sub_(lr * g)
    return loss.detach()


def make_params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 8, generator=g) * 0.3, torch.zeros(16), torch.randn(3, 16, generator=g) * 0.3,
            torch.zeros(3)]


def test_worker_run_equals_op_by_op_and_local(coder):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    local = [p.clone().requires_grad_() for p in make_params()]
    op_by_op = [p.clone().send(coder).requires_grad_() for p in make_params()]
    shipped = [p.clone().send(coder).requires_grad_() for p in make_params()]
    rx, ry = x.send(coder), y.send(coder)
    for _ in range(3):
        l_loss = train_step(local, x, y, 0.5)
        o_loss = train_step(op_by_op, rx, ry, 0.5)
        s_loss = coder.run(train_step, shipped, rx, ry, 0.5)  # one round trip
        assert isinstance(s_loss, tr.RemoteTensor)
        assert s_loss.item() == pytest.approx(l_loss.item(), rel=1e-6) == o_loss.item()
    for lp, op, sp in zip(local, op_by_op, shipped):
        torch.testing.assert_close(sp.get(), lp.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(op.get(), lp.detach(), rtol=1e-6, atol=1e-7)


def test_remote_decorator(coder):
    @tr.remote(coder)
    def stats(t):
        return t.mean(), t.std(), t.shape[0]

    @tr.remote
    def double(t):
        return t * 2

    mean, std, n = stats(torch.arange(10.))  # a local argument travels with the call
    assert isinstance(mean, tr.RemoteTensor) and n == 10
    assert mean.item() == 4.5 and std.item() == pytest.approx(torch.arange(10.).std().item())
    assert double(torch.ones(2)).equal(torch.full((2,), 2.))            # nothing remote: runs here
    assert double(torch.ones(2).send(coder)).get().equal(torch.full((2,), 2.))


class ScaledTanh(torch.autograd.Function):
    """A custom op with a hand-written (and deliberately unusual) backward."""

    @staticmethod
    def forward(ctx, x, scale):
        y = torch.tanh(x) * scale
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (ctx.scale - y * y / ctx.scale) * 0.5, None


class Net(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b, self.fn = nn.Linear(6, 12), nn.Linear(12, 3), fn

    def forward(self, x):
        return self.b(self.fn.apply(self.a(x), 2.0))


def test_a_model_with_a_custom_autograd_function_trains_like_local(coder):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    losses = {}
    for where in ("local", "remote"):
        torch.manual_seed(0)
        model = Net(tr.remote(ScaledTanh))
        data = (x, y)
        if where == "remote":
            tr.send(model, coder)
            data = (x.send(coder), y.send(coder))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[where] = []
        for _ in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(data[0]), data[1])
            loss.backward()
            opt.step()
            losses[where].append(loss.item())
        losses[where + "-weights"] = [p.detach() for p in tr.get(model).parameters()]
    torch.testing.assert_close(torch.tensor(losses["remote"]), torch.tensor(losses["local"]), rtol=1e-6, atol=1e-7)
    for r, l in zip(losses["remote-weights"], losses["local-weights"]):
        torch.testing.assert_close(r, l, rtol=1e-6, atol=1e-7)


def test_an_undecorated_custom_function_on_pointers_is_a_clear_error(coder):
    model = tr.send(Net(ScaledTanh), coder)
    with pytest.raises(RuntimeError, match="ScaledTanh.*@torchremote.remote"):
        model(torch.randn(2, 6).send(coder))


def test_code_is_refused_without_allow_code(plain):
    x = torch.ones(3).send(plain)
    with pytest.raises(tr.WorkerPermissionError, match="--allow-code"):
        plain.run(lambda t: t + 1, x)
    model = tr.send(Net(tr.remote(ScaledTanh)), plain)
    with pytest.raises(PermissionError, match="--allow-code"):
        model(torch.randn(2, 6).send(plain))
    assert (x + 1).sum().item() == 6.0  # and the connection goes on


def test_allow_code_needs_a_token():
    with pytest.raises(tr.WorkerPermissionError, match="token"):
        tr.start_worker(id="open-code", allow_code=True)
