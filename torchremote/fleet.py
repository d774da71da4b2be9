"""`tr.ray`: a fleet of workers placed and supervised by Ray, connected, and grouped for collectives.

    import ray, torchremote as tr
    ray.init()                                    # or an existing cluster: ray.init(address="auto")
    with tr.ray.start_workers(4, num_cpus=1, publish={"#shard": "data/shard-{rank}.safetensors"}) as fleet:
        fleet.workers                             # [tr.Worker, ...], connected, in one group

Each worker is a Ray actor running a torchremote worker on its node's address, in a placement
group (one bundle per worker, `strategy` as Ray's). A fresh client token per fleet reaches the
actors as an actor argument, through Ray: never on a command line or in a log. Ray is an optional
extra (`pip install torchremote[ray]`); this module is imported when `tr.ray` is first used.
"""
from __future__ import annotations

import os
import secrets
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .client.collectives import Group
from .client.handle import Worker, connect
from .launch import start_worker
from .worker import published_files


class _WorkerActor:
    """A torchremote worker in a Ray actor's process."""

    def __init__(self, worker_id: str, token: str, device: str, publish: dict[str, str], rank: int,
                 host: str | None, approve: Any, options: dict) -> None:
        host = host or _node_address()
        self.server = start_worker(id=worker_id, host=host, port=0, token=token, device=device, **options)
        for tag, pattern in publish.items():  # read whole before any is published: an error names the file
            self.server.publish_files([published_files.read(pattern.format(rank=rank))], tags=[tag])
        if approve is not None:
            self.server.auto_approve(approve)

    def url(self) -> str:
        return self.server.url

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.server.stop()


def _node_address() -> str:
    """The address Ray knows this actor's node by (what `ray.init(_node_ip_address=...)` set)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


class Fleet:
    """Workers on Ray actors, connected from this process (`start_workers`)."""

    def __init__(self, n: int, *, num_cpus: float = 1, num_gpus: float = 0, device: str = "cpu",
                 publish: dict[str, str] | None = None, strategy: str = "PACK", collectives: bool = True,
                 name: str = "ray", host: str | None = None, approve: Any = None,
                 connect_timeout: float = 60.0, **worker_options: Any) -> None:
        if n < 1:
            raise ValueError("a fleet has at least one worker")
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised in this process: call ray.init() first "
                               "(ray.init(address='auto') to join a running cluster)")
        self.token = secrets.token_urlsafe(32)
        self._name, self._device, self._publish = name, device, dict(publish or {})
        self._options, self._collectives, self._timeout = worker_options, collectives, connect_timeout
        self._host = host  # where each worker listens: its Ray node's address unless given
        self._approve = approve  # the data owner's release rule, run by each worker (auto_approve)
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self._resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        self.placement_group = placement_group([dict(bundle) for _ in range(n)], strategy=strategy)
        self._actors: list[Any] = [None] * n
        self.workers: list[Worker] = [None] * n  # type: ignore[list-item]
        self.group: Group | None = None
        try:
            ray.get(self.placement_group.ready(), timeout=connect_timeout)
            for i in range(n):
                self._actors[i] = self._start_actor(i)
            urls = ray.get([a.url.remote() for a in self._actors], timeout=connect_timeout)
            self.workers = [connect(url, token=self.token) for url in urls]
            self._regroup()
        except BaseException:
            self.stop()
            raise

    def _start_actor(self, rank: int) -> Any:
        actor = ray.remote(_WorkerActor).options(
            **self._resources, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=rank))
        return actor.remote(f"{self._name}-{rank}", self.token, self._device, self._publish, rank, self._host,
                            self._approve, self._options)

    def _regroup(self) -> None:
        if self._collectives and len(self.workers) > 1:
            self.group = Group(self.workers)

    def restart(self, rank: int) -> Worker:
        """Replace worker `rank` with a fresh one (its objects are gone), in the same bundle; the
        fleet's group is formed again."""
        old = self._actors[rank]
        if self.workers[rank] is not None:
            self.workers[rank].close()
        if old is not None:
            ray.kill(old, no_restart=True)
        self._actors[rank] = self._start_actor(rank)
        url = ray.get(self._actors[rank].url.remote(), timeout=self._timeout)
        self.workers[rank] = connect(url, token=self.token)
        if self.group is not None:
            self.group.close()
            self._regroup()
        return self.workers[rank]

    def actor(self, rank: int) -> Any:
        """The Ray actor of worker `rank` (to watch or kill it with Ray's own tools)."""
        return self._actors[rank]

    def stop(self) -> None:
        """Disconnect, stop every worker and hand the fleet's resources back to Ray."""
        for w in self.workers:
            if w is not None and not w.closed:
                w.close()
        stopping = [a.stop.remote() for a in self._actors if a is not None]
        try:
            ray.get(stopping, timeout=10)
        except Exception:
            pass  # an actor already dead: killed below all the same
        for a in self._actors:
            if a is not None:
                ray.kill(a, no_restart=True)
        self._actors = [None] * len(self._actors)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.workers)

    def __repr__(self) -> str:
        return f"Fleet({[w.url for w in self.workers if w is not None]})"


def start_workers(n: int, **options: Any) -> Fleet:
    """Start `n` workers on Ray actors and connect to each (see `Fleet` for the options: num_cpus,
    num_gpus, device, publish={tag: path with {rank}}, strategy, collectives, host, approve (the
    owner's release rule for each worker, as `auto_approve`); the rest go to each
    worker, as `start_worker`'s options)."""
    started = time.perf_counter()
    fleet = Fleet(n, **options)
    fleet.start_seconds = time.perf_counter() - started
    return fleet
