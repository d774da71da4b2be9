"""Collectives between workers: a `torch.distributed` process group among workers, tensors reduced
worker to worker, none of their bytes through the client.

A client names a group and gives each worker its rank. The rank-0 worker hosts the rendezvous
store (`HOST_GROUP_STORE`, answered synchronously: the others need its port); then each
worker joins (`JOIN_GROUP`), which blocks that client's session on that worker until
every rank has joined, as `init_process_group` does. Groups are gloo or NCCL process groups made
directly, not the process's default group: one worker process may belong to several groups (one
per client that forms one), and workers running in one process (tests, notebooks) each hold their
own rank.

A collective is an op like any other, queued in order on each worker's session; it runs when
every rank's session reaches it. Its inputs leave the worker, so a collective over private-derived
data is a release (`RELEASES`), refused without the owner's approval, as a move is.
"""
from __future__ import annotations

import datetime
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..wire.ops import ALL_GATHER, ALL_REDUCE, BROADCAST, HOST_GROUP_STORE, JOIN_GROUP, LEAVE_GROUP

GROUP_TIMEOUT_S = 120.0  # how long a rank waits for the others, at the rendezvous and in a collective


RELEASES = frozenset({ALL_REDUCE, BROADCAST, ALL_GATHER})  # ops whose input leaves for the other ranks
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN, "product": dist.ReduceOp.PRODUCT}


class _Group:
    def __init__(self, rank: int, world: int, pg: Any, store: Any) -> None:
        self.rank, self.world, self.pg, self.store = rank, world, pg, store


class Groups:
    """The process groups this worker's ranks belong to, by the names clients gave them."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._groups: dict[str, _Group] = {}
        self._stores: dict[str, Any] = {}  # group -> the rendezvous store this worker hosts for it
        self._lock = threading.Lock()

    def ops(self) -> dict[str, Callable]:
        return {HOST_GROUP_STORE: self.host_store, JOIN_GROUP: self.join, LEAVE_GROUP: self.leave,
                ALL_REDUCE: self.all_reduce_, BROADCAST: self.broadcast_, ALL_GATHER: self.all_gather}

    # --- forming a group ---
    def host_store(self, name: str, world: int) -> int:
        """Start the rendezvous store for `name` on this worker; its port, for the other ranks."""
        _check_name(name)
        store = dist.TCPStore(self.host, 0, world, True, wait_for_workers=False, timeout=_timeout())
        with self._lock:
            self._stores[name] = store
        return store.port

    def join(self, name: str, rank: int, world: int, host: str, port: int, backend: str) -> None:
        _check_name(name)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a group of {world}")
        with self._lock:
            if name in self._groups:
                raise RuntimeError(f"this worker already holds a rank in group {name!r}")
            store = self._stores.get(name) if rank == 0 else None
        if store is None:
            store = dist.TCPStore(host, port, world, False, timeout=_timeout())
        prefixed = dist.PrefixStore(name, store)
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(prefixed, rank, world, _timeout())
        elif backend == "nccl":
            pg = dist.ProcessGroupNCCL(prefixed, rank, world)
        else:
            raise ValueError(f"backend must be 'gloo' or 'nccl', not {backend!r}")
        with self._lock:
            self._groups[name] = _Group(rank, world, pg, store)

    def leave(self, name: str) -> None:
        with self._lock:
            self._groups.pop(name, None)
            self._stores.pop(name, None)

    def close(self) -> None:
        with self._lock:
            self._groups.clear()
            self._stores.clear()

    def _group(self, name: str) -> _Group:
        group = self._groups.get(name)
        if group is None:
            raise RuntimeError(f"this worker holds no rank in group {name!r}: form it first (tr.group(workers))")
        return group

    def decline(self, name: Any, device: torch.device) -> None:
        """This rank cannot take part in the collective (its input is the output of an op that
        failed): tell the others, who raise at once instead of waiting for it."""
        group = self._groups.get(name) if type(name) is str else None
        if group is not None:
            try:
                _agree(group, RuntimeError("declined"), device)
            except RuntimeError:
                pass

    # --- the collectives: in place on each rank's tensor, or new tensors ---
    def all_reduce_(self, name: str, op: str, tensor: torch.Tensor, refusal: Exception | None = None) -> torch.Tensor:
        group = self._group(name)
        if op not in _REDUCE_OPS:
            refusal = refusal or ValueError(f"op must be one of {sorted(_REDUCE_OPS)}, not {op!r}")
        _agree(group, refusal, tensor.device)
        options = dist.AllreduceOptions()
        options.reduceOp = _REDUCE_OPS[op]
        with torch.no_grad():
            target = tensor if tensor.is_contiguous() else tensor.contiguous()
            group.pg.allreduce([target], options).wait()
            if op == "avg":  # gloo has no AVG: a sum, then one division on each rank
                target.div_(group.world)
            if target is not tensor:
                tensor.copy_(target)
        return tensor

    def broadcast_(self, name: str, src: int, tensor: torch.Tensor, refusal: Exception | None = None) -> torch.Tensor:
        group = self._group(name)
        _agree(group, refusal, tensor.device)
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = src, 0
        with torch.no_grad():
            target = tensor if tensor.is_contiguous() else tensor.contiguous()
            group.pg.broadcast([target], options).wait()
            if target is not tensor:
                tensor.copy_(target)
        return tensor

    def all_gather(self, name: str, tensor: torch.Tensor, refusal: Exception | None = None) -> tuple[torch.Tensor, ...]:
        group = self._group(name)
        _agree(group, refusal, tensor.device)
        with torch.no_grad():
            outs = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(group.world)]
            group.pg.allgather([outs], [tensor.contiguous()]).wait()
        return tuple(outs)


def _agree(group: _Group, refusal: Exception | None, device: torch.device) -> None:
    """Every rank learns whether any refused to take part (a one-number all-reduce), and all raise
    then: a refusal on one worker must not leave the others waiting in the collective."""
    refused = torch.tensor([0 if refusal is None else 1], dtype=torch.int32, device=device)
    options = dist.AllreduceOptions()
    options.reduceOp = dist.ReduceOp.SUM
    group.pg.allreduce([refused], options).wait()
    if refusal is not None:
        raise refusal
    if refused.item():
        raise PermissionError(f"{int(refused.item())} other worker(s) in this group refused the collective "
                              f"(an input derived from private data, with no approved release, or a bad "
                              f"argument): nothing was exchanged")


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=GROUP_TIMEOUT_S)


def _check_name(name: Any) -> None:
    if type(name) is not str or not name or len(name) > 64 or not name.replace("-", "").isalnum():
        raise ValueError("a group name is 1-64 letters, digits and dashes")
