"""Fleets on a real Ray cluster, started on this machine by the test: workers on actors, connected
and grouped; an actor's death is a clear error, then a restart; collectives and data-parallel
training across the fleet; nothing left behind."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import psutil
import pytest
import torch
from safetensors.torch import save_file

import torchremote as tr
from conftest import assert_data_parallel_equals_one_model

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_fleet_starts_publishes_reduces_and_stops_clean(cluster, tmp_path):
    for rank in range(4):
        save_file({"x": torch.full((3,), float(rank))}, str(tmp_path / f"shard-{rank}.safetensors"))
    fleet = tr.ray.start_workers(4, num_cpus=1, host="127.0.0.1",
                                 publish={"#shard": str(tmp_path / "shard-{rank}.safetensors")})
    pids = ray.get([fleet.actor(i).pid.remote() for i in range(4)])
    assert all(w.url.startswith("ws://127.0.0.1:") for w in fleet.workers)
    for pid in pids:  # the token reached the actor through Ray, not on its command line
        assert fleet.token not in " ".join(psutil.Process(pid).cmdline())
    shards = [w.search("#shard")[0] for w in fleet.workers]
    assert [s.get().tolist() for s in shards] == [[float(r)] * 3 for r in range(4)]
    total = [s.clone() for s in shards]
    tr.all_reduce_(total, "sum", group=fleet.group)
    assert all(t.get().tolist() == [6.0] * 3 for t in total)
    fleet.stop()
    assert all(w.closed for w in fleet.workers)
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)
    assert alive == []  # no actor process left behind


def test_a_dead_actor_is_a_connection_error_then_a_restart(cluster):
    with tr.ray.start_workers(2, num_cpus=1, host="127.0.0.1") as fleet:
        x = torch.ones(3).send(fleet.workers[1])
        pid = ray.get(fleet.actor(1).pid.remote())
        ray.kill(fleet.actor(1))  # asynchronous: wait until its process is gone
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.wait_procs([psutil.Process(pid)], timeout=30)
        with pytest.raises(tr.WorkerConnectionError):
            (x + 1).get()
        fresh = fleet.restart(1)
        assert fleet.workers[1] is fresh and not fresh.closed
        xs = [torch.full((2,), float(i)).send(w) for i, w in enumerate(fleet.workers)]
        tr.all_reduce_(xs, "avg", group=fleet.group)
        assert [x.get().tolist() for x in xs] == [[0.5, 0.5]] * 2


def test_data_parallel_on_a_fleet_equals_one_model(cluster):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with tr.ray.start_workers(2, num_cpus=1, host="127.0.0.1") as fleet:
        assert_data_parallel_equals_one_model(model, fleet.workers, lambda p: torch.optim.SGD(p, lr=0.1),
                                              features=6, group=fleet.group)


def test_a_fleet_needs_ray_initialised():
    done = subprocess.run([sys.executable, "-c", "import torchremote as tr; tr.ray.start_workers(1)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "call ray.init() first" in done.stderr, done.stderr[-2000:]
