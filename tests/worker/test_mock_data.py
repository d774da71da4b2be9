"""Mock data beside real data: clients develop on the mock locally, then run the same code on
the pointer; the real values still leave only with the owner's approval."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import torchremote as tr

from conftest import ROOT

REAL = torch.tensor([[37., 120., 80.], [61., 140., 95.], [45., 110., 70.]])  # age, systolic, diastolic
FAKE = torch.tensor([[40., 125., 82.], [50., 130., 85.], [60., 135., 88.]])


def blood_pressure_gap(patients: torch.Tensor) -> torch.Tensor:
    return (patients[:, 1] - patients[:, 2]).mean()


def test_develop_on_the_mock_then_run_on_the_pointer(fresh_server):
    fresh_server.publish(REAL, tags=["#patients"], private=True, mock=FAKE)
    with tr.connect(fresh_server.url) as w:
        patients, = w.search("#patients")
        mock = patients.mock()
        assert type(mock) is torch.Tensor and torch.equal(mock, FAKE)
        mocks = w.search("#patients", mock=True)
        assert len(mocks) == 1 and torch.equal(mocks[0], FAKE)
        assert blood_pressure_gap(mock).item() == pytest.approx(45.0)  # works locally, on made-up data

        gap = blood_pressure_gap(patients)  # the same code, on the real data
        with pytest.raises(tr.ApprovalRequired):
            gap.get()
        with pytest.raises(tr.ApprovalRequired):
            patients.get()
        request, = [r for r in fresh_server.requests() if r.status == "pending" and "mean" in r.lineage]
        fresh_server.approve(request.id)
        assert gap.get().item() == pytest.approx(blood_pressure_gap(REAL).item())


def test_a_mock_must_match_the_real_data(fresh_server):
    with pytest.raises(ValueError, match=r"shape and dtype, \(3, 3\) torch.float32: it has \(2, 3\)"):
        fresh_server.publish(REAL, tags=["#patients"], private=True, mock=FAKE[:2])
    with pytest.raises(ValueError, match="torch.float64"):
        fresh_server.publish(REAL, tags=["#patients"], private=True, mock=FAKE.double())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fresh_server.publish(REAL, tags=["#patients"], mock=FAKE.tolist())
    assert list(fresh_server.objects()) == []  # nothing was published


def test_the_mock_is_a_copy_and_only_published_data_has_one(fresh_server):
    fake = FAKE.clone()
    fresh_server.publish(REAL, tags=["#patients"], private=True, mock=fake)
    fresh_server.publish(torch.arange(3.), tags=["#plain"])
    fake.zero_()  # the owner's own tensor, changed after publishing
    with tr.connect(fresh_server.url) as w:
        patients, = w.search("#patients")
        assert torch.equal(patients.mock(), FAKE)
        plain, = w.search("#plain")
        with pytest.raises(LookupError, match="published no mock"):
            plain.mock()
        with pytest.raises(LookupError, match="only a pointer to published data"):
            (patients * 1).mock()
        assert torch.equal(plain.get(), torch.arange(3.))  # the session goes on


def test_mocks_from_files_on_the_command_line(tmp_path):
    save_file({"patients": REAL}, str(tmp_path / "real.safetensors"))
    save_file({"patients": FAKE}, str(tmp_path / "mock.safetensors"))
    save_file({"visits": FAKE}, str(tmp_path / "stray.safetensors"))
    worker = subprocess.Popen([sys.executable, "-m", "torchremote", "worker", "--port", "0", "--private",
                               "--publish", str(tmp_path / "real.safetensors"),
                               "--mock", str(tmp_path / "mock.safetensors")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = worker.stdout.readline().strip()
        with tr.connect(url) as w:
            patients, = w.search("patients")
            assert patients._published.has_mock and torch.equal(patients.mock(), FAKE)
            with pytest.raises(tr.ApprovalRequired):
                patients.get()
    finally:
        worker.kill()
        worker.communicate(timeout=10)
    stray = subprocess.run([sys.executable, "-m", "torchremote", "worker", "--port", "0",
                            "--publish", str(tmp_path / "real.safetensors"),
                            "--mock", str(tmp_path / "stray.safetensors")],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert stray.returncode == 1 and "a mock named 'visits' has no tensor of that name" in stray.stderr
