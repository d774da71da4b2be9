"""The worker as its own process: CLI, the two-process walkthrough, logs, clean shutdown."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchremote as tr
from conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_walkthrough_across_two_processes_exactly_as_written():
    bob = subprocess.Popen([sys.executable, "examples/bob.py", "0"], cwd=ROOT, env=ENV, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = bob.stdout.readline().strip()
        assert url.startswith("ws://127.0.0.1:"), bob.stderr.read()
        out = subprocess.run([sys.executable, "examples/model_owner.py", url], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("RemoteTensor(id=p2, worker='bob', shape=(5,), dtype=torch.float32")
        assert lines[1] == "tensor([2., 3., 4., 5., 6.])"
        assert any("#X" in line and "p1" in line for line in lines) and lines[-1] == "9.0"
    finally:
        bob.send_signal(signal.SIGINT)
        assert bob.wait(timeout=20) == 0
        log = bob.stderr.read()
        bob.stdout.close(), bob.stderr.close()
    assert "connected as" in log and "call torch.add" in log  # verbose: each command, with the peer
    assert "127.0.0.1:" in log


def test_quickstart_runs():
    out = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "z.get(): tensor([2., 3., 4., 5., 6.])" in out.stdout and "9.0" in out.stdout


def test_cli_worker_prints_its_url_first_logs_to_a_file_and_stops_on_sigterm(worker_process, tmp_path):
    log_file = tmp_path / "worker.log"
    worker = worker_process("--id", "carol", "--log-file", str(log_file), "--verbose")
    assert worker.url.startswith("ws://127.0.0.1:") and not worker.url.endswith(":0")
    with tr.connect(worker.url) as carol:
        assert carol.id == "carol"
        x = torch.arange(4.).send(carol)
        assert torch.mul(x, 2).sum().item() == 12.0
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=20) == 0
    text = log_file.read_text()
    assert "call torch.mul" in text and "127.0.0.1:" in text and "stopped" in text
    stderr = worker.proc.stderr.read()
    for lines in (text.splitlines(), stderr.splitlines()):  # one line per event, in both
        muls = [line for line in lines if "call torch.mul" in line]
        assert len(muls) == 1, muls


def test_cli_token_file(worker_process, tmp_path):
    token = tmp_path / "token"
    token.write_text("hunter2\n")
    worker = worker_process("--token-file", str(token))
    with pytest.raises(tr.WorkerPermissionError):
        tr.connect(worker.url, token="nope")
    with tr.connect(worker.url, token="hunter2") as w:
        assert w.sync() is None


def test_cli_refuses_an_open_address_without_a_token():
    out = subprocess.run([sys.executable, "-m", "torchremote", "worker", "--host", "0.0.0.0", "--port", "0"],
                         cwd=ROOT, env={**ENV, "TORCHREMOTE_TOKEN": ""}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "without a token" in out.stderr and out.stdout == ""


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "torchremote"
    if not script.exists():
        script = Path(shutil.which("torchremote") or "")
    assert script.is_file(), "the torchremote console script is not installed (pip install -e .)"
    out = subprocess.run([str(script), "worker", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--token-file" in out.stdout


@pytest.mark.parametrize("script,args,expect", [
    ("examples/train_mnist_like.py", ["--epochs", "1"], "CNN: weights fetched"),
    ("examples/remote_gpu.py", [], "parameters live on the box"),
    ("examples/remote_gpu.py", ["--compiled"], "parameters live on the box"),
])
def test_training_examples_run(script, args, expect):
    out = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=170)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout and "test accuracy" in out.stdout or "step 20" in out.stdout


def test_threads_option(worker_process):
    w = tr.connect(worker_process("--threads", "1").url)
    x = torch.randn(300, 300)
    torch.testing.assert_close((x.send(w) @ x.send(w)).get(), x @ x)
    w.close()
    bad = subprocess.run([sys.executable, "-m", "torchremote", "worker", "--port", "0", "--threads", "0"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "--threads must be at least 1" in bad.stderr
