"""Collectives between workers: values equal the local reduction, bytes go worker to worker, a
private input is refused on every rank (none left waiting), and data-parallel training over 2 and
4 workers equals one model trained on the whole batches."""
from __future__ import annotations

import time

import pytest
import torch

import torchremote as tr
from conftest import assert_data_parallel_equals_one_model


@pytest.fixture
def servers():
    started = [tr.start_worker(id=f"rank{i}") for i in range(4)]
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def workers(servers):
    clients = [tr.connect(s.url) for s in servers]
    yield clients
    for c in clients:
        c.close()


class SentBytes:
    """What the client writes to each worker's connection (commands and tensor bytes alike)."""

    def __init__(self, workers, monkeypatch) -> None:
        self.total = 0
        for w in workers:
            send = w._connection.send_locked

            def counted(chunks, send=send, **options):
                self.total += sum(len(c) for c in chunks)
                return send(chunks, **options)

            monkeypatch.setattr(w._connection, "send_locked", counted)


@pytest.mark.parametrize("op, reduce", [("sum", lambda s: s.sum(0)), ("avg", lambda s: s.mean(0)),
                                        ("max", lambda s: s.amax(0)), ("min", lambda s: s.amin(0))])
def test_all_reduce_equals_the_local_reduction(workers, op, reduce):
    local = [torch.randn(5, 3) for _ in workers]
    xs = [t.send(w) for t, w in zip(local, workers)]
    assert tr.all_reduce_(xs, op) == xs
    want = reduce(torch.stack(local))
    for x in xs:
        torch.testing.assert_close(x.get(), want)


def test_broadcast_and_all_gather(workers):
    local = [torch.randn(2, 4) for _ in workers]
    gathered = tr.all_gather([t.send(w) for t, w in zip(local, workers)])
    for rank, pointers in enumerate(gathered):
        assert all(p._worker is workers[rank] for p in pointers)
        assert [torch.equal(p.get(), t) for p, t in zip(pointers, local)] == [True] * 4
    xs = [t.T.send(w) for t, w in zip(local, workers)]  # not contiguous where it lands: still in place
    tr.broadcast_(xs, src=2)
    assert all(torch.equal(x.get(), local[2].T) for x in xs)


def test_no_tensor_bytes_pass_through_the_client(workers, monkeypatch):
    xs = [torch.ones(1 << 20).send(w) for w in workers]  # 4 MiB each
    tr.group(workers)
    for w in workers:
        w.sync()
    spy = SentBytes(workers, monkeypatch)
    tr.all_reduce_(xs, "sum")
    for w in workers:
        w.sync()
    assert spy.total < 4096, spy.total
    assert xs[3][:3].get().tolist() == [4., 4., 4.]


def test_a_private_input_is_refused_on_every_rank_and_none_waits(servers, workers):
    servers[0].publish(torch.ones(3), tags=["#secret"], private=True)
    (secret,) = workers[0].search("#secret")
    xs = [secret * 1, *[torch.zeros(3).send(w) for w in workers[1:]]]
    started = time.perf_counter()
    tr.all_reduce_(xs, "sum")
    with pytest.raises(tr.ApprovalRequired):
        workers[0].sync()
    for w in workers[1:]:
        with pytest.raises(PermissionError, match="refused the collective"):
            w.sync()
        assert w.search("#nothing") == []  # still serving
    assert time.perf_counter() - started < 30  # told at once, not after the group's timeout
    assert xs[1].get().tolist() == [0., 0., 0.]  # nothing was exchanged


def test_a_collective_takes_one_tensor_per_worker(workers):
    with pytest.raises(ValueError, match="one tensor per worker"):
        tr.all_reduce_([torch.ones(2).send(workers[0]), torch.ones(2).send(workers[0])])
    with pytest.raises(TypeError, match="one RemoteTensor per worker"):
        tr.all_reduce_([torch.ones(2), torch.ones(2).send(workers[0])])


def test_replicate_sends_the_model_once_and_broadcasts_it(workers, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 64))
    model[2].weight = model[0].weight  # tied weights stay tied on every replica
    tr.group(workers)
    spy = SentBytes(workers, monkeypatch)
    replicas = tr.replicate(model, workers)
    for w in workers:
        w.sync()
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert nbytes < spy.total < 2 * nbytes  # once, not four times
    for replica in replicas:
        assert replica[2].weight is replica[0].weight
        for (name, got), want in zip(replica.state_dict().items(), model.state_dict().values()):
            assert torch.equal(got.get(), want), name
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is left here


@pytest.mark.parametrize("n", [2, 4])
def test_data_parallel_training_equals_one_model_on_the_whole_batches(workers, n):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    assert_data_parallel_equals_one_model(model, workers[:n], lambda p: torch.optim.AdamW(p, lr=1e-2))


def test_a_rank_whose_input_failed_earlier_does_not_leave_the_others_waiting(workers):
    xs = [torch.ones(3).send(w) for w in workers]
    tr.group(workers)
    bad = torch.ones(2).send(workers[1])[torch.tensor([5]).send(workers[1])]  # fails on the worker
    xs[1] = xs[1] + bad.sum()  # its output is poisoned by the failure
    started = time.perf_counter()
    tr.all_reduce_(xs, "sum")
    for rank, w in enumerate(workers):
        with pytest.raises((PermissionError, IndexError, RuntimeError)):
            w.sync()
    assert time.perf_counter() - started < 30
