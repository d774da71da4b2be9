"""Large transfers: chunked both ways, bit-exact, strides kept, progress shown on a terminal."""
from __future__ import annotations

import io

import pytest
import torch

import torchremote as tr
from torchremote.client import progress
from torchremote.wire import codec as wire, messages as m
from conftest import bits


@pytest.mark.parametrize("make", [
    lambda: torch.randn(1500, 2100),                              # 12 MiB, contiguous
    lambda: torch.randn(2100, 1500, dtype=torch.float64).t(),     # 24 MiB, transposed: strides kept
    lambda: torch.randn(3000, 3000)[::2, ::3],                    # a strided view: only its elements
    lambda: torch.randint(0, 2, (9 << 20,), dtype=torch.bool),    # 9 MiB of bools
    lambda: torch.randn(1 << 20, dtype=torch.complex64),          # 8 MiB complex
])
def test_large_tensors_round_trip_in_chunks(worker_process, make):
    t = make()
    assert t.numel() * t.element_size() > m.CHUNK_BYTES
    worker = worker_process()
    with tr.connect(worker.url) as w:
        x = t.send(w)
        assert x.stride() == wire.strides_after_transfer(t)
        back = x.get()
        assert back.shape == t.shape and back.dtype == t.dtype and torch.equal(bits(back), bits(t))
        if t.is_contiguous() or t.dim() == 2 and t.stride(0) == 1:
            assert back.stride() == t.stride()
        assert x.sum().item() == back.sum().item()  # the assembled tensor computes like the fetched copy


def test_a_chunked_send_respects_the_client_memory_limit(fresh_server):
    limited = tr.start_worker(id="small", max_client_bytes=8 << 20)
    try:
        with tr.connect(limited.url) as w:
            with pytest.raises(torch.OutOfMemoryError, match="max-client-bytes"):
                torch.zeros(4 << 20).send(w)   # 16 MiB announced: refused before any chunk is stored
                w.sync()
            assert torch.ones(1 << 20).send(w).sum().item() == float(1 << 20)  # 4 MiB fits
    finally:
        limited.stop()


def test_views_of_a_large_tensor_fetch_only_their_elements(server):
    server.publish(torch.arange(16 << 20, dtype=torch.float32), tags=["#big"])
    with tr.connect(server.url) as w:
        (big,) = w.search("#big")
        assert big[5].item() == 5.0 and big[-3:].get().tolist() == [float((16 << 20) - i) for i in (3, 2, 1)]


def test_progress_bar_only_on_a_terminal_and_for_large_transfers(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress.transfer_bar(1 << 30, "x"), progress._Silent)  # not a terminal
    monkeypatch.setattr("sys.stderr", Terminal())
    assert isinstance(progress.transfer_bar(1 << 10, "x"), progress._Silent)  # too small to matter
    bar = progress.transfer_bar(1 << 30, "send to bob")
    bar.update(1 << 29)
    bar.close()
    import sys
    assert "send to bob" in sys.stderr.getvalue()


def test_sends_and_gets_show_progress_on_a_terminal(fresh_server, monkeypatch):
    shown = []

    class Recorder:
        def __init__(self, total, description):
            shown.append([description, total, 0])

        def update(self, n):
            shown[-1][2] += n

        def close(self):
            pass

    monkeypatch.setattr("torchremote.client.session.transfer_bar", Recorder)
    t = torch.randn(5 << 20)  # 20 MiB
    with tr.connect(fresh_server.url) as w:
        x = t.send(w)
        assert x.get().equal(t)
    assert shown == [["send to fresh", 20 << 20, 20 << 20], ["get from fresh", 20 << 20, 20 << 20]]
