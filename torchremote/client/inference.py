"""What an op will return, worked out on the meta device, and cached.

A cold meta run costs 50-400 us (many meta kernels are Python decompositions); a cache keyed by the
op and its inputs' metadata makes a repeated op cost a dictionary lookup. An entry is only kept when
the meta run left every input's metadata as it found it, so a cache hit is exactly a re-run. Calls
that must synchronise (a Python value is asked for, no meta kernel, an error) are cached as such.

The stand-ins never require grad: autograd is bookkept on the client (`autograd.py`). When an input
requires grad, the cold run also replays the call once under autograd, on fresh meta tensors shaped
like the inputs and built with the same autograd standing (leaf, non-leaf, view of either), and the
plan keeps what that says: which outputs require grad, their `grad_fn` names, and which inputs each
output's history reaches. A warm call records autograd with no meta work at all.

Inside `torch.autocast` for the remote device the worker casts with its own device's rules, which
meta tensors do not follow (autocast keys off a tensor's device): a cold plan then runs the call
once more on fake tensors of the worker's device type, with that device's autocast on, and takes
the outputs' dtypes from there. Plans are cached per autocast dtype.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten

from ..wire.messages import TensorMeta
from . import arguments

MAX_ENTRIES = 65536

IN, NEW, VALUE = 0, 1, 2

# The autograd standing of a tensor input, part of the cache key (see `autograd.standing`).
NO_GRAD, LEAF, NON_LEAF, VIEW_OF_LEAF, VIEW_OF_NON_LEAF = range(5)


class Out:
    """One flat output of a call.

    `kind` IN: the flat input `payload` itself (in place, `out=`); NEW: a new tensor, `payload` its
    `TensorMeta`, `key` its metadata key, `view_of` the flat input whose storage it aliases (or
    None); VALUE: the Python value `payload`. `grad` (when an input required grad): a tuple
    `(requires_grad, grad_fn name or None, flat input positions its history reaches, recorded)`.
    """

    __slots__ = ("kind", "payload", "key", "view_of", "grad")

    def __init__(self, kind: int, payload: Any, key: Any = None, view_of: int | None = None) -> None:
        self.kind, self.payload, self.key, self.view_of, self.grad = kind, payload, key, view_of, None


class Plan:
    """The outputs of a call (`outs`, flat, and `spec` to rebuild them, None for a single output),
    and for an uncached run the meta tensors it produced (`metas`, views still aliasing the inputs'
    stand-ins)."""

    __slots__ = ("spec", "outs", "metas", "records_grad", "new_bytes")

    def __init__(self, spec: Any, outs: list[Out], metas: list | None = None) -> None:
        self.spec = spec
        self.outs = outs
        self.metas = metas
        self.records_grad = any(o.grad is not None for o in outs)
        # the memory its new outputs take on the worker (views take none): checked there before it runs
        self.new_bytes = sum(math.prod(o.payload.shape) * o.payload.dtype.itemsize for o in outs
                             if o.kind == NEW and o.view_of is None)


SYNC = object()  # cached for a call that must synchronise
_cache: dict[Any, Any] = {}


def lookup(key: Any) -> Any:
    """A cached plan, `SYNC`, or None when this key has not been planned."""
    return _cache.get(key)


class MetaKey:
    """The metadata a meta run depends on (shape, strides, storage offset, dtype), as a part of a
    cache key whose hash is worked out once: a plan's outputs share theirs, so the keys of the
    calls that use them hash and compare in a few steps."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: tuple) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (type(other) is MetaKey and self._hash == other._hash
                                 and self.value == other.value)

    def __repr__(self) -> str:
        return f"MetaKey{self.value}"


def tensor_key(t: torch.Tensor) -> MetaKey:
    return MetaKey((tuple(t.shape), t.stride(), t.storage_offset(), t.dtype))


def plan(func: Callable, name: str, key: Any, inputs: list, standings: list | None, spec: Any,
         autocast: tuple[str, torch.dtype] | None = None) -> Plan | None:
    """Plan `func` by running it on meta (the caller looked `key` up first); None if the call must
    synchronise.

    `key` is the cache key (None: uncacheable); `inputs` the flat arguments with meta stand-ins for
    tensors; `standings` the autograd standing of each flat input (None when none requires grad);
    `autocast` the worker's device type and the autocast dtype, inside an autocast region.
    """
    before = [tensor_key(a) if isinstance(a, torch.Tensor) else None for a in inputs]
    result, unchanged = _run_meta(func, name, inputs, spec, before)
    if result is not None and autocast is not None:
        result = _autocast_dtypes(result, func, inputs, spec, *autocast)
    if result is not None and standings is not None:
        if not _add_autograd(result, func, inputs, before, standings, spec):
            result = None  # autograd refuses the call (in place on a leaf...): the worker says why
    if key is not None and unchanged and len(_cache) < MAX_ENTRIES:
        _cache[key] = SYNC if result is None else Plan(result.spec, result.outs)
    return result


