"""Lifetime: dropped pointers free worker memory (batched); a client that dies has its objects freed."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time

import torch

import torchremote as tr
from conftest import ROOT, wait_until


def client_objects(server) -> list:
    return [r for r in server.objects() if r.owner != server.id]


def test_dropping_pointers_frees_worker_memory(fresh_server):
    bob = tr.connect(fresh_server.url)
    xs = [torch.full((1000,), float(i)).send(bob) for i in range(50)]
    ys = [x * 2 for x in xs]
    bob.sync()
    assert len(client_objects(fresh_server)) == 100
    assert sum(r.nbytes for r in client_objects(fresh_server)) == 100 * 4000
    keep = ys[3]
    del xs, ys
    gc.collect()
    bob.sync()  # releases travel with the next message, as one batch
    rows = client_objects(fresh_server)
    assert [r.id for r in rows] == [keep.id]
    assert keep.get().equal(torch.full((1000,), 6.))
    bob.close()


def test_views_keep_their_data_after_the_base_pointer_dies(fresh_server):
    bob = tr.connect(fresh_server.url)
    x = torch.arange(6.).send(bob)
    v = x[2:4]
    del x
    gc.collect()
    bob.sync()
    assert v.get().tolist() == [2., 3.]
    bob.close()


def test_releases_are_sent_without_any_other_traffic(fresh_server):
    bob = tr.connect(fresh_server.url)
    x = torch.ones(10).send(bob)
    bob.sync()
    del x
    gc.collect()
    assert wait_until(lambda: client_objects(fresh_server) == [], timeout=5)
    bob.close()


def test_published_data_is_never_freed_by_clients(fresh_server):
    fresh_server.publish(torch.ones(3), tags=["#X"])
    bob = tr.connect(fresh_server.url)
    (x,) = bob.search("#X")
    assert (x + 1).get().equal(torch.full((3,), 2.))
    del x
    gc.collect()
    bob.close()  # the worker frees the session's objects once it sees the connection close
    assert wait_until(lambda: [r.id for r in fresh_server.objects()] == ["p1"])
    assert tr.connect(fresh_server.url).search("#X")[0].get().equal(torch.ones(3))


def test_close_frees_everything_the_client_created(fresh_server):
    bob = tr.connect(fresh_server.url)
    keep = [torch.ones(5).send(bob) for _ in range(5)]
    bob.sync()
    assert len(client_objects(fresh_server)) == 5
    bob.close()
    assert wait_until(lambda: client_objects(fresh_server) == [])
    del keep  # pointers of a closed connection die quietly


def run_client(url: str, ending: str) -> None:
    """A client process that sends 10 tensors and ends with `ending`."""
    script = textwrap.dedent(f"""
        import os, torch, torchremote as tr
        bob = tr.connect({url!r})
        xs = [torch.ones(100).send(bob) for _ in range(10)]
        bob.sync()
        print("ready", flush=True)
        {ending}
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    proc.wait(timeout=30)
    proc.stdout.close(), proc.stderr.close()


def test_a_client_that_dies_abruptly_has_its_objects_freed_after_the_grace_period():
    server = tr.start_worker(id="fresh", resume_grace=1.0)
    try:
        run_client(server.url, "os._exit(0)  # no close(), no goodbye")
        died = time.monotonic()
        assert len(client_objects(server)) == 10  # kept: a dropped connection may come back
        assert wait_until(lambda: client_objects(server) == [], timeout=10)
        assert time.monotonic() - died >= 0.9  # ... for the grace period, then freed
    finally:
        server.stop()


def test_a_client_process_that_exits_without_close_frees_at_once(fresh_server):
    assert fresh_server.resume_grace == 60
    started = time.monotonic()
    run_client(fresh_server.url, "pass  # the interpreter exits normally; close() was never called")
    assert wait_until(lambda: client_objects(fresh_server) == [], timeout=10)
    assert time.monotonic() - started < 30
