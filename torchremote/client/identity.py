"""One tensor object while its data moves between this process and a worker.

On CPU and CUDA, `p.data = other` keeps the object `p` (torch's `set_data`), and so does
`model.to(device)`: optimizers, tied weights, hooks and `.grad` that hold `p` stay valid. A
RemoteTensor's TensorImpl cannot take a local tensor's data, so `become` does the same with
`torch.utils.swap_tensors`, keeping what `set_data` keeps with the object: its class (a Parameter
stays one), `requires_grad`, `.grad` (moved along) and its hooks.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .tensor import RemoteTensor

_T = torch.Tensor


def raw(attr: Any, t: torch.Tensor) -> Any:
    """A tensor attribute torch keeps on the Python object itself (hooks), read past interception."""
    with torch._C.DisableTorchFunctionSubclass():
        return attr.__get__(t)


def become(t: torch.Tensor, value: torch.Tensor) -> None:
    """`t` holds `value`'s data from now on, on `value`'s device; the object stays the same."""
    requires_grad, grad = t.requires_grad, t.grad  # the old .grad leaves with the old data
    if isinstance(t, nn.Parameter):
        replacement = nn.Parameter(value, requires_grad=requires_grad)  # detaches, as set_data does
    else:
        replacement = value.detach().requires_grad_(requires_grad)
    if isinstance(t, RemoteTensor):
        t._worker._queue_grad_resets_now()  # a reset waiting for `t` names the object it hands over
    torch.utils.swap_tensors(t, replacement)
    if not isinstance(t, RemoteTensor):
        _rearm_hooks(t)  # a RemoteTensor's hooks are read from the object; a local one's run in C++
    if grad is not None:
        t.grad = grad.get() if isinstance(grad, RemoteTensor) else grad.to(value.device)


def _rearm_hooks(t: torch.Tensor) -> None:
    """The hook dicts stay with the Python object through a swap, but torch's engine looks for them
    on the TensorImpl: setting them again registers them there."""
    hooks = raw(_T._backward_hooks, t)
    if hooks is not None:
        t._backward_hooks = hooks
    post = raw(_T._post_accumulate_grad_hooks, t)
    if post is not None:
        t._post_accumulate_grad_hooks = post
