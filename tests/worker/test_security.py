"""Security: who gets in, what runs, what leaves the worker, and what a client may hold."""
from __future__ import annotations

import os
import pickle
import ssl
from pathlib import Path

import msgpack
import pytest
import torch
import trustme
from websockets.sync.client import connect as raw_connect

import torchremote as tr
from torchremote.wire import codec as wire, messages as m
from torchremote.wire.protocol import ClientProtocol


# --- authentication ---------------------------------------------------------------------------------

def test_token_from_the_environment_on_both_sides(worker_process, monkeypatch):
    worker = worker_process(env={"TORCHREMOTE_TOKEN": "from-env"})
    with pytest.raises(tr.WorkerPermissionError, match="token"):
        tr.connect(worker.url)
    monkeypatch.setenv("TORCHREMOTE_TOKEN", "from-env")
    with tr.connect(worker.url) as w:
        assert (torch.ones(2).send(w) * 2).sum().item() == 4.0


def test_the_token_is_checked_before_any_command_and_never_logged(tmp_path):
    log = tmp_path / "w.log"
    server = tr.start_worker(id="w", token="correct-horse", log_file=str(log), verbose=False)
    try:
        proto = ClientProtocol("intruder", token="battery-staple")
        with raw_connect(server.url, proxy=None, compression=None) as ws:
            # commands before (or instead of) Hello are refused, and nothing of them runs
            ws.send(wire.encode_bytes([m.Put(1, torch.ones(3))]))
            (refusal,) = wire.decode(ws.recv(timeout=5))
            assert isinstance(refusal, m.Failure) and "Hello" in refusal.error.message
        with raw_connect(server.url, proxy=None, compression=None) as ws:
            ws.send(b"".join(proto.hello()))
            (refusal,) = wire.decode(ws.recv(timeout=5))
            assert refusal.error.type == "torchremote.WorkerPermissionError"
        assert server.objects() == []
    finally:
        server.stop()
    text = log.read_text()
    assert "refused" in text and "correct-horse" not in text and "battery-staple" not in text


# --- TLS ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    cert.private_key_and_cert_chain_pem.write_to_path(str(folder / "worker.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return folder / "worker.pem", client


def test_tls_round_trip_with_a_generated_certificate(certificate, worker_process):
    pem, client_context = certificate
    worker = worker_process("--certfile", str(pem), "--token-file", str(_token_file(pem.parent)))
    assert worker.url.startswith("wss://127.0.0.1:")
    with tr.connect(worker.url, token="tls-token", ssl=client_context) as w:
        x = torch.arange(5.).send(w)
        assert (x * x).sum().item() == 30.0 and x.get().equal(torch.arange(5.))


def test_tls_certificates_are_verified_by_default(certificate):
    pem, _ = certificate
    server = tr.start_worker(id="tls", certfile=str(pem))
    try:
        with pytest.raises(tr.WorkerConnectionError, match="TLS|certificate|SSL"):
            tr.connect(server.url)  # self-signed: not trusted unless the caller says so
    finally:
        server.stop()


def _token_file(folder: Path) -> Path:
    path = folder / "token"
    path.write_text("tls-token")
    return path


# --- hostile input against a worker process ------------------------------------------------------------