def _run_meta(func: Callable, name: str, inputs: list, spec: Any, before: list) -> tuple[Plan | None, bool]:
    try:
        args, kwargs = arguments.unflatten(inputs, spec)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        out_flat, out_spec = tree_flatten(out)
        if out_spec.is_leaf():
            out_spec = None  # one output: no pytree to rebuild
    except Exception:
        return None, _unchanged(inputs, before)
    unchanged = _unchanged(inputs, before)
    position = {id(a): i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)}
    outs: list[Out] = []
    for leaf in out_flat:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "meta" or leaf.layout != torch.strided:
                return None, unchanged  # the worker answers (or explains) what meta cannot stand in for
            i = position.get(id(leaf))
            if i is not None:
                outs.append(Out(IN, i))
            else:
                base = leaf._base if leaf._is_view() else None
                view_of = None
                if base is not None:
                    view_of = next((j for j, a in enumerate(inputs) if isinstance(a, torch.Tensor)
                                    and (a is base or a._base is base)), None)
                elif _below_views():  # reached from torch's C++ (a torch.func transform): no _base
                    storage = leaf.untyped_storage()._cdata
                    view_of = next((j for j, a in enumerate(inputs) if isinstance(a, torch.Tensor)
                                    and a.untyped_storage()._cdata == storage), None)
                outs.append(Out(NEW, TensorMeta.of(leaf), tensor_key(leaf), view_of))
        elif leaf is None and not name.endswith("__get__"):  # a property (x.grad) can differ from meta
            outs.append(Out(VALUE, None))
        else:
            return None, unchanged
    return Plan(out_spec, outs, out_flat), unchanged


def _below_views() -> bool:
    """Whether this runs beneath torch's view tracking (inside `__torch_dispatch__`), where a view
    op's result shares its input's storage but records no `_base`."""
    return torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.ADInplaceOrView)


def _autocast_dtypes(result: Plan, func: Callable, inputs: list, spec: Any, device_type: str,
                     dtype: torch.dtype) -> Plan | None:
    """`result` with the dtypes autocast gives on the worker's device, found on fake tensors of
    that device type. Where the fake run fails (a binding that wants the real device), a plan whose
    outputs are all views or inputs stands (autocast never changes those); anything else
    synchronises, and the worker says."""
    try:
        with FakeTensorMode(), _autocast_on(device_type, dtype):
            fakes: dict[int, torch.Tensor] = {}
            flat = [_fake(a, device_type, fakes) if isinstance(a, torch.Tensor) else a for a in inputs]
            args, kwargs = arguments.unflatten(flat, spec)
            with torch._C.DisableTorchFunctionSubclass():
                out_flat = tree_flatten(func(*args, **kwargs))[0]
    except Exception:
        keeps_dtypes = all(o.kind != NEW or o.view_of is not None for o in result.outs)
        return result if keeps_dtypes else None
    tensors = [t for t in out_flat if isinstance(t, torch.Tensor)]
    positions = [i for i, o in enumerate(result.outs) if o.kind != VALUE]
    if len(tensors) != len(positions):
        return None
    for position, t in zip(positions, tensors):
        out = result.outs[position]
        if out.kind == NEW and t.dtype != out.payload.dtype:
            meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            out.payload, out.key, out.view_of = TensorMeta.of(meta), tensor_key(meta), None
            result.metas[position] = meta
    return result


def _fake(meta: torch.Tensor, device_type: str, made: dict[int, torch.Tensor]) -> torch.Tensor:
    """A fake tensor on `device_type` shaped like a meta stand-in (one per stand-in, so that an
    argument given twice stays one tensor)."""
    t = made.get(id(meta))
    if t is None:
        t = made[id(meta)] = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=device_type)
    return t


@contextlib.contextmanager
def _autocast_on(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """That device type's autocast, on for this thread; set directly, since `torch.autocast`
    turns itself off for a device this process lacks (the worker's GPU, from a laptop)."""
    enabled, before = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device_type, enabled)
        torch.set_autocast_dtype(device_type, before)


def _unchanged(inputs: list, before: list) -> bool:
    return all(b is None or tensor_key(a) == b for a, b in zip(inputs, before))


# --- autograd: the call replayed once on fresh inputs that carry the inputs' standing ---------------

