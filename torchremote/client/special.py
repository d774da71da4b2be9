"""The few torch calls a RemoteTensor answers differently from the generic dispatch path: its device,
metadata the pointer holds, fetches (`cpu()`, `to("cpu")`, `numpy()`), `.data =` across devices,
iteration, deepcopy."""
from __future__ import annotations

from typing import Any

import torch

from .bridges import fetched
from .device import BACKEND, worker_of
from .dispatch import remote_call
from .identity import become
from .registry import implements
from .tensor import RemoteTensor

_T = torch.Tensor


@implements(_T.device.__get__)
def _device(func: Any, args: tuple, kwargs: dict) -> torch.device:
    return args[0]._worker.device


@implements(getattr(_T, f"is_{BACKEND}").__get__)
def _is_remote(func: Any, args: tuple, kwargs: dict) -> bool:
    return True


@implements(_T.is_meta.__get__)
def _is_meta(func: Any, args: tuple, kwargs: dict) -> bool:
    return False


# --- metadata the pointer itself holds: answered without building the meta stand-in ---------------

@implements(_T.shape.__get__)
def _shape(func: Any, args: tuple, kwargs: dict) -> torch.Size:
    return torch.Size(args[0]._tmeta.shape)


@implements(_T.size)
def _size(func: Any, args: tuple, kwargs: dict) -> Any:
    if len(args) == 1 and not kwargs:
        return torch.Size(args[0]._tmeta.shape)
    with torch._C.DisableTorchFunctionSubclass():
        return func(args[0]._stand_in(), *args[1:], **kwargs)


@implements(_T.dtype.__get__)
def _dtype(func: Any, args: tuple, kwargs: dict) -> torch.dtype:
    return args[0]._tmeta.dtype


@implements(_T.dim, _T.ndimension, _T.ndim.__get__)
def _dim(func: Any, args: tuple, kwargs: dict) -> int:
    return len(args[0]._tmeta.shape)


@implements(_T.is_complex, torch.is_complex)
def _is_complex(func: Any, args: tuple, kwargs: dict) -> bool:
    return args[0]._tmeta.dtype.is_complex


@implements(_T.is_floating_point, torch.is_floating_point)
def _is_floating_point(func: Any, args: tuple, kwargs: dict) -> bool:
    return args[0]._tmeta.dtype.is_floating_point


@implements(_T.get_device)
def _get_device(func: Any, args: tuple, kwargs: dict) -> int:
    return args[0]._worker.device.index


@implements(_T.__hash__)
def _hash(func: Any, args: tuple, kwargs: dict) -> int:
    return id(args[0])


