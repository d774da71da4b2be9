"""Fixed slices of PyTorch's OpInfo database (benchmarks/conformance.py FAST_SLICE, float32 values;
FAST_AUTOGRAD_SLICE, outputs' requires_grad and gradients), run locally and on a worker process:
every variant matches but those in the one KNOWN_FAILURES list.

The full run over all ~700 ops, four dtype passes and the autograd pass is `make conformance`."""
from __future__ import annotations

from benchmarks import conformance


def test_fast_slice_of_opinfo_matches_local_torch(worker_process):
    import torchremote as tr
    worker = tr.connect(worker_process("--id", "conformance").url)
    rows = conformance.conform(worker, conformance.select(conformance.FAST_SLICE), "float32", samples=2)
    worker.close()
    assert len(rows) > 300  # a few hundred op variants: functions, methods and in-place forms
    unexpected = {r["variant"]: r["reason"] for r in rows if not r["ok"] and r["variant"] not in conformance.KNOWN_FAILURES}
    assert unexpected == {}
    now_passing = [r["variant"] for r in rows if r["ok"] and r["variant"] in conformance.KNOWN_FAILURES]
    assert now_passing == [], "these match now: take them out of KNOWN_FAILURES"


def test_fast_autograd_slice_of_opinfo_matches_local_torch(worker_process):
    import torchremote as tr
    worker = tr.connect(worker_process("--id", "conformance").url)
    rows = conformance.conform_autograd(worker, conformance.select(conformance.FAST_AUTOGRAD_SLICE), samples=2)
    worker.close()
    assert len(rows) > 150
    unexpected = {r["variant"]: r["reason"] for r in rows if not r["ok"] and r["variant"] not in conformance.KNOWN_FAILURES}
    assert unexpected == {}
    now_passing = [r["variant"] for r in rows if r["ok"] and r["variant"] in conformance.KNOWN_FAILURES]
    assert now_passing == [], "these match now: take them out of KNOWN_FAILURES"
