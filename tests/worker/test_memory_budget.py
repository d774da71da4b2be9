"""One memory budget for the whole worker: no set of clients takes it past what the owner allows,
and whoever asks too much gets `torch.OutOfMemoryError` at his own call."""
from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchremote as tr
from torchremote.worker.budget import parse_size

from conftest import ROOT, WorkerProcess

MiB = 1 << 20


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_three_clients_cannot_take_the_worker_past_its_budget(tmp_path):
    data = tmp_path / "data.safetensors"
    save_file({"cohort": torch.arange(4 * MiB // 4, dtype=torch.float32)}, str(data))
    worker = WorkerProcess("--id", "shared", "--max-memory", "1GiB", "--publish", str(data))
    clients = [tr.connect(worker.url, name=f"client{i}") for i in range(3)]
    try:
        baseline = _rss(worker.proc.pid)
        block = torch.ones(100 * MiB)  # 400 MiB
        first, second = block.send(clients[0]), (block * 2).send(clients[1])
        with pytest.raises(torch.OutOfMemoryError) as info:
            block.send(clients[2])  # refused at the send, before a chunk streams
        message = str(info.value)
        assert "memory budget of 1.0 GiB (--max-memory)" in message and "804.0 MiB are in use" in message
        assert "0 B of it by this client (client2#3)" in message
        assert _rss(worker.proc.pid) - baseline < (1 << 30) + 64 * MiB
        assert first[:3].tolist() == [1.0] * 3 and second[-3:].tolist() == [2.0] * 3  # intact
        (cohort,) = clients[2].search("cohort")
        assert cohort[-1].item() == float(MiB - 1)
        memory = clients[2].memory()
        assert memory.used[0] == 804 * MiB and memory.limits[0] == 1 << 30 and memory.clients == ("client2#3",)
        del first
        gc.collect()
        clients[0].sync()  # the release reaches the worker
        third = block.send(clients[2])  # the same call succeeds once there is room
        assert third.sum().item() == 100 * MiB
        listed = subprocess.run([sys.executable, "-m", "torchremote", "ls", worker.url], capture_output=True,
                                text=True, cwd=ROOT, timeout=60)
        assert "memory: 804.0 MiB in use of 1.0 GiB" in listed.stdout, listed.stdout
    finally:
        for c in clients:
            c.close()
        worker.stop()


def test_an_op_asking_for_too_much_is_refused_before_it_allocates(fresh_server):
    limited = tr.start_worker(id="small", max_memory="1GiB", max_client_bytes=0)
    try:
        with tr.connect(limited.url) as w:
            huge = torch.empty(2**31, device=w.device)  # 8 GiB
            with pytest.raises(torch.OutOfMemoryError, match=r"empty \(checked before it ran\) needs 8.0 GiB"):
                w.sync()
            with pytest.raises(torch.OutOfMemoryError):
                huge.sum().item()  # what it would have made does not exist
            assert limited.budget.host.used == 0
            assert (torch.ones(4, device=w.device) * 2).sum().item() == 8.0  # and the session goes on
    finally:
        limited.stop()


def test_sizes_read_as_the_owner_writes_them():
    assert parse_size("512MiB", None) == 512 * MiB and parse_size("8GiB", None) == 8 << 30
    assert parse_size("80%", 1000) == 800 and parse_size("1.5GB", None) == 1_500_000_000
    assert parse_size(0, None) is None and parse_size("0", None) is None
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots", None)


BUDGET = 256 * 1024  # bytes
PUBLISHED = 16 * 1024


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.integers(1, 24)), min_size=1, max_size=30))
def test_random_allocations_never_pass_the_budget_nor_refuse_what_fits(steps):
    """Each step: a client sends `kib` KiB, or frees one of its tensors. The worker must refuse a
    send exactly when it would pass the budget, and count exactly what is held."""
    server = tr.start_worker(id="budget", max_memory=BUDGET, max_client_bytes=0)
    server.publish(torch.zeros(PUBLISHED // 4), tags=["#data"])
    clients = [tr.connect(server.url, name=f"c{i}") for i in range(3)]
    held: list[list] = [[] for _ in clients]
    try:
        for who, send, kib in steps:
            used = PUBLISHED + sum(t.numel() * 4 for mine in held for t in mine)
            if send or not held[who]:
                size = kib * 1024
                try:
                    held[who].append(torch.zeros(size // 4).send(clients[who]))
                    clients[who].sync()
                    assert used + size <= BUDGET, "a send past the budget was taken"
                except torch.OutOfMemoryError:
                    held[who].pop()  # the pointer of a refused send is invalid
                    assert used + size > BUDGET, "a send that fits was refused"
            else:
                held[who].pop(0)
                gc.collect()
                clients[who].sync()
            expected = PUBLISHED + sum(t.numel() * 4 for mine in held for t in mine)
            assert server.budget.host.used == expected <= BUDGET
    finally:
        for c in clients:
            c.close()
        server.stop()


def test_a_tensor_moved_in_from_another_worker_counts_for_its_new_holder():
    source, destination = tr.start_worker(id="a"), tr.start_worker(id="b", max_memory="64MiB")
    try:
        with tr.connect(source.url) as a, tr.connect(destination.url) as b:
            x = torch.ones(MiB // 4).send(a)
            moved = x.move(b)
            assert moved.sum().item() == MiB // 4
            memory = b.memory()
            assert destination.budget.host.used == MiB and memory.held_by(b.client_id) == MiB
            del moved
            gc.collect()
            b.sync()
            assert destination.budget.host.used == 0
    finally:
        source.stop()
        destination.stop()


def test_torch_remote_memory_allocated_counts_what_this_client_holds(fresh_server):
    with tr.connect(fresh_server.url) as w:
        x = torch.zeros(MiB // 4).send(w)  # 1 MiB
        y = x * 2                          # 1 MiB more
        view = y[:10]                      # a view: nothing more
        assert torch.remote.memory_allocated(w.device) == 2 * MiB
        del x, y
        gc.collect()
        assert torch.remote.memory_allocated(w.device) == MiB  # the view keeps y's storage
        assert torch.remote.max_memory_allocated(w.device) == 2 * MiB
        del view


def test_a_client_sees_its_own_holdings_and_the_owner_sees_everyones():
    server = tr.start_worker(id="shared", token="client", owner_token="owner", max_memory="64MiB")
    try:
        with tr.connect(server.url, token="client", name="alice") as alice, \
                tr.connect(server.url, token="client", name="bob") as bob, \
                tr.connect(server.url, token="owner", name="owner") as owner:
            kept = [torch.zeros(MiB // 4).send(alice), torch.zeros(MiB // 2).send(bob)]
            assert alice.memory().clients == (alice.client_id,) and alice.memory().held == (MiB,)
            everyone = owner.memory()
            assert everyone.held_by(alice.client_id) == MiB and everyone.held_by(bob.client_id) == 2 * MiB
            assert "64.0 MiB" in str(everyone) and f"{bob.client_id}: 2.0 MiB" in str(everyone)
            del kept
    finally:
        server.stop()
