"""Fixed slices of PyTorch's OpInfo database (benchmarks/conformance.py FAST_SLICE, float32 values;
FAST_AUTOGRAD_SLICE, outputs' requires_grad and gradients) and of its module and optimizer
databases, run locally and on a worker process: every variant matches but those in the one
KNOWN_FAILURES list.

The full run over all ~700 ops, four dtype passes, the autograd pass and the whole module and
optimizer databases is `make conformance`."""
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


def test_fast_slices_of_the_module_and_optimizer_databases_match_local_torch(worker_process):
    """torch's module_db (forward, then gradients of parameters and inputs) and optim_db (three steps
    of every configuration), remote against local."""
    import torchremote as tr
    worker = tr.connect(worker_process("--id", "conformance").url)
    rows = conformance.conform_modules(worker, prefixes=conformance.FAST_MODULE_SLICE)
    rows += conformance.conform_optimizers(worker, prefixes=conformance.FAST_OPTIMIZER_SLICE)
    worker.close()
    assert sum(r["variant"].endswith("(module)") for r in rows) >= 10
    assert sum(r["variant"].endswith("(optimizer)") for r in rows) >= 30
    unexpected = {r["variant"]: r["reason"] for r in rows if not r["ok"] and r["variant"] not in conformance.KNOWN_FAILURES}
    assert unexpected == {}
