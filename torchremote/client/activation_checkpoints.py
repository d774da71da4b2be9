"""Activation checkpointing on pointers: which `torch.utils.checkpoint` region a call runs in.

torch's checkpoint works through autograd's saved-tensor hooks, and those act where the autograd
graph is: on the worker, not here. So the client only tells the worker where a checkpointed region
starts and ends (`CheckpointRegion` before the first op that runs in another region than the last
one), and the worker does what torch's checkpoint does (`worker/activation_checkpoints.py`): the
region's ops keep nothing for backward, and backward runs them again to get it back.

- `use_reentrant=False`: torch pushes its own saved-tensor hooks around the function; a call made
  while the top hooks are torch's checkpoint hooks runs in the region they stand for.
- `use_reentrant=True`: torch runs the function under no_grad inside the custom Function
  `CheckpointFunction`. Its ops on pointers run with grad on the worker (`enter_reentrant`), in a
  region that lasts while that forward is on the stack; a backward through the region's outputs then
  reaches the same parameters as torch's recomputing backward would. As in torch, where no tensor
  argument of the function requires grad its outputs do not either.
"""
from __future__ import annotations

import sys
import threading
from types import FrameType

import torch

_top_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_NON_REENTRANT_PACK = ("torch.utils.checkpoint", "_checkpoint_hook.__init__.<locals>.pack_hook")
_REENTRANT_CTX = "CheckpointFunctionBackward"


class _Open(threading.local):
    frame: FrameType | None = None  # the forward of the reentrant region this thread is in


_open = _Open()


def region_of_this_call() -> object | None:
    """An object that stands for the checkpointed region the current call runs in, or None."""
    hooks = _top_hooks(False)
    if hooks is not None:
        pack = hooks[0]
        if (getattr(pack, "__module__", None), getattr(pack, "__qualname__", None)) == _NON_REENTRANT_PACK:
            return pack
    frame = _open.frame
    if frame is not None:
        if _on_stack(frame):
            return frame
        _open.frame = None
    return None


def enter_reentrant() -> bool | None:
    """For an op on pointers that require grad, run under no_grad: whether it runs in the forward of
    a reentrant checkpoint (then it should run with grad on, in that region: True; or, none of the
    checkpointed function's tensor arguments requiring grad, without: False). None: not in one."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "forward":
            ctx = frame.f_locals.get("ctx")
            if type(ctx).__name__ == _REENTRANT_CTX and isinstance(ctx, torch.autograd.function.FunctionCtx):
                args = frame.f_locals.get("args", ())
                if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                    return False
                _open.frame = frame
                return True
        frame = frame.f_back
    return None


def _on_stack(target: FrameType) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame is target:
            return True
        frame = frame.f_back
    return False
