"""Activation checkpointing on pointers, `use_reentrant=False` and `True` (also through Hugging Face's
`gradient_checkpointing_enable`): gradients equal local, the worker frees what the region would
have kept for backward, and backward runs the region again, from the RNG state it started with."""
from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from conftest import bits, tiny_gpt2

MODES = [pytest.param(False, id="non-reentrant"), pytest.param(True, id="reentrant")]


def _block():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))


def _grads(model, x):
    return [bits(t.grad.get() if hasattr(t.grad, "get") else t.grad) for t in (x, *model.parameters())]


@pytest.mark.parametrize("reentrant", MODES)
def test_checkpoint_gradients_equal_local(bob, reentrant):
    block, x = _block(), torch.randn(4, 8)
    local = copy.deepcopy(block)
    xl = x.clone().requires_grad_()
    checkpoint(local, xl, use_reentrant=reentrant).square().sum().backward()
    block.to(bob.device)
    xr = x.to(bob.device).requires_grad_()
    y = checkpoint(block, xr, use_reentrant=reentrant)
    assert y.requires_grad and not y.is_leaf
    y.square().sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(_grads(block, xr), _grads(local, xl)))


def _worker_tensor(server, worker, pointer):
    worker.sync()
    return server.store._namespaces[worker.client_id][pointer._ref]


@pytest.mark.parametrize("mode", ["plain", "non-reentrant", "reentrant"])
def test_the_worker_frees_what_a_checkpointed_region_saves(server, bob, mode):
    """The region's intermediate (GELU's input, which GELU saves for backward) is dropped on the
    worker once the client drops its pointer: only a plain forward keeps it, in its graph."""
    block = _block().to(bob.device)
    x = torch.randn(4, 8).to(bob.device).requires_grad_()
    seen = []

    def forward(h):
        a = block[0](h)
        seen.append(weakref.ref(_worker_tensor(server, bob, a)))
        return block[2](block[1](a))

    y = forward(x) if mode == "plain" else checkpoint(forward, x, use_reentrant=mode == "reentrant")
    bob.sync()
    assert (seen[0]() is not None) == (mode == "plain")
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("reentrant", MODES)
def test_backward_runs_the_region_again_as_local_torch_does(bob, reentrant):
    """An in-place count inside the region: torch's checkpoint runs it twice (forward and
    recomputation); so does the worker. (A reentrant region starts at its first op on a tensor
    that requires grad: the count comes after one.)"""
    def counting(count):
        def f(h):
            y = h * 2
            count.add_(1)
            return y.sin()
        return f

    local = torch.zeros(())
    xl = torch.randn(3, requires_grad=True)
    checkpoint(counting(local), xl, use_reentrant=reentrant).sum().backward()
    remote = torch.zeros(()).to(bob.device)
    xr = xl.detach().to(bob.device).requires_grad_()
    checkpoint(counting(remote), xr, use_reentrant=reentrant).sum().backward()
    assert local.item() == 2 and remote.get().item() == 2
    assert torch.equal(xr.grad.get(), xl.grad)


@pytest.mark.parametrize("reentrant", MODES)
def test_dropout_is_recomputed_with_the_forwards_random_state(bob, reentrant):
    """The recomputation restores the region's RNG state: the same dropout masks as its forward,
    so the gradients equal an uncheckpointed forward's with the same seed."""
    block = _block().to(bob.device)

    def forward(h):
        return block[2](F.dropout(block[1](block[0](h)), p=0.5, training=True))

    x = torch.randn(4, 8).to(bob.device)
    results = []
    for checkpointed in (False, True):
        for p in block.parameters():
            p.grad = None
        xr = x.detach().requires_grad_()
        torch.manual_seed(1)
        y = checkpoint(forward, xr, use_reentrant=reentrant) if checkpointed else forward(xr)
        torch.randn(5).to(bob.device)  # the worker's RNG moves on before backward
        y.square().sum().backward()
        results.append(_grads(block, xr))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_reentrant_with_no_input_requiring_grad_gives_no_gradients_as_local(bob):
    """torch's reentrant checkpoint: outputs require grad only if an input does (a parameter in
    the function does not count)."""
    block = _block()
    local_out = checkpoint(copy.deepcopy(block), torch.randn(4, 8), use_reentrant=True)
    block.to(bob.device)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        out = checkpoint(block, torch.randn(4, 8).to(bob.device), use_reentrant=True)
    assert out.requires_grad is local_out.requires_grad is False


@pytest.mark.parametrize("reentrant", MODES)
def test_hf_gradient_checkpointing_trains_like_local(bob, reentrant):
    model = tiny_gpt2()
    local = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 12))

    def steps(model, ids):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    expected = steps(local, ids)
    model.to(bob.device)
    assert steps(model, ids.to(bob.device)) == expected
    for p, q in zip(model.parameters(), local.parameters()):
        assert torch.equal(bits(p.get()), bits(q))