@implements(_T.__iter__)
def _iter(func: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if x._stand_in().dim() == 0:
        raise TypeError("iteration over a 0-d tensor")
    return iter(x.unbind(0))


@implements(_T.numpy, _T.__array__)
def _numpy(func: Any, args: tuple, kwargs: dict) -> Any:
    local = args[0].get()
    return func(local, *args[1:], **kwargs)


@implements(_T.cpu)
def _cpu(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    return fetched(args[0], args[0].get())


@implements(_T.to)
def _to(func: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if _changes_nothing(x, args[1:], kwargs):
        return x  # as torch returns self: no message (a second model.to(device) sends nothing)
    device = _target_device(args[1:], kwargs)
    if device is None or device == x._worker.device:
        return remote_call(func, args, kwargs)
    if device.type == "meta":
        return _on_stand_in(func, args, kwargs)
    if device.type == BACKEND:
        return _to_other_worker(x, device, args[1:], kwargs)
    return fetched(x, x.get().to(*args[1:], **kwargs))  # to a local device: fetch


@implements(torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device, torch.ops.aten.to.other,
            torch.ops.aten._to_copy.default)
def _aten_to(func: Any, args: tuple, kwargs: dict) -> Any:
    """The ATen forms of `.to()`, which torch's C++ calls itself: a forward-mode formula asks for
    `x.to("meta")` to work out a result's metadata."""
    device = _target_device(args[1:], kwargs)
    if device is not None and device.type == "meta":
        return _on_stand_in(func, args, kwargs)
    return remote_call(func, args, kwargs)


def _on_stand_in(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """`x.to("meta")`: a meta tensor with x's metadata, made here; no data moves."""
    stand_in = args[0]._stand_in()
    with torch._C.DisableTorchFunctionSubclass():
        out = func(stand_in, *args[1:], **kwargs)
        return torch.ops.aten.alias.default(out) if out is stand_in else out  # never the stand-in itself


_LIKE_FACTORIES = (torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
                   torch.randn_like, torch.randint_like, _T.new_empty, _T.new_zeros, _T.new_ones, _T.new_full,
                   _T.new_tensor, _T.new_empty_strided)


@implements(*_LIKE_FACTORIES)
def _like_factory(func: Any, args: tuple, kwargs: dict) -> Any:
    """`torch.zeros_like(x, device=d)` makes its tensor on `d`, as torch does: only x's metadata
    is used, so for a device other than x's worker it is made from the stand-in, with no message."""
    device = kwargs.get("device")
    x = args[0]
    if device is None or not isinstance(x, RemoteTensor) or torch.device(device) == x._worker.device:
        return remote_call(func, args, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        return func(x._stand_in(), *args[1:], **kwargs)


def _to_other_worker(x: RemoteTensor, device: torch.device, args: tuple, kwargs: dict) -> RemoteTensor:
    """As `cuda:0` -> `cuda:1`: worker to worker (`x.move`, with its release rules), then any dtype
    change there. Not differentiable yet, so refused where autograd would need it."""
    if x.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"x.to({device}) from {x.device} is not differentiable yet: move x.detach(), or move the "
            f"model (model.to({device}) moves its parameters without autograd, as torch does)")
    dtype = _parse_to(args, kwargs)[1]  # before the move: a malformed call moves nothing
    moved = x.move(worker_of(device))
    return moved.to(dtype) if dtype is not None and dtype != moved.dtype else moved


@implements(_T.copy_)
def _copy(func: Any, args: tuple, kwargs: dict) -> Any:
    dst, src = args[0], args[1]
    if not isinstance(dst, RemoteTensor) and isinstance(src, RemoteTensor):
        return dst.copy_(src.get(), *args[2:], **kwargs)  # into a local tensor: a fetch
    return remote_call(func, args, kwargs)


def _changes_nothing(x: RemoteTensor, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("copy") or any(type(a) is bool for a in args[1:]):  # copy=, or non_blocking/copy given positionally
        return False
    try:
        device, dtype, _, memory_format = _parse_to(args, kwargs)
    except (TypeError, RuntimeError):
        return False  # not a form torch parses: the worker gives torch's error
    return ((device is None or device == x._worker.device) and (dtype is None or dtype == x.dtype)
            and memory_format in (None, torch.preserve_format))


@implements(getattr(_T, BACKEND))
def _to_backend(func: Any, args: tuple, kwargs: dict) -> Any:
    """`x.remote(i)`, torch's generated method for the backend (as `x.cuda(i)`), on a RemoteTensor."""
    x, device, non_blocking, options = _bind_to_backend(*args, **kwargs)
    if device is None or isinstance(device, int):
        device = torch.device(BACKEND, getattr(torch, BACKEND).current_device() if device is None else device)
    return x.to(device=torch.device(device), non_blocking=non_blocking, **options)


def _bind_to_backend(self: Any, device: Any = None, non_blocking: bool = False, **options: Any) -> tuple:
    return self, device, non_blocking, options


@implements(_T.data.__set__)
def _set_data(func: Any, args: tuple, kwargs: dict) -> None:
    """`t.data = value`: the object `t` stays and holds `value`'s data, its metadata with it. This
    is how nn.Module.to() moves a Parameter (see `_compatible_shallow_copy`)."""
    t, value = args
    if value is t:
        return None  # model.to(device) of a model already there: nothing to send
    if isinstance(t, RemoteTensor) and isinstance(value, RemoteTensor) and t._worker is not value._worker:
        raise RuntimeError(f"tensor lives on worker {t._worker.id!r} ({t.device}), the new data on "
                           f"{value._worker.id!r} ({value.device}): move it first (value.move(worker))")
    become(t, value)


@implements(torch._has_compatible_shallow_copy_type)
def _compatible_shallow_copy(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether `a.data = b` keeps the object `a` (it does, between a worker and this process: see
    `identity.py`). `nn.Module.to("cpu")` asks this, so a model fetched back keeps its Parameters."""
    a, b = args
    if isinstance(a, RemoteTensor) and isinstance(b, RemoteTensor):
        return a._worker is b._worker
    local = b if isinstance(a, RemoteTensor) else a
    return local.layout == torch.strided


def _parse_to(args: tuple, kwargs: dict) -> tuple:
    """torch's own reading of `.to(...)`'s arguments (after the tensor): device, dtype,
    non_blocking, memory_format."""
    return torch._C._nn._parse_to(*args, **{k: v for k, v in kwargs.items() if k not in ("non_blocking", "copy")})


def _target_device(args: tuple, kwargs: dict) -> torch.device | None:
    """Where `.to(...)` sends a tensor: a device, a device string, or another tensor's device."""
    for a in (*args, kwargs.get("device"), kwargs.get("other")):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (torch.device, str)):
            return torch.device(a)
    return None


@implements(_T.__deepcopy__)
def _deepcopy(func: Any, args: tuple, kwargs: dict) -> RemoteTensor:
    x, memo = args[0], args[1] if len(args) > 1 else kwargs.get("memo")
    if memo is not None and id(x) in memo:
        return memo[id(x)]
    copy = x.clone()
    if memo is not None:
        memo[id(x)] = copy
    return copy


@implements(_T.__setstate__)
def _setstate(func: Any, args: tuple, kwargs: dict) -> Any:
    raise TypeError("a RemoteTensor cannot be unpickled")