def _fresh(key: MetaKey, standing: int) -> torch.Tensor:
    shape, stride, offset, dtype = key.value
    if standing in (VIEW_OF_LEAF, VIEW_OF_NON_LEAF):
        extent = 1 + offset + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else offset
        base = torch.empty(extent, dtype=dtype, device="meta", requires_grad=True)
        if standing == VIEW_OF_NON_LEAF:
            base = base.clone()
        return base.as_strided(shape, stride, offset)
    t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    if offset:
        t = t.as_strided(shape, stride, offset)
    if standing == NO_GRAD:
        return t
    t.requires_grad_(True)
    return t.clone() if standing == NON_LEAF else t


def _add_autograd(result: Plan, func: Callable, inputs: list, before: list, standings: list,
                  spec: Any) -> bool:
    """Fill in each output's `grad`; False if autograd refuses the call."""
    with _autograd_on():
        return _replay(result, func, inputs, before, standings, spec)


def _replay(result: Plan, func: Callable, inputs: list, before: list, standings: list, spec: Any) -> bool:
    fresh: list = []
    made: dict[int, torch.Tensor] = {}
    for a, key, standing in zip(inputs, before, standings):
        if key is None:
            fresh.append(a)
            continue
        t = made.get(id(a))
        if t is None:
            t = made[id(a)] = _fresh(key, standing)
        fresh.append(t)
    stops: dict[int, int] = {}  # id of an input's grad_fn (or of a leaf input) -> its flat position
    differentiable: dict[int, tuple[int, torch.Tensor]] = {}  # the inputs that require grad, once each
    for i, (t, standing) in enumerate(zip(fresh, standings)):
        if standing == NO_GRAD or not isinstance(t, torch.Tensor):
            continue
        differentiable.setdefault(id(t), (i, t))
        stops.setdefault(id(t) if standing == LEAF else id(t.grad_fn), i)
        if standing in (VIEW_OF_LEAF, VIEW_OF_NON_LEAF):  # in place on a view: its base's history
            base = t._base
            stops.setdefault(id(base) if standing == VIEW_OF_LEAF else id(base.grad_fn), i)
    grad_fns_before = [t.grad_fn if isinstance(t, torch.Tensor) else None for t in fresh]
    try:
        args, kwargs = arguments.unflatten(fresh, spec)
        with torch._C.DisableTorchFunctionSubclass():
            out_flat = tree_flatten(func(*args, **kwargs))[0]
    except Exception:
        return False
    tensors = [o for o in out_flat if isinstance(o, torch.Tensor)]
    if len(tensors) != sum(o.kind != VALUE for o in result.outs):
        return False
    for out, t in zip((o for o in result.outs if o.kind != VALUE), tensors):
        fn = t.grad_fn
        recorded = fn is not None and (out.kind == NEW or fn is not grad_fns_before[out.payload])
        reaches, python_backward = _reaches(fn, stops) if recorded else ((), False)
        if recorded and out.kind == NEW and not python_backward:
            # (a backward written in Python, as torch.library custom ops have, may not run on meta)
            reaches = _defined_grads(t, list(differentiable.values()), reaches)
        out.grad = (t.requires_grad, fn.name() if fn is not None else None, reaches, recorded)
    result.records_grad = True
    return True


def _defined_grads(output: torch.Tensor, inputs: list[tuple[int, torch.Tensor]],
                   reaches: tuple[int, ...]) -> tuple[int, ...]:
    """Of the inputs `output`'s graph reaches, those that get a defined gradient, found by running
    its backward on meta once. Exact where the graph alone is not: some backward formulas give an
    undefined gradient (torch's None) to an input they reach, as `norm(x, 0)` does. `reaches`
    itself if the backward cannot run on meta."""
    inputs = [(i, t) for i, t in inputs if i in reaches]
    if not inputs:
        return reaches
    try:
        grads = torch.autograd.grad([output], [t for _, t in inputs], [torch.empty_like(output)],
                                    retain_graph=True, allow_unused=True)
    except Exception:
        return reaches
    return tuple(sorted(i for (i, _), g in zip(inputs, grads) if g is not None))


def _autograd_on() -> Any:
    """Autograd for this run even where the call arrived below it (an ATen op that reached
    `__torch_dispatch__`, where torch has switched autograd off for the rest of the call)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _reaches(fn: Any, stops: dict[int, int]) -> tuple[tuple[int, ...], bool]:
    """The flat input positions whose history the graph under `fn` reaches (in order, once each),
    and whether a backward written in Python is on the way."""
    found: list[int] = []
    seen: set[int] = set()
    python_backward = False
    todo = [fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        python_backward = python_backward or isinstance(node, torch.autograd.function.BackwardCFunction)
        if id(node) in stops and node is not fn:
            found.append(stops[id(node)])
            continue
        variable = getattr(node, "variable", None)  # AccumulateGrad of a leaf input
        if variable is not None:
            if id(variable) in stops:
                found.append(stops[id(variable)])
            continue
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return tuple(sorted(set(found))), python_backward
