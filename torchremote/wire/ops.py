"""The op vocabulary both sides share: torch callable <-> stable name, and the worker's allow-list.

Names come from `torch.overrides.resolve_name` ("torch.add", "torch.Tensor.add",
"torch.Tensor.__radd__", "torch.Tensor.T.__get__", "torch.nn.functional.relu", ...), plus ATen
overloads ("aten.zero_.default") and Tensor property setters. A worker turns a name back into a
callable only through `resolve`, which looks it up in tables built from torch itself: a name outside
them - `os.system`, `builtins.eval`, anything imported from elsewhere - is refused, and nothing named
by the network is ever imported. Calls that touch storage, hooks, pickling or files are refused too.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch.overrides import get_overridable_functions, resolve_name

from .errors import WorkerPermissionError

_TensorBase = torch._C.TensorBase
_GETSET = type(_TensorBase.__dict__["shape"])
_DENIED = re.compile(
    r"storage(?!_offset)|hook|dlpack|numpy|__array|share_memory|__reduce|__setstate__|__getstate__"
    r"|from_file|module_load|data_ptr|_cdata|__deepcopy__|pin_memory|_make_subclass|_make_wrapper"
)
_ATEN_NAMESPACES = ("aten", "prims", "torch_nn")  # torch's own op namespaces (torch_nn: torch.nn's custom ops)
try:  # torch registers its torch_nn custom ops when this module is first imported, not with torch.nn
    import torch.nn.modules.linear_cross_entropy  # noqa: F401
except ImportError:  # a torch without them
    pass


# torch lists these as "ignored" by __torch_function__, yet tensor arguments route them through it.
# (The rest of that list - set_default_dtype, manual_seed, ... - changes global state: not allowed.)
_INTERCEPTED_BUT_UNLISTED = (torch.normal, torch.rand_like, torch.randn_like, torch.randint_like,
                             torch.autograd.grad, torch.autograd.backward)


def _build_tables() -> tuple[dict[Any, str], dict[str, Callable]]:
    name_of: dict[Any, str] = {}
    by_name: dict[str, Callable] = {}
    for funcs in [*get_overridable_functions().values(), _INTERCEPTED_BUT_UNLISTED]:
        for f in funcs:
            name = resolve_name(f) or f"{f.__module__}.{f.__qualname__}"
            if name and not _DENIED.search(name):
                name_of[f] = name
                by_name[name] = f
    return name_of, by_name


_NAME_OF, _BY_NAME = _build_tables()


def name_of(func: Callable) -> str | None:
    """The stable name of a torch callable, or None if it is not part of the vocabulary."""
    try:
        name = _NAME_OF.get(func)
    except TypeError:  # unhashable callable
        return None
    if name is not None:
        return name
    if isinstance(func, torch._ops.OpOverload):
        name = f"{func.namespace}.{func._opname}.{func._overloadname}"
    else:
        descriptor = getattr(func, "__self__", None)
        if isinstance(descriptor, _GETSET) and descriptor.__objclass__ is _TensorBase:
            name = f"torch.Tensor.{descriptor.__name__}.{func.__name__}"
    if name is None or resolve_or_none(name) is None:
        return None
    _NAME_OF[func] = name  # ATen overloads and property accessors: worked out once
    return name


def short_name(op: str) -> str:
    """'torch.Tensor.add' -> 'add'; an ATen overload ('aten.empty.memory_format') -> its op's name."""
    parts = op.split(".")
    if len(parts) == 3 and parts[0] in _ATEN_NAMESPACES:
        return parts[1]
    if len(parts) > 1 and (parts[-1][:1].isupper() or parts[-1] == "default"):
        return parts[-2]
    return parts[-1]


def is_denied(func: Callable) -> bool:
    """A callable whose name says it touches storage, hooks, pickling or files."""
    return bool(_DENIED.search(f"{getattr(func, '__qualname__', '')}.{getattr(func, '__name__', '')}"))


def resolve_or_none(name: str) -> Callable | None:
    try:
        return resolve(name)
    except WorkerPermissionError:
        return None


# --- the worker's own few ops: autograd bookkeeping for many tensors in one message ----------------

GRADS_OF = "torchremote.grads_of"
SET_GRADS_NONE = "torchremote.set_grads_none"


def _grads_of(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The `.grad` of each tensor: pointers to the gradients a backward just made, all at once."""
    grads = tuple(t.grad for t in tensors)
    missing = [i for i, g in enumerate(grads) if g is None]
    if missing:
        raise RuntimeError(
            f"torch computed no gradient for {len(missing)} of the {len(tensors)} tensors this backward "
            f"was expected to reach (an undefined gradient); their .grad pointers are invalid")
    return grads


def _set_grads_none(*tensors: torch.Tensor) -> None:
    """`t.grad = None` for many tensors (what zero_grad() does, one parameter at a time)."""
    for t in tensors:
        t.grad = None


_BUILTINS: dict[str, Callable] = {GRADS_OF: _grads_of, SET_GRADS_NONE: _set_grads_none}

# --- collectives between workers: run by the worker's process groups (worker/collectives.py) ------
HOST_GROUP_STORE = "torchremote.host_group_store"
JOIN_GROUP = "torchremote.join_group"
LEAVE_GROUP = "torchremote.leave_group"
ALL_REDUCE = "torchremote.all_reduce_"
BROADCAST = "torchremote.broadcast_"
ALL_GATHER = "torchremote.all_gather"


def resolve(name: str) -> Callable:
    """The callable a name stands for, if the worker may run it; else `WorkerPermissionError`."""
    func = (_BY_NAME.get(name) or _BUILTINS.get(name)) if type(name) is str else None
    if func is None and type(name) is str and not _DENIED.search(name):
        func = _resolve_aten(name) or _resolve_property(name)
    if func is None:
        raise WorkerPermissionError(
            f"op {name!r} is not in this worker's allow-list (torch functions, Tensor methods and "
            f"properties, torch.nn.functional, torch.linalg, torch.fft, torch.special, ATen ops)")
    return func


def _resolve_aten(name: str) -> Callable | None:
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in _ATEN_NAMESPACES:
        return None
    packet = getattr(getattr(torch.ops, parts[0]), parts[1], None)
    overload = getattr(packet, parts[2], None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    return overload if isinstance(overload, torch._ops.OpOverload) else None


def _resolve_property(name: str) -> Callable | None:
    parts = name.split(".")
    if len(parts) != 4 or parts[:2] != ["torch", "Tensor"] or parts[3] not in ("__get__", "__set__"):
        return None
    descriptor = _TensorBase.__dict__.get(parts[2])
    return getattr(descriptor, parts[3]) if isinstance(descriptor, _GETSET) else None
