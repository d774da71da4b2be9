"""Collectives between workers, in one run: torchremote's all-reduce across 2 and 4 worker processes
beside plain `torch.distributed` gloo in the same number of processes (the anchor), beside
averaging by `move` through the first worker, and beside averaging through the client (get, mean,
send); with the bytes each way costs the client. Then a data-parallel training step on 1, 2 and 4
workers, with the share of the step spent in the all-reduce.

Each worker is a process of its own (`torchremote worker`, one thread each, as the gloo processes).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

import torchremote as tr

MiB = 1 << 20
SIZES = (4 * MiB, 64 * MiB)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

GLOO = r'''
import datetime, json, statistics, sys, time, torch, torch.distributed as dist
rank, world, port, numel, reps = map(int, sys.argv[1:6])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=120))
x = torch.ones(numel)
for _ in range(2):
    dist.all_reduce(x)
times = []
for _ in range(reps):
    dist.barrier()
    t0 = time.perf_counter()
    dist.all_reduce(x)
    times.append(time.perf_counter() - t0)
if rank == 0:
    print(json.dumps(statistics.median(times)))
dist.destroy_process_group()
'''


def _gloo(world: int, nbytes: int, reps: int) -> float:
    from benchmarks.bench import free_port  # here: bench imports this module
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", GLOO, str(r), str(world), str(port), str(nbytes // 4), str(reps)],
                              stdout=subprocess.PIPE, text=True, env=ENV) for r in range(world)]
    out = [p.communicate(timeout=300)[0] for p in procs]
    return json.loads(out[0])


class ClientBytes:
    """Bytes this client writes to and reads from its workers' connections."""

    def __init__(self, workers: list) -> None:
        self.sent = self.received = 0
        for w in workers:
            conn = w._connection
            send, ws = conn.send_locked, conn.ws
            receive = ws.receive

            def sent(chunks, send=send, **options):
                self.sent += sum(len(c) for c in chunks)
                return send(chunks, **options)

            def received(*args, receive=receive, **options):
                message = receive(*args, **options)
                if isinstance(message, (bytes, bytearray)):
                    self.received += len(message)
                elif message is not None and hasattr(message, "tensor"):
                    self.received += message.tensor.numel() * message.tensor.element_size()
                return message

            conn.send_locked, ws.receive = sent, received

    @property
    def total(self) -> int:
        return self.sent + self.received


def _timed(fn, workers: list, reps: int) -> tuple[float, int]:
    fn()
    for w in workers:
        w.sync()
    times, spy = [], ClientBytes(workers)
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        for w in workers:
            w.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), spy.total // reps


def _by_moves(xs: list) -> None:
    """Average as one would without collectives: every tensor to the first worker, the mean there,
    and the mean back to each (worker to worker, `move`)."""
    first = xs[0]._worker
    mean = torch.stack([xs[0], *[x.move(first) for x in xs[1:]]]).mean(0)
    for x in xs[1:]:
        x.copy_(mean.move(x._worker))
    xs[0].copy_(mean)


def _through_client(xs: list) -> None:
    mean = torch.stack([x.get() for x in xs]).mean(0)
    for x in xs:
        x.copy_(mean.send(x._worker))


def _dp_step_ms(workers: list, steps: int = 5) -> tuple[float, float]:
    """A data-parallel step of a 4 x 1024 MLP (16 MiB of gradients), batch 256 per worker: ms per
    step, and ms of it in `average_gradients`."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(1024, 1024), torch.nn.ReLU())])
    replicas = tr.replicate(model, workers)
    opts = [torch.optim.SGD(r.parameters(), lr=1e-3) for r in replicas]
    batches = [(torch.randn(256, 1024).send(w), torch.randn(256, 1024).send(w)) for w in workers]
    step_times, reduce_times = [], []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        for r, o, (x, y) in zip(replicas, opts, batches):
            o.zero_grad()
            torch.nn.functional.mse_loss(r(x), y).backward()
        for w in workers:
            w.sync()
        t1 = time.perf_counter()
        if len(workers) > 1:
            tr.average_gradients(replicas)
            for w in workers:
                w.sync()
        t2 = time.perf_counter()
        for o in opts:
            o.step()
        for w in workers:
            w.sync()
        if step:  # the first builds plans and groups
            step_times.append(time.perf_counter() - t0)
            reduce_times.append(t2 - t1)
    return statistics.median(step_times) * 1e3, statistics.median(reduce_times) * 1e3


def run(quick: bool = False) -> dict:
    procs, urls = [], []
    results: dict = {}
    try:
        for i in range(4):
            p = subprocess.Popen([sys.executable, "-m", "torchremote", "worker", "--port", "0", "--id", f"r{i}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
            procs.append(p)
            urls.append(p.stdout.readline().strip())
        clients = [tr.connect(u) for u in urls]
        reps = 3 if quick else 5
        for world in (2, 4):
            workers = clients[:world]
            group = tr.group(workers)
            for nbytes in SIZES:
                xs = [torch.ones(nbytes // 4).send(w) for w in workers]
                n = reps * 2 if nbytes < 16 * MiB else reps  # small ones are noisier
                row = {"gloo": _gloo(world, nbytes, n)}
                row["torchremote"], row["torchremote bytes"] = _timed(
                    lambda: tr.all_reduce_(xs, "avg", group=group), workers, n)
                row["moves"], row["moves bytes"] = _timed(lambda: _by_moves(xs), workers, reps)
                row["client"], row["client bytes"] = _timed(lambda: _through_client(xs), workers, reps)
                results[f"{world} x {nbytes // MiB} MiB"] = row
                del xs
            group.close()
        for world in (1, 2, 4):
            step, reduce = _dp_step_ms(clients[:world])
            results[f"dp {world}"] = {"step ms": step, "all-reduce ms": reduce}
        for c in clients:
            c.close()
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    return results


def report(results: dict) -> list[str]:
    r = results.get("collectives")
    if not r:
        return []
    rows = ["", "### 4g. Collectives between workers: all-reduce (average) of one tensor per worker, each a process",
            "", "| workers x size | gloo direct, ms | torchremote, ms | ratio | by moves, ms | through the client, ms "
            "| client bytes: torchremote / moves / through client |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, row in r.items():
        if key.startswith("dp "):
            continue
        rows.append(f"| {key} | {row['gloo'] * 1e3:.1f} | {row['torchremote'] * 1e3:.1f} | "
                    f"{row['torchremote'] / row['gloo']:.2f}x | {row['moves'] * 1e3:.1f} | {row['client'] * 1e3:.1f} | "
                    f"{row['torchremote bytes']:,} / {row['moves bytes']:,} / {row['client bytes']:,} |")
    rows += ["", "Data-parallel step (4 x 1024 MLP, 16 MiB of gradients, batch 256 per worker, SGD):", "",
             "| workers | ms/step | all-reduce ms | share |", "| ---: | ---: | ---: | ---: |"]
    for world in (1, 2, 4):
        row = r.get(f"dp {world}")
        if row:
            rows.append(f"| {world} | {row['step ms']:.1f} | {row['all-reduce ms']:.1f} | "
                        f"{row['all-reduce ms'] / row['step ms']:.0%} |")
    return rows


if __name__ == "__main__":
    print("\n".join(report({"collectives": run("--quick" in sys.argv)})))
