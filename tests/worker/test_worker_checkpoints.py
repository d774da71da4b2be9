"""Checkpoints that stay on the worker's disk: saved and loaded where the model is, in the directory
the owner allows, with the release rules of private-derived data intact."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import torchremote as tr


@pytest.fixture
def owner(tmp_path):
    server = tr.start_worker(id="box", checkpoint_dir=str(tmp_path / "checkpoints"))
    server.publish(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), tags=["#private"], private=True)
    yield server
    server.stop()


def _train(model, x, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()


def test_a_run_resumed_from_a_worker_checkpoint_continues_exactly(owner, tmp_path):
    x = torch.randn(8, 4)
    torch.manual_seed(0)
    uninterrupted = torch.nn.Linear(4, 2)
    with tr.connect(owner.url) as w:
        torch.manual_seed(0)
        model = tr.send(torch.nn.Linear(4, 2), w)
        remote_x = x.send(w)
        _train(model, remote_x, 3)
        assert tr.save_on_worker(model, "step-3") == "step-3.safetensors"
        on_disk = load_file(str(tmp_path / "checkpoints" / "step-3.safetensors"))
        assert torch.equal(on_disk["weight"], model.weight.get())  # the bytes are on the worker's disk
        resumed = tr.send(torch.nn.Linear(4, 2), w)
        resumed.load_state_dict(tr.load_on_worker(w, "step-3"))
        _train(resumed, remote_x, 2)
        _train(uninterrupted, x, 5)
        assert torch.equal(resumed.weight.get(), uninterrupted.weight.detach())
        assert torch.equal(resumed.bias.get(), uninterrupted.bias.detach())


def test_names_not_paths_and_only_where_the_owner_allows(owner):
    with tr.connect(owner.url) as w:
        t = torch.ones(3).send(w)
        for bad in ("../escape", "/etc/passwd", "a/b", ".hidden", ""):
            with pytest.raises(ValueError, match="a name, not a path"):
                tr.save_on_worker(t, bad)
        with pytest.raises(FileNotFoundError, match="no checkpoint 'missing.safetensors'"):
            tr.load_on_worker(w, "missing")
    plain = tr.start_worker(id="plain")
    try:
        with tr.connect(plain.url) as w:
            with pytest.raises(PermissionError, match="--checkpoint-dir"):
                tr.save_on_worker(torch.ones(3).send(w), "step-1")
    finally:
        plain.stop()


def test_private_derived_weights_load_back_private_for_anyone(owner):
    with tr.connect(owner.url, name="alice") as alice:
        (x,) = alice.search("#private")
        model = tr.send(torch.nn.Linear(4, 1), alice)
        _train(model, x, 2)
        tr.save_on_worker(model, "trained-on-private")  # stays on the worker: no approval needed
    with tr.connect(owner.url, name="mallory") as mallory:
        weights = tr.load_on_worker(mallory, "trained-on-private")
        with pytest.raises(tr.ApprovalRequired, match="#private"):
            weights["weight"].get()  # a save and a load launder nothing
        assert mallory.memory().held_by(mallory.client_id) == 5 * 4  # loaded tensors count as held


def test_a_load_past_the_memory_budget_is_refused_before_it_reads(tmp_path):
    server = tr.start_worker(id="small", checkpoint_dir=str(tmp_path), max_memory=3 << 19, max_client_bytes=0)
    try:
        with tr.connect(server.url) as w:
            held = torch.zeros(1 << 18).send(w)  # 1 MiB of a 1.5 MiB budget
            tr.save_on_worker(held, "big")
            with pytest.raises(torch.OutOfMemoryError, match=r"loading big.safetensors \(checked before it ran\)"):
                tr.load_on_worker(w, "big")
            assert server.budget.host.used == 1 << 20
    finally:
        server.stop()
