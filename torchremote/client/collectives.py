"""Collectives between workers, driven from here: the client sends one small op to each worker and
the tensors go worker to worker over a `torch.distributed` group they formed (`worker/collectives.py`).

Every collective is queued on each worker before anything waits for any of them, so each rank's
session reaches it and none waits for a rank that was never told.
"""
from __future__ import annotations

import uuid
from typing import Iterable, Sequence
from urllib.parse import urlparse

import torch

from ..wire import messages as m
from ..wire.ops import ALL_GATHER, ALL_REDUCE, BROADCAST, HOST_GROUP_STORE, JOIN_GROUP, LEAVE_GROUP
from .session import Session
from .tensor import RemoteTensor


class Group:
    """Workers that reduce among themselves, one rank each, in the order given (`tr.group`)."""

    def __init__(self, workers: Sequence[Session], backend: str | None = None) -> None:
        workers = list(workers)
        if len(workers) < 1 or len({id(w) for w in workers}) != len(workers):
            raise ValueError("a group takes one or more workers, each once")
        self.workers = workers
        self.backend = backend or ("nccl" if all(w.compute_device.type == "cuda" for w in workers) else "gloo")
        self.name = uuid.uuid4().hex[:16]
        world = len(workers)
        _, port = workers[0]._call_sync(HOST_GROUP_STORE, (self.name, world), {})
        host = urlparse(workers[0].url).hostname  # where this client reaches rank 0, the others do too
        for rank, w in enumerate(workers):  # each blocks on its worker until all have joined
            w._call(JOIN_GROUP, (self.name, rank, world, host, port, self.backend), {})
        for w in workers:
            w.sync()
        self._ranks = {id(w): rank for rank, w in enumerate(workers)}
        _groups[_key(workers)] = self

    def rank(self, worker: Session) -> int:
        rank = self._ranks.get(id(worker))
        if rank is None:
            raise ValueError(f"worker {worker.id!r} is not in this group")
        return rank

    def close(self) -> None:
        """Each worker leaves the group (it is closed with the workers otherwise)."""
        _groups.pop(_key(self.workers), None)
        for w in self.workers:
            if not w.closed:
                w._call(LEAVE_GROUP, (self.name,), {})

    def __repr__(self) -> str:
        return f"Group({[w.id for w in self.workers]}, backend={self.backend!r})"


_groups: dict[tuple[int, ...], Group] = {}


def _key(workers: Iterable[Session]) -> tuple[int, ...]:
    return tuple(sorted(id(w) for w in workers))


def group(workers: Sequence[Session], backend: str | None = None) -> Group:
    """Form a process group among `workers` (gloo, or NCCL when all compute on CUDA)."""
    return Group(workers, backend)


def _group_of(tensors: Sequence[RemoteTensor], group: Group | None) -> Group:
    for t in tensors:
        if not isinstance(t, RemoteTensor):
            raise TypeError(f"a collective takes one RemoteTensor per worker, not a {type(t).__qualname__}")
    workers = [t._worker for t in tensors]
    if len({id(w) for w in workers}) != len(workers):
        raise ValueError("a collective takes one tensor per worker: two of these are on the same worker")
    if group is None:
        group = _groups.get(_key(workers))
        if group is None or any(w.closed for w in group.workers):
            group = Group(workers)  # formed once for these workers, then reused
    if len(tensors) != len(group.workers):
        raise ValueError(f"the group has {len(group.workers)} workers; got {len(tensors)} tensors")
    for w in workers:
        group.rank(w)
    return group


def all_reduce_(tensors: Sequence[RemoteTensor], op: str = "sum", group: Group | None = None) -> list[RemoteTensor]:
    """Reduce one tensor per worker ("sum", "avg", "max", "min", "product"), in place on each."""
    g = _group_of(tensors, group)
    for t in tensors:
        _in_place(t, ALL_REDUCE, (g.name, op, t._ref))
    return list(tensors)


def broadcast_(tensors: Sequence[RemoteTensor], src: int = 0, group: Group | None = None) -> list[RemoteTensor]:
    """Copy the tensor of rank `src` into every other worker's tensor, in place."""
    g = _group_of(tensors, group)
    for t in tensors:
        _in_place(t, BROADCAST, (g.name, src, t._ref))
    return list(tensors)


def all_gather(tensors: Sequence[RemoteTensor], group: Group | None = None) -> list[list[RemoteTensor]]:
    """Every worker gets every worker's tensor: for each input, a list of pointers on its worker,
    in rank order."""
    g = _group_of(tensors, group)
    world = len(g.workers)
    out = []
    for t in tensors:
        worker = t._worker
        op_id = worker._call(ALL_GATHER, (g.name, t._ref), {})
        meta = m.TensorMeta(tuple(t.shape), tuple(torch.empty(t.shape, device="meta").stride()), 0, t.dtype, False)
        out.append([RemoteTensor._wrap(meta, worker, m.ClientRef(op_id, k)) for k in range(world)])
    return out


def _in_place(t: RemoteTensor, op: str, args: tuple) -> None:
    worker = t._worker
    op_id = worker._call(op, args, {})
    worker._release(m.ClientRef(op_id, 0))  # it returns `t` itself: no pointer of its own
