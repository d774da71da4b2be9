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
    kwargs = {**kwargs, "device": torch.device(device)}
    result = dispatch(op, args, kwargs, worker=worker_of(device))
    return made_by_factory(result) if isinstance(result, RemoteTensor) else result


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


_library = torch.library.Library("_", "IMPL")
_library.fallback(_factory_fallback, dispatch_key="PrivateUse1", with_keyset=True)
# Inside `torch.autocast("remote")` a factory also passes the remote device's autocast key, which
# has no kernels of its own: the worker applies autocast, with its own device's rules.
_library.fallback(torch.library.fallthrough_kernel, dispatch_key="AutocastPrivateUse1")
# Copies into a remote tensor get kernels of their own: `torch.tensor(data, device=remote:i)` copies
# with the Python dispatch key excluded, where the fallback cannot be reached.
_aten = torch.library.Library("aten", "IMPL")
_aten.impl("copy_", _copy, "PrivateUse1")
_aten.impl("_copy_from", lambda src, dst, non_blocking=False: _copy(dst, src, non_blocking), "PrivateUse1")
