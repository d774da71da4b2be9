"""Resumable sessions: connections cut by a fault-injecting proxy on loopback, in every phase.

Each test drives a real worker (a thread) through `FaultProxy`; the client must pause, resume and
get every value right, with every op run exactly once."""
from __future__ import annotations

import logging
import re
import threading
import time

import pytest
import torch

import torchremote as tr
from torchremote.testing.fault_proxy import TO_CLIENT, TO_WORKER, FaultProxy
from torchremote.wire import resume, websocket
from torchremote.wire.errors import SessionInUseError
from torchremote.wire.protocol import ClientProtocol

from conftest import wait_until

MIB = 1 << 20


@pytest.fixture
def server():
    s = tr.start_worker(id="resumable", resume_grace=30.0)
    yield s
    s.stop()


@pytest.fixture
def proxy(server):
    p = FaultProxy(server.port)
    yield p
    p.stop()


@pytest.fixture
def alice(proxy):
    w = tr.connect(proxy.url, name="alice")
    yield w
    w.close()


def client_objects(server) -> list:
    return [r for r in server.objects() if r.owner != server.id]


def test_two_thousand_adds_across_ten_cuts_end_at_exactly_two_thousand(alice, proxy):
    x = torch.zeros(1).send(alice)
    for i in range(2000):
        x.add_(1)
        if i % 200 == 100:
            proxy.cut()
            # the client resumes by itself, with no call waiting, while ops keep being queued
            assert wait_until(lambda: proxy.connections == 2 + i // 200, timeout=10)
    assert x.item() == 2000.0
    assert proxy.cuts == 10 and proxy.connections == 11


def test_a_cut_in_mid_batch(alice, proxy):
    x = torch.zeros(1000).send(alice)
    alice.sync()
    proxy.cut_after(TO_WORKER, 3000)  # a few hundred ops into the next frames
    for _ in range(500):
        x.add_(1)
    x.add_(torch.ones(1000))  # a frame with local data in it, too
    assert torch.equal(x.get(), torch.full((1000,), 501.0))
    assert proxy.cuts == 1 and not proxy.armed()


def test_a_cut_in_a_chunked_send(alice, proxy):
    data = torch.randn(16 * MIB // 4)  # 16 MiB: 4 chunks
    proxy.cut_after(TO_WORKER, 10 * MIB)
    x = data.send(alice)
    assert proxy.cuts == 1
    assert torch.equal(x.get(), data)


def test_a_cut_in_a_fetch(alice, proxy):
    x = torch.arange(16 * MIB // 4, dtype=torch.float32).send(alice)
    alice.sync()
    proxy.cut_after(TO_CLIENT, 10 * MIB)
    assert torch.equal(x.get(), torch.arange(16 * MIB // 4, dtype=torch.float32))
    assert proxy.cuts == 1


def test_a_cut_after_the_worker_ran_a_batch_and_before_its_replies_went_out(alice, proxy):
    x = torch.zeros(3).send(alice)
    alice.sync()
    proxy.cut_after(TO_CLIENT, 0)  # the worker's next bytes, its replies, never arrive
    x.add_(1)
    assert x.sum().item() == 3.0  # the batch [add_, sum] ran once, and its reply came again
    assert proxy.cuts == 1
    assert x.sum().item() == 3.0


def test_cuts_during_the_resume_handshake(alice, proxy):
    x = torch.zeros(1).send(alice)
    alice.sync()
    proxy.cut_handshakes(2, after=60)     # the next two connections die in their HTTP upgrade
    proxy.cut_handshakes(1, after=300)    # and one in its Hello
    proxy.cut()
    x.add_(1)
    assert x.item() == 1.0
    assert proxy.connections == 5 and not proxy.armed()


def test_a_cut_during_the_first_handshake_is_a_clear_error_or_retried(proxy):
    proxy.cut_handshakes(1, after=60)
    with pytest.raises(tr.WorkerConnectionError):
        tr.connect(proxy.url)
    proxy.cut_handshakes(1, after=60)
    with tr.connect(proxy.url, retry_for=10) as w:
        assert (torch.ones(2).send(w) * 3).sum().item() == 6.0


def test_a_stall_longer_than_the_keepalive_is_resumed(alice, proxy, monkeypatch):
    monkeypatch.setattr(websocket, "PING_INTERVAL_S", 0.2)
    monkeypatch.setattr(websocket, "PING_TIMEOUT_S", 0.3)
    x = torch.zeros(1).send(alice)
    alice.sync()
    proxy.stall()
    x.add_(1)
    started = time.monotonic()
    assert x.item() == 1.0
    assert time.monotonic() - started < 10
    assert proxy.connections >= 2


def test_a_training_loop_cut_five_times_gives_the_same_losses_bit_for_bit(server, proxy):
    def train(url: str, cut_at: set[int]) -> list[float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        data = torch.randn(64, 8)
        target = data.sum(1, keepdim=True).sin()
        with tr.connect(url) as w:
            model = tr.send(model, w)
            x, y = data.send(w), target.send(w)
            opt = torch.optim.Adam(model.parameters(), lr=0.01)
            losses = []
            for step in range(25):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                if step in cut_at:
                    proxy.cut()  # between the forward pass and the backward pass
                loss.backward()
                opt.step()
                losses.append(loss.item())
            return losses

    uncut = train(server.url, set())
    cut = train(proxy.url, {2, 7, 12, 17, 22})
    assert proxy.cuts == 5
    assert cut == uncut  # exact float equality, every step


def test_one_warning_line_per_cut(alice, proxy, caplog):
    x = torch.zeros(1).send(alice)
    with caplog.at_level(logging.WARNING, logger="torchremote"):
        for _ in range(3):
            alice.sync()
            proxy.cut()
            x.add_(1)
            assert x.item() in (1.0, 2.0, 3.0)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "torchremote"]
    assert len(warnings) == 3
    assert all("reconnecting" in r.getMessage() for r in warnings)


def test_after_the_grace_period_the_client_gets_an_error_and_nothing_is_left():
    server = tr.start_worker(id="brief", resume_grace=1.0)
    proxy = FaultProxy(server.port)
    try:
        w = tr.connect(proxy.url)
        xs = [torch.ones(10).send(w) for _ in range(5)]
        w.sync()
        assert len(client_objects(server)) == 5
        proxy.refuse()
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(tr.WorkerConnectionError, match="grace period"):
            xs[0].sum().item()
        assert 0.9 <= time.monotonic() - started < 10
        assert wait_until(lambda: client_objects(server) == [], timeout=5)
        with pytest.raises(tr.WorkerConnectionError):  # and later calls fail at once
            xs[1].sum().item()
        w.close()
    finally:
        proxy.stop()
        server.stop()


def test_objects_are_kept_while_a_dropped_client_may_come_back(alice, proxy, server):
    xs = [torch.ones(10).send(alice) for _ in range(3)]
    alice.sync()
    proxy.refuse()
    proxy.cut()
    time.sleep(0.5)
    assert len(client_objects(server)) == 3  # dropped, not freed
    proxy.refuse(False)
    assert xs[2].sum().item() == 10.0
    alice.close()  # close() frees at once, grace or not
    assert wait_until(lambda: client_objects(server) == [], timeout=5)


def raw_resume(url: str, resume: str, token: str | None = None):
    """Offer a resume token on a connection of our own; returns the Welcome or raises the refusal."""
    ws = websocket.open_client(url, timeout=5, ssl=None, max_size=1 << 20)
    try:
        protocol = ClientProtocol("intruder", token)
        ws.send(protocol.hello(resume, 0))
        return protocol.receive_welcome(ws.receive(5))
    finally:
        ws.close()


def test_a_resume_token_works_only_for_its_session_and_not_while_it_is_live(alice, server, proxy):
    token = alice._resume_token
    assert len(token) >= 40
    with pytest.raises(SessionInUseError, match="still live"):
        raw_resume(server.url, token)
    with pytest.raises(tr.WorkerConnectionError, match="cannot be resumed"):
        raw_resume(server.url, token[:-4] + "AAAA")
    bob = tr.connect(server.url, name="bob")
    try:
        assert bob._resume_token != token
        b = torch.full((2,), 7.0).send(bob)
        a = torch.full((2,), 1.0).send(alice)
        proxy.cut()
        assert a.sum().item() == 2.0 and b.sum().item() == 14.0  # each resumed its own namespace
        rows = {r.owner for r in client_objects(server)}
        assert rows == {alice.client_id, bob.client_id}
    finally:
        bob.close()


def test_a_resume_still_needs_the_client_token():
    server = tr.start_worker(id="locked", token="s3cret", resume_grace=30.0)
    proxy = FaultProxy(server.port)
    try:
        w = tr.connect(proxy.url, token="s3cret")
        x = torch.ones(2).send(w)
        w.sync()
        proxy.refuse()
        proxy.cut()
        wait_until(lambda: [s.live for s in server._resumable.sessions()] == [False], timeout=5)
        with pytest.raises(tr.WorkerPermissionError, match="token"):
            raw_resume(server.url, w._resume_token, token="wrong")
        proxy.refuse(False)
        assert x.sum().item() == 2.0
        w.close()
    finally:
        proxy.stop()
        server.stop()


def test_concurrent_callers_all_get_their_values_across_cuts(alice, proxy):
    x = torch.arange(100.0).send(alice)
    results: dict[int, float] = {}

    def caller(k: int) -> None:
        for i in range(30):
            results[k * 100 + i] = (x * k + i).sum().item()

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for _ in range(4):
        time.sleep(0.05)
        proxy.cut()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert results == {k * 100 + i: float(4950 * k + 100 * i) for k in range(4) for i in range(30)}


def test_resuming_is_off_with_a_grace_of_zero():
    server = tr.start_worker(id="strict", resume_grace=0)
    proxy = FaultProxy(server.port)
    try:
        w = tr.connect(proxy.url)
        x = torch.ones(1).send(w)
        w.sync()
        assert w._resume_token == ""
        proxy.cut()
        with pytest.raises(tr.WorkerConnectionError):
            for _ in range(100):
                x.sum().item()
                time.sleep(0.02)
        assert wait_until(lambda: client_objects(server) == [], timeout=5)
    finally:
        proxy.stop()
        server.stop()


def test_the_worker_acknowledges_so_neither_side_keeps_frames_for_long(alice, server):
    x = torch.zeros(1).send(alice)
    for _ in range(200):
        x.add_(1)
        alice._flush()
    # acknowledged while nobody waits (the worker acks every ACK_EVERY_FRAMES frames at least)
    assert wait_until(lambda: alice._connection.sent.kept < resume.ACK_EVERY_FRAMES, timeout=5)
    assert x.item() == 200.0
    alice.sync()
    alice.sync()  # its frame says the first sync's reply, and everything before it, arrived
    (state,) = server._resumable.sessions()
    assert state.replies.kept == 1  # only the reply to the last request
    assert alice._connection.sent.kept == 0


def test_a_worker_process_started_with_resume_grace_resumes_and_then_frees(worker_process, tmp_path):
    log = tmp_path / "worker.log"
    worker = worker_process("--id", "proc", "--resume-grace", "2", "--log-file", str(log))
    proxy = FaultProxy(int(worker.url.rsplit(":", 1)[1]))
    try:
        w = tr.connect(proxy.url)
        assert w._connection._grace_s == 2.0
        x = torch.zeros(4).send(w)
        for _ in range(3):
            x.add_(1)
            proxy.cut()
        assert x.sum().item() == 12.0
        proxy.refuse()
        proxy.cut()
        with pytest.raises(tr.WorkerConnectionError, match="grace period of 2 s"):
            x.sum().item()
        assert wait_until(lambda: re.search(r"no resume within 2 s; freed [1-9]", log.read_text()), timeout=5)
        with tr.connect(worker.url) as other:  # and serves on
            assert (torch.ones(2).send(other) + 1).sum().item() == 4.0
        w.close()
    finally:
        proxy.stop()
