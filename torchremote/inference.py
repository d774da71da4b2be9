"""What an op will return, worked out on the meta device, and cached.

A cold meta run costs 50-400 us (many meta kernels are Python decompositions); a cache keyed by the
op and its inputs' metadata makes a repeated op cost a dictionary lookup. An entry is only kept when
the meta run left every input's metadata as it found it, so a cache hit is exactly a re-run. Calls
that record autograd history are never cached: the stand-ins' meta graph is what lets `backward()`
give every parameter's stand-in its `.grad`, so `p.grad` needs no round trip. Calls that must
synchronise (a Python value is asked for, no meta kernel, an error) are cached as such.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .messages import TensorMeta

MAX_ENTRIES = 65536

IN, NEW, VALUE = 0, 1, 2


class Plan:
    """The outputs of a call: `IN` (the i-th flat input itself), `NEW` (a new tensor, its
    `TensorMeta`), `VALUE`."""

    __slots__ = ("spec", "leaves", "outputs")

    def __init__(self, spec: Any, leaves: list[tuple[int, Any]], outputs: list | None = None) -> None:
        self.spec = spec
        self.leaves = leaves
        self.outputs = outputs  # the meta tensors of this very run (kept views aliased); None when cached

    def new_meta(self, position: int) -> torch.Tensor:
        if self.outputs is not None:
            return self.outputs[position]
        return self.leaves[position][1].empty_meta()


_SYNC = object()
_cache: dict[Any, Any] = {}


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.storage_offset(), t.dtype, t.requires_grad, t.is_leaf, t._is_view(),
            t.device.type)


def _key(func: Callable, metas: list, spec: Any) -> Any:
    parts: list[Any] = [func, spec, torch.is_grad_enabled(), torch.is_inference_mode_enabled()]
    seen: dict[int, int] = {}
    for i, a in enumerate(metas):
        if isinstance(a, torch.Tensor):
            parts.append((seen.setdefault(id(a), i), _tensor_key(a)))
        elif type(a) is slice:
            parts.append((slice, a.start, a.stop, a.step))
        else:
            parts.append((type(a), a))
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def plan(func: Callable, name: str, metas: list, spec: Any) -> Plan | None:
    """The plan for `func` on these meta stand-ins and values, or None if the call must synchronise."""
    key = None if _records_autograd(metas) else _key(func, metas, spec)
    if key is not None:
        hit = _cache.get(key)
        if hit is not None:
            return None if hit is _SYNC else hit
    result, cacheable = _run_meta(func, name, metas, spec)
    if key is not None and cacheable and len(_cache) < MAX_ENTRIES:
        _cache[key] = _SYNC if result is None else Plan(result.spec, result.leaves)
    return result


def _records_autograd(metas: list) -> bool:
    """A call that adds to an autograd graph: the graph links the stand-ins, so it must really run."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in metas)


def _run_meta(func: Callable, name: str, metas: list, spec: Any) -> tuple[Plan | None, bool]:
    tensors = [a for a in metas if isinstance(a, torch.Tensor)]
    before = [_tensor_key(t) for t in tensors]
    try:
        args, kwargs = (tuple(metas), {}) if spec is None else tree_unflatten(metas, spec)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        out_flat, out_spec = tree_flatten(out)
    except Exception:
        return None, before == [_tensor_key(t) for t in tensors]
    unchanged = before == [_tensor_key(t) for t in tensors]
    position = {id(a): i for i, a in enumerate(metas) if isinstance(a, torch.Tensor)}
    leaves: list[tuple[int, Any]] = []
    for leaf in out_flat:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "meta" or leaf.layout != torch.strided:
                return None, unchanged  # the worker answers (or explains) what meta cannot stand in for
            i = position.get(id(leaf))
            leaves.append((IN, i) if i is not None else (NEW, TensorMeta.of(leaf)))
        elif leaf is None and not name.endswith("__get__"):  # a property (x.grad) can differ from meta
            leaves.append((VALUE, None))
        else:
            return None, unchanged
    return Plan(out_spec, leaves, out_flat), unchanged
