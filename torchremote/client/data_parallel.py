"""Data-parallel training over workers, as DDP does it: one replica per worker, made equal by a
broadcast from the first, and gradients averaged after `backward()` by all-reduces over flattened
buckets. The loop stays the user's own, run over the replicas; no tensor bytes pass through here.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .collectives import Group, _group_of, all_reduce_, broadcast_
from .module import send
from .session import Session

BUCKET_BYTES = 25 << 20  # DDP's default bucket size


def replicate(model: nn.Module, workers: Sequence[Session], group: Group | None = None) -> list[nn.Module]:
    """One copy of `model` on each worker (the model itself is left as it is). Its bytes travel
    once, to the first worker; the others make empty tensors of their own and receive them by
    broadcast, worker to worker."""
    workers = list(workers)
    first = send(copy.deepcopy(model), workers[0])
    replicas = [first]
    for w in workers[1:]:
        replicas.append(_empty_copy(model, w))
    if len(workers) > 1:
        tensors = [_state(r) for r in replicas]
        g = group if group is not None else _group_of([t[0] for t in tensors], None)
        for same in zip(*tensors):
            broadcast_(list(same), src=0, group=g)
    return replicas


def average_gradients(replicas: Sequence[nn.Module], group: Group | None = None,
                      bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average the replicas' `.grad`s across workers (call it after `backward()`, before the
    optimizers' `step()`): each bucket of gradients is flattened on its worker, all-reduced, and
    copied back."""
    grads = [[p.grad for p in r.parameters() if p.grad is not None] for r in replicas]
    if len({len(g) for g in grads}) != 1:
        raise ValueError("the replicas have gradients for different parameters: is each one's backward done?")
    if not grads[0]:
        return
    g = group if group is not None else _group_of([gs[0] for gs in grads], None)
    for start, stop in _buckets(grads[0], bucket_bytes):
        flats = [torch.cat([t.reshape(-1) for t in gs[start:stop]]) for gs in grads]
        all_reduce_(flats, "avg", group=g)
        for gs, flat in zip(grads, flats):
            offset = 0
            for t in gs[start:stop]:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n


def _empty_copy(model: nn.Module, worker: Session) -> nn.Module:
    """`model`'s structure with empty tensors on `worker`: a tensor shared by two modules (tied
    weights) is one tensor there too (`to_empty` would make two)."""
    replica = copy.deepcopy(model)
    made: dict[int, torch.Tensor] = {}
    for module in replica.modules():
        for name, p in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            if id(p) not in made:
                made[id(p)] = nn.Parameter(torch.empty_like(p, device=worker.device), requires_grad=p.requires_grad)
            setattr(module, name, made[id(p)])
        for name, b in list(module.named_buffers(recurse=False, remove_duplicate=False)):
            if id(b) not in made:
                made[id(b)] = torch.empty_like(b, device=worker.device)
            setattr(module, name, made[id(b)])
    return replica


def _state(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[tuple[int, int]]:
    """Runs of tensors of one dtype, each of at most `bucket_bytes` (or one tensor larger)."""
    runs, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if i > start and (size + nbytes > bucket_bytes or t.dtype != tensors[start].dtype):
            runs.append((start, i))
            start, size = i, 0
        size += nbytes
    runs.append((start, len(tensors)))
    return runs
