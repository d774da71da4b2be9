"""A torch call on RemoteTensors -> a message to their worker -> RemoteTensors back.

Every call first runs on the meta stand-ins: that checks it, and gives the outputs' metadata with no
round trip. If it yields tensors, the op is queued (asynchronous: it returns at once, with ids the
client allocated, and the worker runs it in order). If it cannot - a Python value is asked for
(`item`, `bool`), the output shape depends on data (`nonzero`), meta has no kernel, or the call is
an error - the call is made synchronously, so the caller gets the worker's value or the worker's own
exception. Errors the meta run cannot see surface at the next synchronisation, as with CUDA.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable

import torch
from torch.autograd import forward_ad
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..wire import codec, ops
from ..wire import messages as m
from ..wire.errors import published_read_only
from . import activation_checkpoints, arguments, autograd, inference, registry, tensor
from . import device as devices
from .device import BACKEND
from .inference import NO_GRAD
from .session import Session, autocast_dtype
from .tensor import RemoteTensor


_flatten, _unflatten = arguments.flatten, arguments.unflatten


def dispatch(func: Callable, args: tuple, kwargs: dict, worker: "Session | None" = None) -> Any:
    """Run `func` where its RemoteTensors live (or on `worker`, for a factory given its device)."""
    handler = registry.SPECIAL.get(func)
    if handler is not None:
        return handler(func, args, kwargs)
    flat, spec = _flatten(args, kwargs)
    if func in registry.LOCAL_QUERIES:
        margs, mkwargs = _unflatten([_stand_in(a) for a in flat], spec)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*margs, **mkwargs)
    return _remote(func, flat, spec, worker)


def remote_call(func: Callable, args: tuple, kwargs: dict, *, sync: bool = False) -> Any:
    """The generic path, for special handlers that end in an ordinary remote op (or, with `sync`,
    a synchronous one: the worker's answer, exactly)."""
    flat, spec = _flatten(args, kwargs)
    if not sync:
        return _remote(func, flat, spec)
    worker = worker_of(flat)
    name = ops.name_of(func)
    _check_sendable(name, flat)
    return _call_sync(worker, name, flat, spec, _local_bytes(flat))


def queue(func: Callable, args: tuple, kwargs: dict, *, returns_self: bool = False) -> tuple["Session", int]:
    """Queue `func` for its worker without planning it here (the caller knows what it returns;
    `returns_self`: the input it changed in place, which needs no pointer of its own)."""
    flat, spec = _flatten(args, kwargs)
    worker = worker_of(flat)
    name = ops.name_of(func)
    if name is None:
        raise NotImplementedError(f"torchremote cannot run {func!r} on a worker")
    _check_sendable(name, flat)
    wire_flat, nbytes = to_wire(flat)
    wire_args, wire_kwargs = _unflatten(wire_flat, spec)
    op_id = worker._call(name, wire_args, wire_kwargs, nbytes)
    if returns_self:
        worker._release(m.ClientRef(op_id, 0))
    return worker, op_id


def wrap_new(meta: m.TensorMeta, worker: "Session", ref: m.ClientRef) -> RemoteTensor:
    return RemoteTensor._wrap(meta, worker, ref)


def _local_bytes(flat: list) -> int:
    return sum(a.numel() * a.element_size() for a in flat
               if isinstance(a, torch.Tensor) and not isinstance(a, RemoteTensor))


def to_wire(flat: list) -> tuple[list, int]:
    """Pointers become references; local operands travel as a snapshot taken now (their bytes
    counted, for the message size)."""
    out, nbytes = [], 0
    for a in flat:
        if isinstance(a, torch.Tensor):
            if isinstance(a, RemoteTensor):
                a = a._ref
            else:
                nbytes += a.numel() * a.element_size()
                a = a.detach().clone()
        out.append(a)
    return out, nbytes


def _remote(func: Callable, flat: list, spec: Any, worker: "Session | None" = None) -> Any:
    if forward_ad._current_level >= 0 and not isinstance(func, torch._ops.OpOverload):
        # inside fwAD.dual_level(): torch's C++ carries the tangents, with ops on the pointers
        args, kwargs = _unflatten(flat, spec)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    name = ops.name_of(func)
    if name is None:
        _refuse_custom_function_ops(flat)
        worker_of(flat, worker)
        return _decompose(func, flat, spec)
    try:
        worker, key, grad = _scan(func, name, flat, spec, worker)
    except _WrappedPointer:
        if isinstance(func, torch._ops.OpOverload):
            raise
        # a torch.func transform's wrapper around a pointer: torch's C++ unwraps it, level by
        # level, and the ATen ops beneath reach `__torch_dispatch__` with the pointers themselves
        args, kwargs = _unflatten(flat, spec)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    except codec.EncodeError:
        if not isinstance(func, types.FunctionType):
            raise
        # a Python function given an argument that cannot travel (a module, an options object):
        # run it here, op by op, each of its ATen ops on the worker
        _refuse_custom_function_ops(flat)
        return _decompose(func, flat, spec)
    if grad and not torch.is_grad_enabled():  # pointers that require grad, under no_grad
        reentrant = activation_checkpoints.enter_reentrant()
        if reentrant:  # the forward of a reentrant checkpoint: recorded with grad, in its region
            with torch.enable_grad():
                worker, key, grad = _scan(func, name, flat, spec, worker)
                return _call(worker, func, name, flat, spec, key, grad)
        if reentrant is None:
            refuse_inside_custom_function()
    return _call(worker, func, name, flat, spec, key, grad)


def _refuse_custom_function_ops(flat: list) -> None:
    if not torch.is_grad_enabled() and any(isinstance(a, RemoteTensor) and a._rg for a in flat):
        if activation_checkpoints.enter_reentrant() is None:  # its ATen ops meet it there
            refuse_inside_custom_function()


_PLAIN = frozenset({RemoteTensor, float, bool, type(None), torch.dtype})  # nothing to check


def _check_sendable(name: str, flat: list) -> None:
    """Every argument checked before anything is queued: a bad one fails alone, losing nothing."""
    for a in flat:
        if type(a) in _PLAIN or isinstance(a, RemoteTensor) or isinstance(a, torch.device) and a.type == BACKEND:
            continue
        if isinstance(a, torch.Tensor):
            _check_local_tensor(name, a)
        else:
            codec.check_sendable(a)


class _WrappedPointer(RuntimeError):
    """A tensor on a remote device that is not a RemoteTensor: a torch.func transform's wrapper."""


def _check_local_tensor(name: str, t: torch.Tensor) -> None:
    """A local tensor operand, which travels with its op."""
    if t.device.type == BACKEND:
        raise _WrappedPointer(f"{name}: a {type(t).__qualname__} on {t.device} that is not a "
                              f"RemoteTensor (a torch.func transform's wrapper) cannot be sent as data")
    if t.device.type == "meta":
        raise RuntimeError(f"{name}: a meta tensor has no data to send to a worker")
    codec.check_sendable(t)


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


def worker_of(flat: list, worker: "Session | None" = None) -> "Session":
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
            _mixed(worker, other)
    if worker is None:
        raise RuntimeError("no RemoteTensor among the arguments")
    return worker


_META = torch.device("meta")


def _stand_in(a: Any) -> Any:
    return a._stand_in() if isinstance(a, RemoteTensor) else a


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _scan(func: Callable, name: str, flat: list, spec: Any, worker: "Session | None") -> tuple:
    """One pass over a call's arguments: the worker it runs on (an error if there are two), every
    argument checked before anything is queued (a bad one fails alone, losing nothing), and the
    plan's cache key - the op, the arguments' metadata and autograd standing, the grad mode - with
    whether any input requires grad (then the plan records autograd). The key is None when an
    argument is unhashable.

    Float scalars of a `_foreach_*` op count by type, not value: those ops are elementwise, so the
    value cannot change the plan, and an optimizer passes new ones every step (bias corrections,
    a scheduled learning rate)."""
    parts: list[Any] = [func, spec, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast_dtype()]
    elementwise = "_foreach_" in name
    grad = False
    seen: dict[int, int] = {}
    for i, a in enumerate(flat):
        kind = type(a)
        if kind is RemoteTensor:
            other = a._worker
            if worker is None:
                worker = other
            elif other is not worker:
                _mixed(worker, other)
            key = a._key
            if key is None:
                key = a._meta_key()
            if a._rg or a._view_base is not None:
                standing = autograd.standing(a)
                grad = grad or standing != NO_GRAD
            else:
                standing = NO_GRAD
            parts.append((seen.setdefault(id(a), i), key, standing))
        elif kind is float:
            parts.append(float if elementwise else (float, a))
        elif kind is int:
            if not -(1 << 63) <= a < (1 << 64):
                codec.check_sendable(a)  # raises: it does not fit in 64 bits
            parts.append((int, a))
        elif kind is bool or a is None:
            parts.append((kind, a))
        elif isinstance(a, torch.Tensor):
            _check_local_tensor(name, a)
            parts.append((seen.setdefault(id(a), i), "local", inference.tensor_key(a)))
        elif isinstance(a, torch.device) and a.type == BACKEND:
            other = devices.worker_of(a)
            if worker is None:
                worker = other
            elif other is not worker:
                _mixed(worker, other)
            parts.append((torch.device, a))
        else:
            codec.check_sendable(a)
            parts.append((slice, a.start, a.stop, a.step) if kind is slice else (kind, a))
    if worker is None:
        raise RuntimeError("no RemoteTensor among the arguments")
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        key = None
    return worker, key, grad


def _mixed(worker: "Session", other: "Session") -> None:
    raise RuntimeError(  # torch's own words first: users and their tests look for them
        f"Expected all tensors to be on the same device, but found at least two devices, "
        f"{worker.device} and {other.device}! (torchremote: worker {worker.id!r} and worker "
        f"{other.id!r}; bring them to one worker first: x.move(worker), or x.to({worker.device}))")


def _plan(worker: "Session", func: Callable, name: str, flat: list, spec: Any, key: Any,
          grad: bool) -> inference.Plan | None:
    if key is not None:
        hit = inference.lookup(key)
        if hit is not None:
            return None if hit is inference.SYNC else hit
    inputs = []
    for a in flat:
        if isinstance(a, RemoteTensor):
            inputs.append(a._stand_in())
        elif isinstance(a, torch.Tensor):
            inputs.append(_meta_like(a))
        elif isinstance(a, torch.device) and a.type == BACKEND:
            inputs.append(_META)  # a factory for the worker: inferred on meta
        else:
            inputs.append(a)
    standings = None
    if grad:
        standings = [autograd.standing(a) if isinstance(a, RemoteTensor) else NO_GRAD for a in flat]
    autocast = autocast_dtype()
    if autocast is not None:
        autocast = (worker.compute_device.type, autocast)
    return inference.plan(func, name, key, inputs, standings, spec, autocast)


def _call(worker: "Session", func: Callable, name: str, flat: list, spec: Any, key: Any, grad: bool) -> Any:
    plan = _plan(worker, func, name, flat, spec, key, grad)
    if plan is None:
        return _call_sync(worker, name, flat, spec, _local_bytes(flat))
    outs = plan.outs
    for out in outs:
        if out.kind == inference.IN:
            _check_writable(name, worker, flat[out.payload])
    wire_flat, nbytes = to_wire(flat)
    wire_args, wire_kwargs = _unflatten(wire_flat, spec)
    op_id = worker._call(name, wire_args, wire_kwargs, nbytes, plan.new_bytes)
    metas = plan.metas
    results, k = [], 0
    for position, out in enumerate(outs):
        kind = out.kind
        if kind == inference.VALUE:
            results.append(out.payload)
            continue
        ref = m.ClientRef(op_id, k)
        k += 1
        if kind == inference.IN:  # in place, or out=: the very object it was called on
            worker._release(ref)
            target = flat[out.payload]
            if metas is not None:  # an uncached run: it may have changed the target's metadata
                target._metadata_changed()
            results.append(target)
            continue
        r = RemoteTensor._wrap(out.payload, worker, ref, out.key, metas[position] if metas is not None else None)
        if out.view_of is not None:
            source = flat[out.view_of]
            if isinstance(source, RemoteTensor):
                base = source._view_base
                if base is None:
                    base = source
                r._view_base = base
                r._fam_version = base._fam_version
        results.append(r)
    if plan.records_grad:
        autograd.record(plan, flat, results)
    if plan.spec is None:
        return results[0]
    return tree_unflatten(results, plan.spec)


def _check_writable(name: str, worker: "Session", target: Any) -> None:
    """An op may write into a pointer of this worker's, unless it points into read-only published
    data (the worker refuses that too; saying so here raises it at the call)."""
    if not isinstance(target, RemoteTensor):
        raise RuntimeError(f"{name} would write its result into a local tensor; the op runs on "
                           f"worker {worker.id!r}: use a RemoteTensor there (or .get() first)")
    base = target._view_base
    if base is None:
        base = target
    published = base._published
    if published is not None and not published.writable:
        raise published_read_only(published.tags[0] if published.tags else base.id, ops.short_name(name))


def _call_sync(worker: "Session", name: str, flat: list, spec: Any, nbytes: int) -> Any:
    args, kwargs = _unflatten([a._ref if isinstance(a, RemoteTensor) else a for a in flat], spec)
    op_id, value = worker._call_sync(name, args, kwargs, nbytes)
    return _rebuild(worker, op_id, value, flat, name)


def remote_call_sync(worker: "Session", op: str, args: tuple) -> Any:
    """One of the worker's own ops (named, with wire arguments), answered: its tensors as pointers."""
    op_id, value = worker._call_sync(op, args, {}, 0)
    return _rebuild(worker, op_id, value, [], op)


def run_remote(worker: "Session", fn: Callable, args: tuple, kwargs: dict) -> Any:
    """Run a client function on `worker` in one round trip: pointers in, pointers (or values) out."""
    flat, spec = tree_flatten((args, kwargs))
    worker = worker_of(flat, worker)
    _check_sendable(getattr(fn, "__qualname__", "run"), flat)
    nbytes = _local_bytes(flat)
    wire_args, wire_kwargs = tree_unflatten([a._ref if isinstance(a, RemoteTensor) else a for a in flat], spec)
    op_id, value = worker._run_sync(fn, wire_args, wire_kwargs, nbytes)
    return _rebuild(worker, op_id, value, flat, getattr(fn, "__qualname__", "run"))


def _rebuild(worker: "Session", op_id: int, value: Any, flat: list, name: str) -> Any:
    """RemoteTensors for the tensors in a synchronous reply (the inputs themselves where they were)."""
    inputs = {a._ref: a for a in flat if isinstance(a, RemoteTensor)}
    leaves, out_spec = tree_flatten(value)
    results, k, new = [], 0, []
    for leaf in leaves:
        if isinstance(leaf, m.TensorMeta):
            new.append(RemoteTensor._wrap(leaf, worker, m.ClientRef(op_id, k)))
            results.append(new[-1])
            k += 1
        elif isinstance(leaf, m.SameAs):
            worker._release(m.ClientRef(op_id, k))
            k += 1
            results.append(inputs[leaf.ref])
        else:
            results.append(leaf)
    autograd.rebuild_outputs(flat, name, new)
    return tree_unflatten(results, out_spec)


def refuse_inside_custom_function() -> None:
    """A custom autograd.Function's forward running op by op on pointers would lose its backward on
    the worker (the worker sees plain ops run without grad). Say so, instead of training wrongly."""
    frame = sys._getframe(3)
    for _ in range(24):  # deep enough for nested modules (Sequential in a checkpoint)
        if frame is None:
            return
        ctx = frame.f_locals.get("ctx") if frame.f_code.co_name == "forward" else None
        if isinstance(ctx, torch.autograd.function.FunctionCtx):
            owner = type(ctx).__name__.removesuffix("Backward")
            raise RuntimeError(
                f"the custom autograd.Function {owner!r} is running on RemoteTensors op by op, so its "
                f"backward would not exist on the worker. Decorate it with @torchremote.remote to run "
                f"it whole on the worker (which must be started with --allow-code)")
        frame = frame.f_back


tensor.use_dispatcher(dispatch)
