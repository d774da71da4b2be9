"""Checkpoints as on CUDA: `torch.save` stores a RemoteTensor's bytes with its device, and
`torch.load` puts it back on that worker, on another with `map_location`, or on the CPU."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchremote as tr


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(data: bytes, **options):
    return torch.load(io.BytesIO(data), **options)


def test_a_state_dict_comes_back_on_its_worker(bob, fresh_server):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.to(bob.device)
    data = _saved(model.state_dict())
    for options in ({}, {"weights_only": True}, {"weights_only": False}):
        loaded = _load(data, **options)
        for k, v in loaded.items():
            assert isinstance(v, tr.RemoteTensor) and v.device == bob.device and torch.equal(v.get(), expected[k])
    on_cpu = _load(data, map_location="cpu")
    assert all(type(v) is torch.Tensor and torch.equal(v, expected[k]) for k, v in on_cpu.items())
    other = tr.connect(fresh_server.url)
    try:
        moved = _load(data, map_location=other.device)
        assert all(v.device == other.device and torch.equal(v.get(), expected[k]) for k, v in moved.items())
    finally:
        other.close()


def test_a_whole_module_and_its_parameters(bob):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).to(bob.device)
    loaded = _load(_saved(model), weights_only=False)
    assert all(isinstance(p, nn.Parameter) and isinstance(p, tr.RemoteTensor) and p.device == bob.device
               for p in loaded.parameters())
    for p, q in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(p.get(), q.get()) and p.requires_grad
    x = torch.randn(2, 3).to(bob.device)
    assert torch.equal(loaded(x).get(), model(x).get())


def test_with_no_worker_for_the_device_the_error_says_to_pass_map_location(server):
    w = tr.connect(server.url)
    data = _saved({"w": torch.ones(2).to(w.device)})
    w.close()
    with pytest.raises(RuntimeError, match="map_location"):
        _load(data)
    assert torch.equal(_load(data, map_location="cpu")["w"], torch.ones(2))


def test_a_run_resumed_from_a_checkpoint_continues_like_the_uninterrupted_one(bob):
    torch.manual_seed(0)
    data = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(6)]

    def build():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 3)).to(bob.device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def steps(model, opt, batches):
        losses = []
        for x, y in batches:
            opt.zero_grad()
            loss = F.cross_entropy(model(x.to(bob.device)), y.to(bob.device))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    model, opt = build()
    steps(model, opt, data[:3])
    checkpoint = _saved({"model": model.state_dict(), "opt": opt.state_dict()})
    expected = steps(model, opt, data[3:])

    resumed, resumed_opt = build()
    state = _load(checkpoint, weights_only=True)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["opt"])
    assert steps(resumed, resumed_opt, data[3:]) == expected
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p.get(), q.get())


def test_private_derived_data_is_not_saved_without_approval():
    server = tr.start_worker(id="owner", token="t", owner_token="o")
    try:
        server.publish(torch.arange(4.), tags=["#secret"], private=True)
        w = tr.connect(server.url, token="t")
        (secret,) = w.search("#secret")
        with pytest.raises(tr.ApprovalRequired):
            torch.save(secret * 2, io.BytesIO())
        w.close()
    finally:
        server.stop()
