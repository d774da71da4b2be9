"""The `remote` device's kernels: what torch runs for factories and copies aimed at `remote:i`.

`torch.zeros(n, device=x.device)` has no tensor argument, so `__torch_function__` never sees it; torch
routes it to the PrivateUse1 key, whose Python fallback registered here hands it to dispatch with
the worker its device names.
"""
from __future__ import annotations

from typing import Any

import torch

from .bridges import link_local_source
from .device import BACKEND, worker_of
from .dispatch import dispatch, remote_call
from .registry import implements
from .tensor import RemoteTensor, made_by_factory, send

LARGE_COPY_BYTES = 1 << 20  # a local source this large travels as a send: chunked, with progress


def _factory_fallback(keyset: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    device = kwargs.get("device")
    if device is None or torch.device(device).type != BACKEND:
        raise NotImplementedError(f"{op} has no implementation for tensors on the '{BACKEND}' device")
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        _refuse_under_fake_tensors(op)
    kwargs = {**kwargs, "device": torch.device(device)}
    result = dispatch(op, args, kwargs, worker=worker_of(device))
    return made_by_factory(result) if isinstance(result, RemoteTensor) else result


def _refuse_under_fake_tensors(op: Any) -> None:
    """A tensor on a worker made for real while fake tensors trace (torch.compile: dynamo, or
    inductor working out its patterns for the graph's device): torch's exception for an op fake
    tensors cannot run, which torch.compile answers by running that part eagerly."""
    from torch._subclasses.fake_tensor import UnsupportedOperatorException

    raise UnsupportedOperatorException(
        f"{op}: a tensor on the '{BACKEND}' device cannot be made while fake tensors trace; "
        f"torch.compile runs this part eagerly on the worker")


def _copy(dst: Any, src: Any, non_blocking: bool = False) -> Any:
    return dispatch(torch.ops.aten.copy_.default, (dst, src), {"non_blocking": non_blocking})


@implements(torch.ops.aten.copy_.default)
def _copy_from_here(func: Any, args: tuple, kwargs: dict) -> Any:
    """The copy inside `c.to(dev)` (torch's C++ makes the tensor, then copies into it): from a `c`
    that requires grad, the copy is differentiable."""
    dst, src = args[0], args[1]
    sent = args
    if (isinstance(dst, RemoteTensor) and type(src) is torch.Tensor and src.layout == torch.strided
            and src.numel() * src.element_size() >= LARGE_COPY_BYTES):
        # one message would carry it whole (a snapshot copy, no progress): send it, then copy there
        sent = (dst, send(src.detach(), dst._worker), *args[2:])
    result = remote_call(func, sent, kwargs)
    if (isinstance(dst, RemoteTensor) and not isinstance(src, RemoteTensor) and src.requires_grad
            and torch.is_grad_enabled()):
        link_local_source(dst, src)
    return result


class Kernel:
    """A Python kernel torch's C++ calls. A class, so that torch.compile can be kept out of every
    kernel at once (`compiled.py` disables dynamo on `__call__`): dynamo would otherwise trace
    each call from C++ as a frame of its own. `op`, when given, is passed after the keyset."""

    __slots__ = ("fn", "op")

    def __init__(self, fn: Any, op: Any = None) -> None:
        self.fn, self.op = fn, op

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.op is None:
            return self.fn(*args, **kwargs)
        return self.fn(args[0], self.op, *args[1:], **kwargs)


def _copy_from(src: Any, dst: Any, non_blocking: bool = False) -> Any:
    return _copy(dst, src, non_blocking)


# Factories with no composite kernel of torch's own: each gets a kernel registered by name. The
# fallback alone is not enough: while a TorchDispatchMode is active (FakeTensorMode, FlopCounterMode)
# torch calls a Python kernel through a table keyed by operator name, where a fallback has no entry
# (`torch.tensor(data, device=remote)` under a mode failed an internal assert).
FACTORIES = ("empty.memory_format", "empty_strided", "tril_indices", "triu_indices", "from_file",
             "_efficientzerotensor", "_sparse_coo_tensor_with_dims", "_empty_affine_quantized",
             "_make_dep_token", "_cudnn_init_dropout_state")

_library = torch.library.Library("_", "IMPL")
_library.fallback(Kernel(_factory_fallback), dispatch_key="PrivateUse1", with_keyset=True)
_aten = torch.library.Library("aten", "IMPL")
for _name in FACTORIES:
    _packet, _, _overload = _name.partition(".")
    _op = getattr(getattr(torch.ops.aten, _packet), _overload or "default")
    _aten.impl(_name, Kernel(_factory_fallback, _op), "PrivateUse1", with_keyset=True)
# Inside `torch.autocast("remote")` a factory also passes the remote device's autocast key, which
# has no kernels of its own: the worker applies autocast, with its own device's rules.
_library.fallback(torch.library.fallthrough_kernel, dispatch_key="AutocastPrivateUse1")
# Copies into a remote tensor get kernels of their own: `torch.tensor(data, device=remote:i)` copies
# with the Python dispatch key excluded, where the fallback cannot be reached.
_aten.impl("copy_", Kernel(_copy), "PrivateUse1")
_aten.impl("_copy_from", Kernel(_copy_from), "PrivateUse1")
