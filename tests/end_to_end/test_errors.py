"""Failures: the same exception types as local torch, clear refusals, dead workers within seconds."""
from __future__ import annotations

import signal
import sys
import time

import pytest
import torch

import torchremote as tr
from torchremote.wire import messages as m


def local_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


@pytest.mark.parametrize("case", [
    lambda t: t(torch.ones(2, 3)) @ t(torch.ones(2, 3)),         # shape mismatch: RuntimeError
    lambda t: t(torch.ones(3)) + t(torch.ones(4)),
    lambda t: t(torch.ones(3))[5],                               # bad index: IndexError
    lambda t: t(torch.ones(3)).view(2, 2),
    lambda t: torch.cat([t(torch.ones(2)), t(torch.ones(2, 2))]),
    lambda t: t(torch.ones(2, 2)).item(),
    lambda t: t(torch.ones(3)).index_select(0, torch.tensor([9])).tolist(),
    lambda t: torch.linalg.inv(t(torch.zeros(2, 2))).tolist(),  # torch.linalg.LinAlgError
], ids=["matmul", "broadcast", "index", "view", "cat", "item", "index_select", "inv"])
def test_remote_errors_have_the_local_type_and_message(bob, case):
    expected = local_error(lambda: case(lambda t: t))
    got = local_error(lambda: case(lambda t: t.send(bob)))
    assert type(got) is type(expected)
    assert str(expected).splitlines()[0] in str(got)
    assert any("raised on worker 'bob'" in n for n in got.__notes__)
    assert (torch.ones(2).send(bob) + 1).get().equal(torch.full((2,), 2.))  # the connection goes on


@pytest.mark.parametrize("case", [
    lambda t: t(torch.ones(3, dtype=torch.long)).requires_grad_(),
    lambda t: setattr(t(torch.ones(3, dtype=torch.long)), "requires_grad", True),
    lambda t: (t(torch.ones(3)).requires_grad_() * 2).requires_grad_(False),
    lambda t: t(torch.ones(3)).sum().backward(),
    lambda t: (t(torch.ones(3)).requires_grad_() * 2).backward(),
    lambda t: t(torch.ones(3)).retain_grad(),
    lambda t: torch.autograd.grad(t(torch.ones(3)).requires_grad_().sum(), t(torch.ones(3)).requires_grad_()),
], ids=["int", "int-setter", "non-leaf", "no-grad-backward", "non-scalar", "retain", "unused"])
def test_autograd_errors_are_raised_at_once_as_torch_raises_them(bob, case):
    """The client's autograd bookkeeping knows these without asking the worker."""
    expected = local_error(lambda: case(lambda t: t))
    got = local_error(lambda: case(lambda t: t.send(bob)))
    assert type(got) is type(expected)
    assert str(got) == str(expected)
    assert (torch.ones(2).send(bob) + 1).get().equal(torch.full((2,), 2.))


def test_an_error_meta_cannot_see_surfaces_at_the_next_sync_and_poisons_dependents(bob):
    x = torch.ones(3).send(bob)
    bad = x[torch.tensor([10])]  # meta infers the shape; only the worker knows 10 is out of range
    assert bad.shape == (1,)
    line = sys._getframe().f_lineno - 2
    good = x * 2
    with pytest.raises(IndexError) as info:
        good.get()  # first sync point after the failure, of an unrelated tensor: it names the call
    (note,) = [n for n in info.value.__notes__ if "belongs to an earlier call" in n]
    assert f"torch.Tensor.__getitem__ (asynchronous op #" in note and f"test_errors.py:{line}, in test_" in note
    assert good.get().equal(torch.full((3,), 2.))  # reported once; unrelated results are fine
    with pytest.raises(IndexError):
        (bad + 1).get()  # anything computed from the failed op fails with its error


def test_an_asynchronous_error_inside_a_layer_names_the_users_line(bob):
    layer = tr.send(torch.nn.Embedding(3, 2), bob)
    looked_up = layer(torch.tensor([7]).send(bob)); line = sys._getframe().f_lineno  # noqa: E702
    with pytest.raises(IndexError) as info:
        (torch.ones(2).send(bob) + 1).get()  # unrelated
    (note,) = [n for n in info.value.__notes__ if "belongs to an earlier call" in n]
    assert "torch.nn.functional.embedding" in note and f"test_errors.py:{line}, in test_an_async" in note
    with pytest.raises(IndexError):
        looked_up.get()


def test_unknown_op_is_refused_and_the_connection_stays_usable(bob):
    with pytest.raises(tr.WorkerPermissionError, match="allow-list"):
        bob._call_sync("os.system", ("echo pwned",), {})
    with pytest.raises(tr.WorkerPermissionError):
        bob._call_sync("torch.load", ("/etc/passwd",), {})
    assert (torch.ones(2).send(bob) * 3).sum().item() == 6.0


def test_a_call_that_cannot_be_named_is_a_clear_local_error(bob):
    x = torch.ones(2).send(bob)
    with pytest.raises(NotImplementedError, match="cannot run"):
        x.untyped_storage()


