"""A torch call on RemoteTensors -> a message to their worker -> RemoteTensors back.

Every call first runs on the meta stand-ins: that checks it, and gives the outputs' metadata with no
round trip. If it yields tensors, the op is queued (asynchronous: it returns at once, with ids the
client allocated, and the worker runs it in order). If it cannot - a Python value is asked for
(`item`, `bool`), the output shape depends on data (`nonzero`), meta has no kernel, or the call is
an error - the call is made synchronously, so the caller gets the worker's value or the worker's own
exception. Errors the meta run cannot see surface at the next synchronisation, as with CUDA.
"""
from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import device as devices
from . import messages as m
from . import inference, ops, remote_code, wire
from .device import BACKEND
from .tensor import RemoteTensor

if TYPE_CHECKING:
    from .client import Worker


_FLAT = None  # the spec of a call whose arguments are all leaves: no pytree needed
_CONTAINERS = (list, tuple, dict)


def _flatten(args: tuple, kwargs: dict) -> tuple[list, Any]:
    if not kwargs and not any(isinstance(a, _CONTAINERS) for a in args):
        return list(args), _FLAT
    return tree_flatten((args, kwargs))


def _unflatten(flat: list, spec: Any) -> tuple[tuple, dict]:
    return (tuple(flat), {}) if spec is _FLAT else tree_unflatten(flat, spec)


def dispatch(func: Callable, args: tuple, kwargs: dict, worker: "Worker | None" = None) -> Any:
    """Run `func` where its RemoteTensors live (or on `worker`, for a factory given its device)."""
    handler = ops.SPECIAL.get(func)
    if handler is not None:
        return handler(func, args, kwargs)
    flat, spec = _flatten(args, kwargs)
    if func in ops.LOCAL_QUERIES:
        margs, mkwargs = _unflatten([_stand_in(a) for a in flat], spec)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*margs, **mkwargs)
    return _remote(func, flat, spec, worker)


def remote_call(func: Callable, args: tuple, kwargs: dict) -> Any:
    """The generic path, for special handlers that end in an ordinary remote op."""
    return _remote(func, *_flatten(args, kwargs))


def _remote(func: Callable, flat: list, spec: Any, worker: "Worker | None" = None) -> Any:
    worker = worker_of(flat, worker)
    if not torch.is_grad_enabled() and any(isinstance(a, RemoteTensor) and a._meta.requires_grad for a in flat):
        remote_code.refuse_inside_custom_function()
    name = ops.name_of(func)
    if name is None:
        return _decompose(func, flat, spec)
    try:
        _check_sendable(name, worker, flat)
    except wire.EncodeError:
        if not isinstance(func, types.FunctionType):
            raise
        # a Python function given an argument that cannot travel (a module, an options object):
        # run it here, op by op, each of its ATen ops on the worker
        return _decompose(func, flat, spec)
    return _call(worker, func, name, flat, spec)


def _check_sendable(name: str, worker: "Worker", flat: list) -> None:
    """Every argument checked before anything is queued: a bad one fails alone, losing nothing."""
    for a in flat:
        if isinstance(a, RemoteTensor) or isinstance(a, torch.device) and a.type == BACKEND:
            continue
        if isinstance(a, torch.Tensor) and a.device.type == "meta":
            raise RuntimeError(f"{name}: a meta tensor has no data to send to worker {worker.id!r}")
        wire.check_sendable(a)


def _decompose(func: Callable, flat: list, spec: Any) -> Any:
    """A call with no name of its own (`nn.init.*`, `Tensor.new_zeros`, a custom op's composite
    kernel), or a Python function given an argument that cannot travel, runs here with interception
    off: its body's ATen ops reach `__torch_dispatch__`, and each of those is named and sent."""
    refusal = NotImplementedError(
        f"torchremote cannot run {getattr(func, '__qualname__', func)!r} on a worker: it is not a "
        f"torch function, Tensor method or ATen op it may run, and has no decomposition into them")
    if ops.is_denied(func):
        raise refusal
    args, kwargs = _unflatten(flat, spec)
    with torch._C.DisableTorchFunctionSubclass():
        if isinstance(func, torch._ops.OpOverload):  # an op outside aten: its composite decomposition
            result = func.decompose(*args, **kwargs)
            if result is NotImplemented:
                raise refusal
            return result
        return func(*args, **kwargs)


