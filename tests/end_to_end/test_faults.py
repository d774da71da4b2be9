"""Faults and load against worker processes; every wait here is bounded."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import torchremote as tr
from conftest import ROOT, WorkerProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_killed_while_a_call_waits(worker_process):
    worker = worker_process()
    w = tr.connect(worker.url)
    a = torch.randn(600, 600).send(w)
    for _ in range(200):  # a long pipeline of real work
        a = torch.tanh(a @ a)
    outcome: dict = {}

    def wait_for_result():
        start = time.monotonic()
        try:
            a.sum().item()
            outcome["result"] = "value"
        except Exception as e:
            outcome["result"] = e
        outcome["waited"] = time.monotonic() - start

    waiter = threading.Thread(target=wait_for_result)
    waiter.start()
    time.sleep(0.3)
    killed_at = time.monotonic()
    worker.proc.kill()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "a call to a dead worker hung"
    assert isinstance(outcome["result"], tr.WorkerConnectionError)
    assert time.monotonic() - killed_at < 5
    with pytest.raises(ConnectionError):  # and new calls fail at once
        torch.ones(1).send(w)
    w.close()


def test_connect_retries_until_the_worker_is_up():
    port = free_port()
    result: dict = {}

    def client():
        try:
            with tr.connect(f"ws://127.0.0.1:{port}", retry_for=30) as w:
                result["value"] = (torch.ones(3).send(w) * 2).sum().item()
        except Exception as e:
            result["value"] = e

    t = threading.Thread(target=client)
    t.start()
    time.sleep(1.0)  # the client is already retrying
    worker = subprocess.Popen([sys.executable, "-m", "torchremote", "worker", "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": ""})
    try:
        assert worker.stdout.readline().strip() == f"ws://127.0.0.1:{port}"
        t.join(timeout=30)
        assert result.get("value") == 6.0
    finally:
        worker.kill()
        worker.wait(timeout=10)
        worker.stdout.close()


def test_connect_gives_up_after_retry_for():
    start = time.monotonic()
    with pytest.raises(tr.WorkerConnectionError, match="retried for 1 s"):
        tr.connect(f"ws://127.0.0.1:{free_port()}", retry_for=1)
    assert 0.9 < time.monotonic() - start < 5


def test_sigterm_shuts_down_cleanly_with_clients_attached():
    worker = WorkerProcess("--id", "graceful")
    try:
        w = tr.connect(worker.url)
        x = torch.ones(3).send(w)
        assert x.sum().item() == 3.0
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=20) == 0
        with pytest.raises(ConnectionError):
            for _ in range(50):
                x.sum().item()
                time.sleep(0.05)
        w.close()
    finally:
        worker.stop()


def test_many_concurrent_clients_get_correct_isolated_results(worker_process):
    worker = worker_process("--id", "busy")
    n_clients, failures = 24, []

    def client(i: int) -> None:
        try:
            with tr.connect(worker.url, name=f"c{i}") as w:
                x = torch.full((64,), float(i)).send(w)
                for _ in range(30):
                    x = x + 1
                y = torch.arange(4.).send(w) * i
                assert x.get().equal(torch.full((64,), float(i + 30)))
                assert y.sum().item() == 6.0 * i
                assert {r.owner for r in w.objects()} == {w.client_id}
        except Exception as e:  # collected: an assert in a thread would not fail the test
            failures.append((i, repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert failures == []
