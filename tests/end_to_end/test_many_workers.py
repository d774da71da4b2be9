"""Many workers: direct moves between them, copies, and the owner's view from the command line."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import torchremote as tr
from conftest import ROOT, WorkerProcess, connected_worker


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    token = tmp_path_factory.mktemp("move") / "token"
    token.write_text("dest-token")
    with connected_worker("--id", "alice") as alice, \
            connected_worker("--id", "carol", "--token-file", str(token), token="dest-token") as carol:
        yield alice, carol


def test_move_sends_worker_to_worker(pair, monkeypatch):
    alice, carol = pair
    t = torch.randn(300, 200).t()
    x = t.send(alice) * 2
    fetched = []
    monkeypatch.setattr(alice, "_fetch", lambda ref: fetched.append(ref))  # no data comes through here
    y = x.move(carol)
    monkeypatch.undo()
    assert fetched == [] and y.worker is carol and y.device == carol.device
    assert torch.equal(y.get(), t * 2) and torch.equal(x.get(), t * 2)  # a copy: the source keeps x
    big = torch.randn(3 << 20)                                           # 12 MiB: chunked on the way
    assert torch.equal(big.send(alice).move(carol).get(), big)
    assert ((y + 1) * 0).sum().item() == 0.0                             # and computes like any pointer


def test_mixing_workers_names_both_and_suggests_move(pair):
    alice, carol = pair
    with pytest.raises(RuntimeError) as raised:
        torch.ones(2).send(alice) + torch.ones(2).send(carol)
    message = str(raised.value)
    assert message.startswith(f"Expected all tensors to be on the same device, but found at least two "
                              f"devices, {alice.device} and {carol.device}!")  # torch's own words first
    assert "'alice'" in message and "'carol'" in message and "move" in message


def test_send_of_a_remote_model_moves_it(pair):
    alice, carol = pair
    torch.manual_seed(0)
    local = nn.Linear(4, 2)
    model = tr.send(nn.Linear(4, 2), alice)
    model.load_state_dict(local.state_dict())
    tr.send(model, carol)
    assert all(p.worker is carol for p in model.parameters())
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x.send(carol)).get(), local(x))


def test_copy_is_independent(pair):
    alice, _ = pair
    x = torch.zeros(3).send(alice)
    c = x.copy()
    c.add_(1)
    assert x.get().tolist() == [0, 0, 0] and c.get().tolist() == [1, 1, 1] and c.worker is alice


def test_a_move_ticket_is_single_use_and_needs_the_token(pair):
    alice, carol = pair
    from torchremote.wire import messages as m
    _, ticket = carol._ask(lambda: carol._protocol.request(m.Expect), "move")
    x = torch.ones(2).send(alice)
    with pytest.raises(tr.WorkerPermissionError):
        alice._request(m.Push, x._ref, carol.url, "wrong-token", ticket)
    alice._request(m.Push, x._ref, carol.url, "dest-token", ticket)
    with pytest.raises(LookupError, match="ticket"):
        alice._request(m.Push, x._ref, carol.url, "dest-token", ticket)


def test_ls_prints_the_registry(tmp_path):
    server = tr.start_worker(id="hospital")
    server.publish(torch.zeros(10, 3), tags=["#train", "#ward-7"], description="vitals", allow_get=False)
    try:
        out = subprocess.run([sys.executable, "-m", "torchremote", "ls", server.url], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                             timeout=60)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    assert "worker 'hospital'" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("p1"))
    assert "#train #ward-7" in row and "(10, 3)" in row and "float32" in row and "120" in row


def test_ls_of_nothing_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "torchremote", "ls", "ws://127.0.0.1:9", "--timeout", "2"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "cannot connect" in out.stderr


def test_a_dead_worker_fails_its_own_calls_and_not_the_others(pair):
    _, carol = pair
    doomed = WorkerProcess("--id", "doomed")
    try:
        w = tr.connect(doomed.url)
        x = torch.ones(2).send(w)
        assert x.sum().item() == 2.0
        doomed.proc.kill()
        with pytest.raises(ConnectionError):
            for _ in range(100):
                (x + 1).sum().item()
        assert (torch.ones(2).send(carol) * 3).sum().item() == 6.0  # the others carry on
        w.close()
    finally:
        doomed.stop()


def test_device_indices_are_reused_after_close_past_torchs_limit(server):
    from torchremote.client.device import MAX_DEVICES
    for _ in range(MAX_DEVICES + 5):  # more connections than torch has device indices
        with tr.connect(server.url) as w:
            assert 0 <= w.device.index < MAX_DEVICES
            assert (torch.ones(2).send(w) + 1).device == w.device
    live = tr.connect(server.url)
    try:
        assert torch.zeros(2, device=live.device).worker is live
    finally:
        live.close()


def test_to_another_workers_device_moves_worker_to_worker(pair, monkeypatch):
    """As cuda:0 -> cuda:1: x.to(carol.device) and model.to(carol.device) move, not fetch."""
    alice, carol = pair
    t = torch.randn(5, 3)
    x = t.send(alice)
    monkeypatch.setattr(alice, "_fetch", lambda ref: pytest.fail("the data came through this process"))
    y = x.to(carol.device)
    half = x.to(carol.device, torch.float64)
    torch.manual_seed(0)
    local = nn.Linear(3, 2)
    model = copy.deepcopy(local).to(alice.device)
    weight = model.weight
    model.to(carol.device)
    monkeypatch.undo()
    assert y.worker is carol and torch.equal(y.get(), t)
    assert half.worker is carol and half.dtype == torch.float64 and torch.equal(half.get(), t.double())
    assert model.weight is weight and weight.worker is carol and weight.requires_grad
    torch.testing.assert_close(model(t.send(carol)).get(), local(t))
    with pytest.raises(NotImplementedError, match="not differentiable yet"):
        x.requires_grad_().to(carol.device)
