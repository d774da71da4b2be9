"""protocol.py + execution.py wired back to back: the whole protocol, no sockets."""
from __future__ import annotations

import pytest
import torch

from torchremote.wire import codec as wire, messages as m
from torchremote.wire.errors import ProtocolError
from torchremote.wire.protocol import ClientProtocol, ServerProtocol
from torchremote.worker.execution import Session
from torchremote.worker.store import ObjectStore


class Pair:
    def __init__(self) -> None:
        self.client, self.server = ClientProtocol("t"), ServerProtocol()
        self.store = ObjectStore("bob")
        hello = self.server.receive_hello(b"".join(self.client.hello()))
        assert hello.client_name == "t"
        self.client.receive_welcome(b"".join(self.server.welcome("bob", "t#1", 1 << 20)))
        self.session = Session(self.store, "t#1")

    def roundtrip(self) -> list:
        data = b"".join(self.client.data_to_send())
        replies = self.session.run(self.server.receive_data(data))
        return [event for frame in self.server.send(replies)
                for event in self.client.receive_data(b"".join(frame))]


@pytest.fixture
def pair():
    return Pair()


def test_pipelined_ops_run_in_order_and_results_are_usable_before_they_exist(pair):
    x = pair.client.put(torch.tensor([1., 2.]))
    op = pair.client.call("torch.add", (x, x), {}, reply=False, grad_enabled=True)
    op2 = pair.client.call("torch.Tensor.mul_", (m.ClientRef(op, 0), 3), {}, reply=False, grad_enabled=True)
    req = pair.client.request(m.Fetch, m.ClientRef(op, 0))
    assert pair.client.pending_commands == 4
    (reply,) = pair.roundtrip()  # one frame out, one answer back: the async ops answered nothing
    assert reply.req_id == req and torch.equal(reply.value, torch.tensor([6., 12.]))
    assert m.ClientRef(op2, 0) in pair.session.objects  # mul_ output registered (it is op's tensor)


def test_sync_call_replies_metadata_and_same_as_for_in_place(pair):
    x = pair.client.put(torch.zeros(2, 3))
    op = pair.client.call("torch.Tensor.add_", (x, 1), {}, reply=True, grad_enabled=True)
    op2 = pair.client.call("torch.max", (x, 1), {}, reply=True, grad_enabled=True)
    op3 = pair.client.call("torch.Tensor.sum", (x,), {}, reply=True, grad_enabled=True)
    op4 = pair.client.call("torch.Tensor.item", (m.ClientRef(op3, 0),), {}, reply=True, grad_enabled=True)
    r1, r2, r3, r4 = pair.roundtrip()
    assert [r.req_id for r in (r1, r2, r3, r4)] == [op, op2, op3, op4]
    assert r1.value == m.SameAs(x)
    assert type(r2.value) is torch.return_types.max
    assert r2.value.values == m.TensorMeta((2,), (1,), 0, torch.float32, False)
    assert r2.value.indices.dtype is torch.int64
    assert r3.value.shape == () and r4.value == 6.0


def test_a_failed_op_fails_alone_and_poisons_only_its_dependents(pair):
    x = pair.client.put(torch.ones(3))
    bad = pair.client.call("torch.Tensor.index_select", (x, 0, torch.tensor([7])), {}, reply=False,
                           grad_enabled=True)
    dependent = pair.client.call("torch.Tensor.exp", (m.ClientRef(bad, 0),), {}, reply=False, grad_enabled=True)
    good = pair.client.call("torch.Tensor.neg", (x,), {}, reply=False, grad_enabled=True)
    f1 = pair.client.request(m.Fetch, m.ClientRef(dependent, 0))
    f2 = pair.client.request(m.Fetch, m.ClientRef(good, 0))
    failure, dep_failure, ok = pair.roundtrip()
    assert failure.req_id is None and failure.op_id == bad  # reported once, at its root
    assert failure.error.type == "IndexError" and failure.error.op == "torch.Tensor.index_select"
    assert dep_failure.req_id == f1 and dep_failure.error == failure.error
    assert ok.req_id == f2 and torch.equal(ok.value, -torch.ones(3))


def test_release_frees_and_unknown_refs_are_clear_errors(pair):
    x = pair.client.put(torch.ones(3))
    pair.roundtrip()
    assert len(pair.session.objects) == 1
    req = pair.client.request(m.Fetch, x)
    pair.client.release(x)  # dropped after the fetch was queued: released after it, same frame
    (reply,) = pair.roundtrip()
    assert reply.req_id == req and pair.session.objects == {}
    y = pair.client.put(torch.ones(2))
    pair.client.release(y)  # dropped before the listing was queued: gone before it runs
    pair.client.request(m.ListObjects)
    (listing,) = pair.roundtrip()
    assert listing.value == [] and pair.session.objects == {}
    req = pair.client.request(m.Fetch, x)
    (failure,) = pair.roundtrip()
    assert failure.req_id == req and failure.error.type == "LookupError"


def test_ops_outside_the_allow_list_are_refused_and_the_session_goes_on(pair):
    op = pair.client.call("os.system", ("touch /tmp/pwned",), {}, reply=True, grad_enabled=True)
    req = pair.client.request(m.Sync)
    failure, ok = pair.roundtrip()
    assert failure.req_id == op and failure.error.type == "torchremote.WorkerPermissionError"
    assert "allow-list" in failure.error.message and ok.req_id == req


def test_published_data_search_and_registry(pair):
    pair.store.publish(torch.arange(3.), ("#X", "#train"), "xs", allow_get=False)
    pair.store.publish(torch.ones(2), ("#Y",), "", allow_get=True)
    s = pair.client.request(m.Search, ("#X",))
    s2 = pair.client.request(m.Search, ("#X", "#nope"))
    lo = pair.client.request(m.ListObjects)
    r1, r2, r3 = pair.roundtrip()
    assert [r.req_id for r in (r1, r2, r3)] == [s, s2, lo]
    (hit,) = r1.value
    assert hit.tags == ("#X", "#train") and hit.meta.shape == (3,) and r2.value == []
    assert [row.id for row in r3.value] == ["p1", "p2"]
    fetch = pair.client.request(m.Fetch, hit.ref)
    op = pair.client.call("torch.Tensor.sum", (hit.ref,), {}, reply=False, grad_enabled=True)
    total = pair.client.request(m.Fetch, m.ClientRef(op, 0))
    refused, refused_too = pair.roundtrip()  # the sum ran; neither it nor the data may leave
    assert refused.req_id == fetch and refused.error.type == "torchremote.ApprovalRequired"
    assert refused_too.req_id == total and "sum(#X)" in refused_too.error.message


def test_server_rejects_frames_that_are_not_commands(pair):
    with pytest.raises(ProtocolError):
        pair.server.receive_data(wire.encode_bytes([m.Reply(1, None)]))
    with pytest.raises(ProtocolError):
        ServerProtocol().receive_hello(wire.encode_bytes([m.Sync(1)]))
    with pytest.raises(ProtocolError, match="version"):
        ServerProtocol().receive_hello(wire.encode_bytes([m.Hello(99, "x")]))
