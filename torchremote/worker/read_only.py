"""Published data stays as its owner published it: no client op writes into its memory.

The check is made where every write happens, in ATen: an op that touches published memory runs
under `ReadOnlyGuard`, which refuses any ATen call whose schema says it writes (`Tensor(a!)`:
in-place ops, `out=`, `copy_`, `set_`, `resize_`, a foreach optimizer update, batch norm's
running stats) into a tensor whose storage is published read-only. Views of published data share
its storage, so a write through a view is refused too, and so is one through any tensor made to
alias it. What a client sends cannot get past it: the worker sees the storage, not the client's word.

Attributes of the tensor object (`requires_grad`, `.grad`, `.data =`) never reach the owner's
object: each session computes on an alias of its own (`own_alias`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..wire.errors import published_read_only
from .store import storage_key

# ATen op -> (positions, names) of the arguments it writes into; () for ops that write nothing
_WRITES: dict[Any, tuple[tuple[int, str], ...]] = {}


def _written_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    written = _WRITES.get(func)
    if written is None:
        schema = func._schema
        written = tuple((i, a.name) for i, a in enumerate(schema.arguments)
                        if a.alias_info is not None and a.alias_info.is_write) if schema.is_mutable else ()
        _WRITES[func] = written
    return written


def own_alias(published: torch.Tensor) -> torch.Tensor:
    """A session's own tensor object over the published memory: its flags, `.grad` and `.data`
    are the session's, its values the owner's."""
    return published.detach()


class ReadOnlyGuard(TorchDispatchMode):
    """Refuses ATen writes into the storages of `protected` (storage -> the name errors give)."""

    def __init__(self, protected: dict[int, str], op: str) -> None:
        super().__init__()
        self.protected, self.op = protected, op

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for position, name in _written_arguments(func):
            target = args[position] if position < len(args) else kwargs.get(name)
            for t in target if isinstance(target, (list, tuple)) else (target,):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    published = self.protected.get(storage_key(t))
                    if published is not None:
                        raise published_read_only(published, self.op)
        return func(*args, **kwargs)


def touches(protected: dict[int, str], tensors: list[torch.Tensor]) -> bool:
    """Whether any of these tensors shares memory with protected data."""
    for t in tensors:
        if storage_key(t) in protected:
            return True
    return False