def worker_of(flat: list, worker: "Worker | None" = None) -> "Worker":
    """The one worker whose tensors (or devices) an op uses; an error naming both if there are two."""
    for a in flat:
        if isinstance(a, RemoteTensor):
            other = a._worker
        elif isinstance(a, torch.device) and a.type == BACKEND:
            other = devices.worker_of(a)
        else:
            continue
        if worker is None:
            worker = other
        elif other is not worker:
            raise RuntimeError(
                f"this op mixes tensors on worker {worker.id!r} ({worker.device}) and worker "
                f"{other.id!r} ({other.device}); bring them to one worker first, for example "
                f"with x.move(worker)")
    if worker is None:
        raise RuntimeError("no RemoteTensor among the arguments")
    return worker


_META = torch.device("meta")


def _stand_in(a: Any) -> Any:
    return a._meta if isinstance(a, RemoteTensor) else a


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return out.requires_grad_(True) if t.requires_grad else out


def _call(worker: "Worker", func: Callable, name: str, flat: list, spec: Any) -> Any:
    metas, nbytes = [], 0
    for a in flat:
        if isinstance(a, RemoteTensor):
            metas.append(a._meta)
        elif isinstance(a, torch.Tensor):
            metas.append(_meta_like(a))
            nbytes += a.numel() * a.element_size()
        elif isinstance(a, torch.device) and a.type == BACKEND:
            metas.append(_META)  # a factory for the worker: inferred on meta
        else:
            metas.append(a)
    plan = inference.plan(func, name, metas, spec)
    if plan is None:
        return _call_sync(worker, name, flat, spec, nbytes)
    for kind, i in plan.leaves:
        if kind == inference.IN and not isinstance(flat[i], RemoteTensor):
            raise RuntimeError(f"{name} would write its result into a local tensor; the op runs on "
                               f"worker {worker.id!r}: use a RemoteTensor there (or .get() first)")
    # local operands travel as a snapshot taken now, whenever the batch is sent
    wire_args, wire_kwargs = _unflatten(
        [a._ref if isinstance(a, RemoteTensor) else a.detach().clone() if isinstance(a, torch.Tensor)
         else a for a in flat], spec)
    op_id = worker._call(name, wire_args, wire_kwargs, nbytes)
    results, k = [], 0
    for position, (kind, payload) in enumerate(plan.leaves):
        if kind == inference.VALUE:
            results.append(payload)
            continue
        ref = m.ClientRef(op_id, k)
        k += 1
        if kind == inference.IN:  # in place, or out=: the very object it was called on
            worker._release(ref)
            results.append(flat[payload])
        else:
            results.append(RemoteTensor._wrap(plan.new_meta(position), worker, ref))
    return tree_unflatten(results, plan.spec)


def _call_sync(worker: "Worker", name: str, flat: list, spec: Any, nbytes: int) -> Any:
    args, kwargs = _unflatten([a._ref if isinstance(a, RemoteTensor) else a for a in flat], spec)
    op_id, value = worker._call_sync(name, args, kwargs, nbytes)
    return _rebuild(worker, op_id, value, flat)


def run_remote(worker: "Worker", fn: Callable, args: tuple, kwargs: dict) -> Any:
    """Run a client function on `worker` in one round trip: pointers in, pointers (or values) out."""
    flat, spec = tree_flatten((args, kwargs))
    worker = worker_of(flat, worker)
    _check_sendable(getattr(fn, "__qualname__", "run"), worker, flat)
    nbytes = sum(a.numel() * a.element_size() for a in flat
                 if isinstance(a, torch.Tensor) and not isinstance(a, RemoteTensor))
    wire_args, wire_kwargs = tree_unflatten([a._ref if isinstance(a, RemoteTensor) else a for a in flat], spec)
    op_id, value = worker._run_sync(fn, wire_args, wire_kwargs, nbytes)
    return _rebuild(worker, op_id, value, flat)


def _rebuild(worker: "Worker", op_id: int, value: Any, flat: list) -> Any:
    """RemoteTensors for the tensors in a synchronous reply (the inputs themselves where they were)."""
    inputs = {a._ref: a for a in flat if isinstance(a, RemoteTensor)}
    leaves, out_spec = tree_flatten(value)
    results, k = [], 0
    for leaf in leaves:
        if isinstance(leaf, m.TensorMeta):
            results.append(RemoteTensor._wrap(leaf.empty_meta(), worker, m.ClientRef(op_id, k)))
            k += 1
        elif isinstance(leaf, m.SameAs):
            worker._release(m.ClientRef(op_id, k))
            k += 1
            results.append(inputs[leaf.ref])
        else:
            results.append(leaf)
    return tree_unflatten(results, out_spec)


from . import special  # noqa: E402,F401  (registers the special handlers)
