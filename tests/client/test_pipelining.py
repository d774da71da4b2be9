"""Pipelined dispatch: ops return at once and travel in batches; only values synchronise."""
from __future__ import annotations

import gc
import signal

import pytest
import torch

import torchremote as tr


class Spy:
    """Counts the round trips and websocket messages a client makes."""

    def __init__(self, worker: tr.Worker, monkeypatch) -> None:
        self.round_trips = 0
        self.frames = 0
        request, call_sync = worker._request, worker._call_sync

        def counted(fn):
            def wrapper(*a, **k):
                self.round_trips += 1
                return fn(*a, **k)
            return wrapper

        monkeypatch.setattr(worker, "_request", counted(request))
        monkeypatch.setattr(worker, "_call_sync", counted(call_sync))
        send = worker._connection.send_locked

        def send_counted(chunks, **options):
            self.frames += 1
            return send(chunks, **options)

        monkeypatch.setattr(worker._connection, "send_locked", send_counted)


def test_ops_make_no_round_trip_and_values_do(bob, monkeypatch):
    x = torch.arange(6.).reshape(2, 3).send(bob)
    spy = Spy(bob, monkeypatch)
    y = ((x + 1) * 2).relu().sum(0).softmax(-1)
    x.add_(1)
    z = x.T @ x
    assert spy.round_trips == 0 and y.shape == (3,) and z.shape == (3, 3)
    for sync, expected in ((lambda: y.get(), 1), (lambda: z.sum().item(), 1), (lambda: bool(x.any()), 1),
                           (lambda: x.tolist(), 1), (lambda: x.nonzero(), 1), (lambda: bob.sync(), 1)):
        before = spy.round_trips
        sync()
        assert spy.round_trips - before == expected


def test_queued_ops_travel_as_one_batch(bob, monkeypatch):
    x = torch.zeros(4).send(bob)
    bob.sync()
    spy = Spy(bob, monkeypatch)
    with bob._lock:  # the writer thread cannot send meanwhile; this thread can (the lock is reentrant)
        for _ in range(300):
            x = x + 1
            del_me = x * 2  # noqa: F841  (dropped at once: its release rides along too)
        assert spy.frames == 0
        assert x.get().equal(torch.full((4,), 300.))
    assert spy.frames == 1  # 600 ops, their releases and the fetch: one message


def test_ops_run_in_order(bob):
    local = torch.zeros(5)
    x = local.clone().send(bob)
    for i in range(50):
        for t in (x, local):
            t.mul_(0.5).add_(i)
            t[i % 5] = t.sum() / 7
            t.clamp_(max=40)
    assert x.get().equal(local)


def test_a_deferred_error_surfaces_at_the_next_sync_and_names_the_op(bob):
    x = torch.ones(3).send(bob)
    x[torch.tensor([5])]  # meta cannot see it; the worker can
    with pytest.raises(IndexError) as info:
        bob.sync()
    notes = "\n".join(info.value.__notes__)
    assert "torch.Tensor.__getitem__ (asynchronous op #" in notes and "belongs to an earlier call" in notes
    bob.sync()  # reported once
    assert (x + 1).get().equal(torch.full((3,), 2.))


def test_queued_ops_and_releases_reach_the_worker_without_a_sync(fresh_server):
    """The background writer sends what callers queue, whether or not anyone waits for a value."""
    from conftest import wait_until
    w = tr.connect(fresh_server.url)
    x = torch.ones(3).send(w)
    y = x * 2
    held = lambda: sorted(r.id for r in fresh_server.objects() if r.owner == w.client_id)  # noqa: E731
    both = sorted([x.id, y.id])
    assert wait_until(lambda: held() == both, timeout=5)
    del y
    gc.collect()
    assert wait_until(lambda: held() == [x.id], timeout=5)  # the release went too
    w.close()


def test_pipelined_results_dropped_early_are_freed(fresh_server):
    w = tr.connect(fresh_server.url)
    x = torch.ones(100).send(w)
    for _ in range(1000):
        x = x + 1  # every intermediate dies as soon as the next exists
    keep = x
    gc.collect()
    w.sync()
    rows = [r for r in fresh_server.objects() if r.owner == w.client_id]
    assert [r.id for r in rows] == [keep.id]
    assert keep.get().equal(torch.full((100,), 1001.))
    w.close()


def test_a_stalled_worker_does_not_hold_up_the_others(worker_process):
    slow, fast = worker_process("--id", "slow"), worker_process("--id", "fast")
    a, b = tr.connect(slow.url), tr.connect(fast.url)
    xa, xb = torch.ones(3).send(a), torch.ones(3).send(b)
    a.sync()
    slow.proc.send_signal(signal.SIGSTOP)  # "slow" stops answering
    try:
        ya = xa * 2  # queued for "slow": returns at once
        for _ in range(20):
            xb = xb + 1
        assert xb.get().equal(torch.full((3,), 21.))  # "fast" is unaffected
    finally:
        slow.proc.send_signal(signal.SIGCONT)
    assert ya.get().equal(torch.full((3,), 2.))
    a.close(), b.close()
