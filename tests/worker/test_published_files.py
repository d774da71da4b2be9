"""Data published from safetensors files, and the limits a worker applies by default."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import torchremote as tr
from torchremote.worker.published_files import PublishFileError
from torchremote.worker import budget

from conftest import ROOT


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weights": torch.arange(6.).reshape(2, 3), "bias": torch.ones(3)}, str(path),
              metadata={"tags": "#model, #v1", "description": "a tiny model"})
    return path


def start_cli_worker(*args: str) -> subprocess.CompletedProcess | subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torchremote", "worker", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_publish_file_publishes_each_tensor_under_its_name(fresh_server, model_file):
    ids = fresh_server.publish_file(str(model_file), tags=["#hospital"])
    assert set(ids) == {"weights", "bias"}
    with tr.connect(fresh_server.url) as w:
        (weights,) = w.search("weights")
        assert weights.get().equal(torch.arange(6.).reshape(2, 3))
        (bias,) = w.search("bias", "#model", "#v1", "#hospital")  # the file's tags and the caller's
        assert bias._published.description == "a tiny model"
        assert len(w.search("#model")) == 2


def test_a_missing_or_malformed_file_is_a_clear_error_and_publishes_nothing(fresh_server, tmp_path):
    with pytest.raises(PublishFileError, match="nowhere.safetensors: no such file"):
        fresh_server.publish_file(str(tmp_path / "nowhere.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" + b"\x00" * 64)
    with pytest.raises(PublishFileError, match="bad.safetensors: not a readable safetensors file"):
        fresh_server.publish_file(str(bad))
    truncated = tmp_path / "truncated.safetensors"
    save_file({"a": torch.ones(1000)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(PublishFileError, match="truncated.safetensors"):
        fresh_server.publish_file(str(truncated))
    assert fresh_server.objects() == []


def test_the_cli_publishes_files_and_directories(worker_process, model_file, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    save_file({"cohort": torch.full((4,), 7.0)}, str(data / "cohort.safetensors"))
    (data / "notes.txt").write_text("not data")
    worker = worker_process("--publish", str(model_file), "--tags", "#site-a", "--data-dir", str(data))
    with tr.connect(worker.url) as w:
        assert w.search("weights", "#site-a", "#model")[0].get().sum().item() == 15.0
        assert w.search("cohort", "#site-a")[0].get().tolist() == [7.0] * 4
        assert {row.tags[0] for row in w.objects()} == {"weights", "bias", "cohort"}


def test_private_files_are_computed_on_and_never_fetched(worker_process, model_file, tmp_path):
    secret = tmp_path / "secret.safetensors"
    save_file({"cohort": torch.full((4,), 7.0)}, str(secret), metadata={"private": "true"})
    worker = worker_process("--publish", str(model_file), "--private", "--publish", str(secret))
    with tr.connect(worker.url) as w:
        (weights,), (cohort,) = w.search("weights"), w.search("cohort")
        assert tuple((weights @ torch.ones(3)).shape) == (2,)  # computing on them works
        for private in (weights, cohort, weights[0], cohort[1:]):
            with pytest.raises(tr.ApprovalRequired, match="private data"):
                private.get()
    server = tr.start_worker(id="owner")
    try:  # the same from Python, and the file's own metadata
        server.publish_file(str(secret))
        server.publish_file(str(model_file), private=True)
        with tr.connect(server.url) as w:
            for name in ("cohort", "weights", "bias"):
                with pytest.raises(PermissionError):
                    w.search(name)[0].get()
    finally:
        server.stop()


@pytest.mark.parametrize("make_bad", ["missing", "malformed"])
def test_the_worker_does_not_start_half_configured(tmp_path, model_file, make_bad):
    bad = tmp_path / "bad.safetensors"
    if make_bad == "malformed":
        bad.write_bytes(b"garbage" * 10)
    proc = start_cli_worker("--publish", str(model_file), "--publish", str(bad))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == ""  # no URL: it never listened
    assert "cannot start worker" in err and "bad.safetensors" in err


def test_each_client_has_a_memory_limit_by_default_and_it_is_printed(worker_process):
    server = tr.start_worker(id="defaults")
    try:  # the worker's budget: 80% of the machine's memory; a client's: half of that
        assert server.budget.host.limit == int(budget.physical_memory() * 0.8)
        assert server.max_client_bytes == int(server.budget.host.limit * 0.5)
    finally:
        server.stop()
    unlimited = tr.start_worker(id="unlimited", max_client_bytes=0)
    try:
        assert unlimited.max_client_bytes is None
    finally:
        unlimited.stop()
    proc = start_cli_worker("--max-client-bytes", "4096")
    try:
        assert proc.stdout.readline().startswith("ws://")
        assert "each client may hold up to 4.0 KiB" in proc.stderr.readline()
    finally:
        proc.kill()
        proc.communicate()


def test_a_hundred_clients_at_once_get_correct_isolated_results(worker_process):
    from benchmarks import load
    worker = worker_process("--id", "crowded")
    result = load.run(worker.url, worker.proc.pid, clients=100, timeout_s=120)
    assert result["failures"] == [] and result["hung"] == 0
    assert result["ops"] == 100 * load.OPS_EACH


def test_clients_past_max_clients_are_refused_clearly_until_one_leaves(worker_process):
    worker = worker_process("--max-clients", "2")
    first, second = tr.connect(worker.url), tr.connect(worker.url)
    with pytest.raises(tr.WorkerPermissionError, match="at most 2 clients at once"):
        tr.connect(worker.url)
    assert (torch.ones(2).send(second) + 1).sum().item() == 4.0  # the others keep working
    first.close()
    with tr.connect(worker.url) as third:
        assert (torch.ones(2).send(third) * 3).sum().item() == 6.0
    second.close()