class Touch:
    """Unpickling this would create a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_hostile_frames_run_nothing_and_the_worker_keeps_serving(worker_process, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Touch(str(marker)))
    worker = worker_process("--id", "target")
    proto = ClientProtocol("attacker")
    with raw_connect(worker.url, proxy=None, compression=None) as ws:
        ws.send(b"".join(proto.hello()))
        proto.receive_welcome(ws.recv(timeout=10))
        hostile = [
            payload,                                           # a bare pickle
            m.MAGIC + payload,                                 # a pickle behind our magic
            os.urandom(4096),                                  # noise
            b"\xff" * 100_000,                                 # more noise
            wire.encode_bytes([m.Call(1, "os.system", (f"touch {marker}",), {}, True, True)]),
            wire.encode_bytes([m.Call(2, "builtins.exec", (f"open('{marker}','w')",), {}, True, True)]),
            wire.encode_bytes([m.Call(3, "pickle.loads", (payload,), {}, True, True)]),
            wire.encode_bytes([m.Call(4, "torch.load", (str(marker),), {}, True, True)]),
            wire.encode_bytes([m.Call(5, "torch.Tensor.__reduce_ex__", (2,), {}, True, True)]),
            wire.encode_bytes([m.Call(6, "torch.add", (payload, 1), {}, True, True)]),  # bytes stay bytes
            wire.encode_bytes([m.Fetch(7, m.ClientRef(123456, 0))]),                   # someone else's id?
        ]
        for frame in hostile:
            ws.send(frame)
            ack, *items = wire.decode(ws.recv(timeout=10))
            assert isinstance(ack, m.Ack) and items
            for item in items:
                assert isinstance(item, m.Failure), item
        ws.send(wire.encode_bytes([m.Sync(99)]))
        assert wire.decode(ws.recv(timeout=10)) == [m.Ack(len(hostile) + 1), m.Reply(99, None)]
    assert not marker.exists()
    assert worker.proc.poll() is None
    with tr.connect(worker.url) as w:
        assert (torch.ones(3).send(w) + 1).sum().item() == 6.0


def test_huge_claims_in_a_header_allocate_nothing(worker_process):
    worker = worker_process()
    table = msgpack.packb([["float64", [1 << 30, 1 << 30], None]])
    body = msgpack.packb([])
    import struct
    frame = struct.pack("<4sII", m.MAGIC, len(body), len(table)) + body + table
    proto = ClientProtocol("claims")
    with raw_connect(worker.url, proxy=None, compression=None) as ws:
        ws.send(b"".join(proto.hello()))
        proto.receive_welcome(ws.recv(timeout=10))
        ws.send(frame)
        _, failure = wire.decode(ws.recv(timeout=10))
        assert failure.error.type == "torchremote.ProtocolError" and "shorter" in failure.error.message
    assert worker.proc.poll() is None


# --- isolation ----------------------------------------------------------------------------------------

def test_clients_see_only_their_own_objects_and_published_data(fresh_server):
    fresh_server.publish(torch.ones(2), tags=["#shared"])
    alice, eve = tr.connect(fresh_server.url, name="alice"), tr.connect(fresh_server.url, name="eve")
    secret = torch.tensor([42.]).send(alice)
    alice.sync()
    assert [r.id for r in eve.objects()] == ["p1"]
    assert {r.id for r in alice.objects()} == {"p1", secret.id}
    with pytest.raises(LookupError, match="does not exist"):
        eve._fetch(secret._ref)  # the same id means nothing in eve's namespace
    assert secret.get().item() == 42.0
    alice.close(), eve.close()


def test_allow_get_false_data_computes_but_never_leaves(fresh_server):
    fresh_server.publish(torch.tensor([3., 4.]), tags=["#private"], allow_get=False)
    fresh_server.auto_approve(lambda request: request.numel == 1)  # the owner lets scalars out
    with tr.connect(fresh_server.url) as w:
        (x,) = w.search("#private")
        assert (x * 2).sum().item() == 14.0  # results the owner approves come back: that is the point
        for leak in (lambda: x.get(), lambda: x[0:2].get(), lambda: x.view(2, 1).get(),
                     lambda: x.tolist(), lambda: x.numpy(), lambda: (x + 0).get()):
            with pytest.raises(tr.ApprovalRequired, match="private data"):
                leak()


# --- limits -------------------------------------------------------------------------------------------

def test_per_client_memory_limit(worker_process):
    worker = worker_process("--max-client-bytes", "4096")
    with tr.connect(worker.url) as w, tr.connect(worker.url) as other:
        a = torch.zeros(512).send(w)           # 2 KiB
        view = a[:100]                         # views cost nothing more
        assert view.sum().item() == 0.0
        with pytest.raises(torch.OutOfMemoryError, match="max-client-bytes"):
            torch.zeros(1024).send(w)          # 4 KiB more: over
            w.sync()
        with pytest.raises(torch.OutOfMemoryError, match="max-client-bytes"):
            (a.repeat(3)).sum().item()          # an op's output counts too
        del a, view
        import gc
        gc.collect()
        c = torch.zeros(1000).send(w)          # freed memory can be used again
        assert c.sum().item() == 0.0
        assert (torch.ones(500).send(other) + 1).sum().item() == 1000.0  # others have their own budget


def test_message_size_limit_is_a_clear_error_and_nothing_is_lost(worker_process):
    worker = worker_process("--max-message-bytes", str(1 << 20))
    with tr.connect(worker.url) as w:
        queued = torch.ones(4).send(w) * 2
        big = torch.arange(1 << 20, dtype=torch.float32)
        assert big.send(w).get().equal(big)   # 4 MiB: sent and fetched in chunks that fit
        with pytest.raises(tr.WorkerPermissionError, match="max-message-bytes"):
            queued + torch.zeros(1 << 20)      # a local operand that large, too
        small = [torch.full((1 << 16,), float(i)).send(w) for i in range(40)]  # 40 x 256 KiB: split up
        assert queued.get().equal(torch.full((4,), 2.)) and small[-1][0].item() == 39.0