def test_unsendable_arguments_fail_alone_and_lose_nothing_queued(bob):
    x = torch.ones(2).send(bob)
    y = x * 5  # queued, not yet sent
    with pytest.raises(TypeError, match="cannot send"):
        x[0] = object()
    with pytest.raises(TypeError, match="64 bits"):
        x.add(2**70)
    with pytest.raises(TypeError, match="sparse"):
        x.add(torch.ones(2).to_sparse())  # a local operand the wire cannot carry
    with pytest.raises(TypeError, match="dtype"):
        torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8).send(bob)
    assert y.get().equal(torch.full((2,), 5.))


def test_connecting_to_nothing_fails_fast():
    start = time.monotonic()
    with pytest.raises(tr.WorkerConnectionError, match="cannot connect"):
        tr.connect("ws://127.0.0.1:9", timeout=3)
    assert time.monotonic() - start < 5


def test_a_dead_worker_raises_connection_error_within_seconds(worker_process):
    worker = worker_process("--id", "doomed")
    bob = tr.connect(worker.url)
    x = torch.ones(3).send(bob)
    assert (x + 1).sum().item() == 6.0
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(timeout=10)
    start = time.monotonic()
    with pytest.raises(tr.WorkerConnectionError):
        for _ in range(100):  # whichever call first learns of the death
            (x + 1).sum().item()
            time.sleep(0.05)
    assert time.monotonic() - start < 5
    with pytest.raises(ConnectionError):
        x.get()
    bob.close()


@pytest.mark.parametrize("how", ["stop()", "SIGTERM"])
def test_a_clean_worker_stop_says_so_and_is_not_retried(worker_process, caplog, how):
    if how == "stop()":
        server = tr.start_worker(id="leaving")
        url, stop = server.url, server.stop
    else:
        worker = worker_process("--id", "leaving")
        url, stop = worker.url, lambda: (worker.proc.send_signal(signal.SIGTERM), worker.proc.wait(timeout=10))
    client = tr.connect(url)
    x = torch.ones(3).send(client)
    assert (x + 1).sum().item() == 6.0
    stop()
    start = time.monotonic()
    with pytest.raises(tr.WorkerConnectionError) as info:
        for _ in range(100):  # the next call that learns of it
            (x + 1).sum().item()
            time.sleep(0.05)
    assert "worker 'leaving' shut down" in str(info.value), info.value
    assert time.monotonic() - start < 5
    assert not any("reconnecting" in r.getMessage() for r in caplog.records)
    with pytest.raises(tr.WorkerConnectionError, match="shut down"):
        x.get()
    client.close()


def test_a_bad_token_is_a_permission_error():
    server = tr.start_worker(id="locked", token="s3cret")
    try:
        with pytest.raises(tr.WorkerPermissionError, match="token"):
            tr.connect(server.url, token="wrong")
        with pytest.raises(PermissionError):
            tr.connect(server.url)
        with tr.connect(server.url, token="s3cret") as ok:
            assert (torch.ones(1).send(ok) + 1).item() == 2.0
    finally:
        server.stop()


def test_binding_beyond_loopback_without_a_token_is_refused():
    with pytest.raises(tr.WorkerPermissionError, match="without a token"):
        tr.start_worker(id="open", host="0.0.0.0", port=0)


def test_garbage_frames_get_an_error_and_the_worker_keeps_serving(server):
    from websockets.sync.client import connect
    from torchremote.wire import codec
    from torchremote.wire.protocol import ClientProtocol
    proto = ClientProtocol("raw")
    with connect(server.url, proxy=None, compression=None) as ws:
        ws.send(b"".join(proto.hello()))
        proto.receive_welcome(ws.recv(timeout=5))
        ws.send(b"\x00garbage\xff" * 10)
        ack, failure = proto.receive_data(ws.recv(timeout=5))
        assert ack == m.Ack(1)  # every reply says how many of the client's frames ran
        assert isinstance(failure, m.Failure) and failure.error.type == "torchremote.ProtocolError"
        ws.send(b"".join(proto.data_to_send() or []) or b"".join(codec.encode([m.Sync(99)])))
        ack, reply = proto.receive_data(ws.recv(timeout=5))
        assert (ack, reply) == (m.Ack(2), m.Reply(99, None))
    with tr.connect(server.url) as other:
        assert (torch.ones(2).send(other) * 2).sum().item() == 4.0


def test_sparse_results_are_a_clear_error_never_a_hang(bob):
    x = torch.randn(3, 3).send(bob)
    with pytest.raises(NotImplementedError, match="to_sparse.*strided"):
        x.to_sparse()
    assert (x * 0).sum().item() == 0.0


def test_a_worker_side_failure_of_a_waited_call_reaches_the_caller(bob):
    from torchremote.wire import messages as m
    # a worker answering a failure under the op's id (not a request id) must still wake the caller
    from concurrent.futures import Future
    future = bob._pending[10**9] = Future()
    bob._deliver(m.Failure(None, 10**9, m.ErrorInfo("RuntimeError", "boom")))
    with pytest.raises(RuntimeError, match="boom"):
        future.result(timeout=1)
