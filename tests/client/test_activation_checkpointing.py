"""Activation checkpointing on pointers: `use_reentrant=False` (also through Hugging Face's
`gradient_checkpointing_enable`) gives local's gradients; `use_reentrant=True`, a custom
autograd.Function run op by op, is refused with a clear error instead of training wrongly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from conftest import bits, tiny_gpt2


def _block():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))


def test_non_reentrant_checkpoint_gradients_equal_local(bob):
    block, x = _block(), torch.randn(4, 8)
    local = copy.deepcopy(block)
    xl = x.clone().requires_grad_()
    checkpoint(local, xl, use_reentrant=False).square().sum().backward()
    block.to(bob.device)
    xr = x.to(bob.device).requires_grad_()
    checkpoint(block, xr, use_reentrant=False).square().sum().backward()
    assert torch.equal(bits(xr.grad.get()), bits(xl.grad))
    for p, q in zip(block.parameters(), local.parameters()):
        assert torch.equal(bits(p.grad.get()), bits(q.grad))


def test_reentrant_checkpoint_is_refused_clearly(bob):
    block = _block().to(bob.device)
    x = torch.randn(4, 8).to(bob.device).requires_grad_()
    with pytest.raises(RuntimeError, match="CheckpointFunction"):
        checkpoint(block, x, use_reentrant=True)


def test_hf_gradient_checkpointing_trains_like_local(bob):
    model = tiny_gpt2()
    local = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 12))

    def steps(model, ids):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
