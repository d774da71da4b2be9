"""Federated averaging over three worker processes equals the same algorithm replayed locally."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import torchremote as tr
from torchremote.client.federated import average_state_dicts
from conftest import ROOT

spec = importlib.util.spec_from_file_location("federated_example", ROOT / "examples" / "federated_averaging.py")
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def test_average_state_dicts():
    a = {"w": torch.tensor([0., 2.]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([2., 4.]), "n": torch.tensor(5)}
    avg = average_state_dicts([a, b])
    assert avg["w"].tolist() == [1., 3.] and avg["n"].item() == 3
    assert average_state_dicts([a, b], weights=[3, 1])["w"].tolist() == [0.5, 2.5]
    with pytest.raises(ValueError):
        average_state_dicts([])


@pytest.fixture(scope="module")
def hospitals():
    with example.hospitals(3) as (workers, _):
        yield workers


def test_three_hospitals_two_rounds_equal_the_local_replay(hospitals):
    shards = [(w.search("#train", "#x")[0], w.search("#train", "#y")[0]) for w in hospitals]
    for x, _ in shards:  # the data stays where it is
        with pytest.raises(PermissionError):
            x.get()
    torch.manual_seed(0)
    remote = example.federated_averaging(example.make_model(), shards, rounds=2, local_steps=5)
    torch.manual_seed(0)
    local = example.federated_averaging(example.make_model(), [example.shard(i) for i in range(3)],
                                        rounds=2, local_steps=5)
    for (name, r), l in zip(remote.state_dict().items(), local.state_dict().values()):
        assert not isinstance(r, tr.RemoteTensor)
        torch.testing.assert_close(r, l, rtol=1e-5, atol=1e-6, msg=name)
    for w in hospitals:  # each hospital freed the round's model copies
        assert [r.id for r in w.objects()] == ["p1", "p2"]


def test_the_example_runs():
    out = subprocess.run([sys.executable, "examples/federated_averaging.py", "--rounds", "2"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=170)
    assert out.returncode == 0, out.stderr
    assert "round 1: test accuracy" in out.stdout and "round 2: test accuracy" in out.stdout
