"""Moving a model keeps it the same model, as on CUDA: `model.to(worker.device)`, `model.to("cpu")`
and `tr.send`/`tr.get` keep every Parameter object, so tied weights, optimizers, hooks, `.grad`,
parametrizations and weight norm made before the move stay valid. Training equals local."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm
from torch.utils._python_dispatch import is_traceable_wrapper_subclass, transform_subclass

import torchremote as tr
from conftest import connected_worker
from test_pipelining import Spy


@pytest.fixture(scope="module")
def proc_worker():
    with connected_worker("--id", "mover") as w:
        yield w


class TiedLM(nn.Module):
    """GPT-style: the input embedding is the output projection, tied by assignment."""

    def __init__(self, vocab: int = 24, dim: int = 16, context: int = 8):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.mlp(x)
        return self.lm_head(self.ln_f(x))


def _train(model, opt, batches, accumulate=2):
    """AdamW steps with gradient accumulation and clipping, as training scripts write them."""
    losses = []
    for step in range(0, len(batches), accumulate):
        opt.zero_grad()
        for tokens in batches[step:step + accumulate]:
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            (loss / accumulate).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    return losses


def _batches(n=8, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 24, (2, 8), generator=g).to(device) for _ in range(n)]


def test_remote_tensor_is_a_traceable_wrapper_subclass(bob):
    x = torch.arange(4.).send(bob)
    assert is_traceable_wrapper_subclass(x)
    y = transform_subclass(x, lambda name, inner: inner)  # flatten, then unflatten: one worker object
    assert isinstance(y, tr.RemoteTensor) and y.id == x.id and torch.equal(y.get(), x.get())


def test_unflattened_pointers_free_the_object_when_the_last_goes(fresh_server):
    w = tr.connect(fresh_server.url)
    try:
        x = torch.arange(4.).send(w)
        y = transform_subclass(x, lambda name, inner: inner)
        w.sync()
        assert len(w.objects()) == 1
        del x
        w.sync()
        assert len(w.objects()) == 1 and y.get().sum().item() == 6  # alive while a pointer is
        del y
        w.sync()
        assert w.objects() == []
    finally:
        w.close()


def test_tied_lm_moved_with_to_trains_like_local(proc_worker):
    torch.manual_seed(0)
    local = TiedLM()
    moved = copy.deepcopy(local)
    assert moved.wte.weight is moved.lm_head.weight
    opt = torch.optim.AdamW(moved.parameters(), lr=1e-2)  # built before the move, as scripts do
    params = list(moved.parameters())
    moved.to(proc_worker.device)
    assert moved.wte.weight is moved.lm_head.weight  # still tied: one Parameter
    assert [p for p in moved.parameters()] == params and all(p is q for p, q in zip(moved.parameters(), params))
    assert all(isinstance(p, tr.RemoteTensor) and isinstance(p, nn.Parameter) for p in params)

    expected = _train(local, torch.optim.AdamW(local.parameters(), lr=1e-2), _batches())
    got = _train(moved, opt, _batches(device=proc_worker.device))
    assert got == expected
    for (name, p), q in zip(moved.named_parameters(), local.parameters()):
        assert torch.equal(p.get(), q.detach()), name


def test_to_cpu_gives_back_the_same_parameters(proc_worker):
    torch.manual_seed(0)
    model = TiedLM()
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.to(proc_worker.device)
    _train(model, opt, _batches(4))
    trained = [p.get() for p in params]
    grads = [p.grad.get() for p in params]
    model.to("cpu")
    assert all(p is q for p, q in zip(model.parameters(), params))
    for p, value, grad in zip(params, trained, grads):
        assert type(p) is nn.Parameter and p.device.type == "cpu" and p.requires_grad
        assert torch.equal(p.detach(), value) and torch.equal(p.grad, grad)  # .grad came along
    assert model.wte.weight is model.lm_head.weight
    _train(model, opt, _batches(2))  # and it trains locally again, with the same optimizer


def test_grads_and_dtype_moves_keep_the_objects(proc_worker):
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    grad = model.weight.grad.clone()
    weight = model.weight
    model.to(proc_worker.device)
    assert model.weight is weight and isinstance(weight.grad, tr.RemoteTensor)
    assert torch.equal(weight.grad.get(), grad)
    model.to(torch.float64)
    assert model.weight is weight and weight.dtype == torch.float64 and isinstance(weight, tr.RemoteTensor)
    model.remote(proc_worker.device.index)  # torch's method for the backend, like .cuda(i)
    assert model.weight is weight and weight.is_remote


def test_hooks_survive_the_move_and_run_as_locally(proc_worker):
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
        seen = []
        m[0].weight.register_hook(lambda g: g.clamp(-0.01, 0.01))  # replaces the gradient
        m[2].weight.register_hook(lambda g: seen.append("pre") or None)
        m[2].weight.register_post_accumulate_grad_hook(lambda p: seen.append(("post", p.grad is not None)))
        return m, seen

    local, local_seen = build()
    moved, moved_seen = build()
    moved.to(proc_worker.device)
    x = torch.randn(5, 4)
    for _ in range(2):  # twice: the second backward accumulates into .grad
        local(x).sum().backward()
        moved(x.to(proc_worker.device)).sum().backward()
    assert moved_seen == local_seen == ["pre", ("post", True)] * 2
    for p, q in zip(moved.parameters(), local.parameters()):
        assert torch.equal(p.grad.get(), q.grad)
    assert moved[0].weight.grad.get().abs().max() <= 0.02  # the clamp applied, then accumulated

    moved.to("cpu")  # hooks still run on the CPU again
    moved.zero_grad()
    moved_seen.clear()
    moved(x).sum().backward()
    assert moved_seen == ["pre", ("post", True)]
    assert moved[0].weight.grad.abs().max() <= 0.01


def test_a_hook_handle_removes_the_hook(bob):
    w = torch.ones(3).send(bob).requires_grad_()
    calls = []
    handle = w.register_hook(lambda g: calls.append(1))
    (w * 2).sum().backward()
    handle.remove()
    (w * 2).sum().backward()
    assert calls == [1] and torch.equal(w.grad.get(), torch.full((3,), 4.))


def test_hooks_on_non_leaves_are_refused_clearly(bob):
    w = torch.ones(3).send(bob).requires_grad_()
    with pytest.raises(NotImplementedError, match="not a leaf"):
        (w * 2).register_hook(lambda g: g)
    with pytest.raises(RuntimeError, match="doesn't require gradient"):
        torch.ones(3).send(bob).register_hook(lambda g: g)


class Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


def test_parametrized_and_weight_normed_layers_train_like_local(proc_worker):
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), weight_norm(nn.Linear(4, 2)))
        parametrize.register_parametrization(m[0], "weight", Symmetric())
        return m

    local, moved = build(), build()
    opt = torch.optim.Adam(moved.parameters(), lr=1e-2)
    originals = list(moved.parameters())
    moved.to(proc_worker.device)
    assert all(p is q for p, q in zip(moved.parameters(), originals))
    local_opt = torch.optim.Adam(local.parameters(), lr=1e-2)
    x = torch.randn(6, 4)
    for _ in range(3):
        for model, o, inp in ((local, local_opt, x), (moved, opt, x.to(proc_worker.device))):
            o.zero_grad()
            model(inp).square().mean().backward()
            o.step()
    for p, q in zip(moved.parameters(), local.parameters()):
        assert torch.equal(p.get(), q.detach())
    assert torch.equal(moved[0].weight.get(), local[0].weight.detach())  # the parametrized weight


def test_send_and_get_keep_the_objects(proc_worker):
    torch.manual_seed(0)
    model = TiedLM()
    params = list(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert tr.send(model, proc_worker) is model
    assert all(p is q for p, q in zip(model.parameters(), params)) and model.wte.weight is model.lm_head.weight
    _train(model, opt, _batches(2))  # the optimizer built before send updates the model
    updated = [p.get() for p in params]
    tr.get(model)
    assert all(p is q and type(p) is nn.Parameter for p, q in zip(model.parameters(), params))
    assert all(torch.equal(p.detach(), u) for p, u in zip(params, updated))


def test_a_second_move_sends_no_data_and_waits_for_nothing(bob, monkeypatch):
    model = TiedLM().to(bob.device)
    bob.sync()
    sent, puts = [], []
    spy = Spy(bob, monkeypatch)
    send = bob._connection.send_locked
    monkeypatch.setattr(bob._connection, "send_locked",
                        lambda chunks, **o: sent.append(sum(len(memoryview(c).cast("B")) for c in chunks))
                        or send(chunks, **o))
    for name in ("put", "put_begin"):
        original = getattr(bob._protocol, name)
        monkeypatch.setattr(bob._protocol, name, lambda *a, _f=original, **k: puts.append(a) or _f(*a, **k))
    params, buffers = list(model.parameters()), list(model.buffers())
    model.to(bob.device)
    model.to(bob.device, torch.float32)
    bob.sync()
    assert spy.round_trips == 1 and puts == []  # the sync itself; no tensor data
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert all(b is c for b, c in zip(model.buffers(), buffers))
    # torch's _apply swaps a traceable subclass into each Parameter even when nothing changes
    # (Parameter(x) detaches x): per Parameter visited, a detach, a requires_grad_ and a release
    visits = 2 * sum(1 for m in model.modules() for p in m._parameters.values() if p is not None)
    assert sum(sent) < 300 * visits
    x = torch.tensor([1., 2.]).send(bob)
    assert x.to(bob.device) is x and x.to(torch.float32) is x and x.to(x) is x
    assert x.to(torch.float64) is not x and x.to(bob.device, copy=True) is not x


def test_autograd_grad_passes_inputs_gradients_through_their_hooks(bob):
    local = torch.ones(3, requires_grad=True)
    remote = torch.ones(3).send(bob).requires_grad_()
    for t in (local, remote):
        t.register_hook(lambda g: g * 10)
        t.register_post_accumulate_grad_hook(lambda p: pytest.fail("autograd.grad accumulates nothing"))
    (expected,) = torch.autograd.grad((local * 2).sum(), local)
    (got,) = torch.autograd.grad((remote * 2).sum(), remote)
    assert torch.equal(got.get(), expected) and remote.grad is None


@pytest.mark.parametrize("move", [lambda m: m.to("cpu"), tr.get])
def test_zero_grad_right_before_moving_back(bob, move):
    model = nn.Linear(3, 2).to(bob.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 3).to(bob.device)).sum().backward()
    opt.zero_grad()  # queued resets name pointers that are about to hand their objects over
    move(model)
    assert all(type(p) is nn.Parameter and p.grad is None for p in model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
