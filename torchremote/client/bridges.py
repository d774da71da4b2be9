"""Gradients across the line between this process and a worker: `.to()` is differentiable both
ways, as it is between the CPU and CUDA.

- Worker -> here (`x.cpu()`, `x.to("cpu")` of an `x` that requires grad): the local copy's
  grad_fn is a small autograd Function whose backward sends the gradient to the worker and runs
  `x`'s backward there.
- Here -> worker (`c.to(dev)` of a local `c` that requires grad): the copy is a leaf on the worker,
  so that the worker keeps its gradient; the client shows it as a non-leaf (`ToCopyBackward0`).
  After a backward that reaches it, the client fetches that gradient and runs `c`'s backward here.
"""
from __future__ import annotations

import threading
from typing import Any

import torch

from . import autograd
from .dispatch import queue
from .tensor import RemoteTensor

_ANCHOR = torch.empty(0, requires_grad=True)  # an input that makes the fetched copy require grad


class _Link:
    __slots__ = ("remote", "value")

    def __init__(self, remote: RemoteTensor, value: torch.Tensor) -> None:
        self.remote, self.value = remote, value


class _FromWorker(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, link: _Link) -> torch.Tensor:
        ctx.remote = link.remote
        return link.value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        remote = ctx.remote
        sink = getattr(_collecting, "sink", None)
        if sink is not None:  # inside torch.autograd.grad: the worker's part is taken from here
            sink.append((remote, grad))
            return None, None
        torch.autograd.backward([remote], [grad.to(remote.device, remote.dtype)])
        return None, None


_collecting = threading.local()


def grad_through_local(outputs: list, grad_outputs: list, inputs: list, retain_graph: Any,
                       allow_unused: bool) -> tuple:
    """`torch.autograd.grad` of outputs here (made from pointers with `x.to("cpu")`) with respect to
    pointers: the local part of the graph runs here, up to the links to the worker, and from
    there the gradients that reach them go on through the worker's graph to `inputs`."""
    local = [(o, g) for o, g in zip(outputs, grad_outputs) if not isinstance(o, RemoteTensor)]
    remote = [(o, g) for o, g in zip(outputs, grad_outputs) if isinstance(o, RemoteTensor)]
    sink: list = []
    _collecting.sink = sink
    try:  # the anchor is where every link to a worker starts: only those paths run
        torch.autograd.grad([o for o, _ in local], [_ANCHOR], [g for _, g in local], retain_graph=retain_graph,
                            allow_unused=True)
    finally:
        del _collecting.sink
    for pointer, grad in sink:
        remote.append((pointer, grad.to(pointer.device, pointer.dtype)))
    if not remote:
        if allow_unused:
            return tuple(None for _ in inputs)
        raise RuntimeError("One of the differentiated Tensors appears to not have been used in the graph. "
                           "Set allow_unused=True if this is the desired behavior.")
    return torch.autograd.grad([o for o, _ in remote], inputs, [g for _, g in remote],
                               retain_graph=retain_graph, allow_unused=allow_unused)


def fetched(x: RemoteTensor, value: torch.Tensor) -> torch.Tensor:
    """`value`, fetched from `x`; differentiable back into `x` when `x` requires grad."""
    if not torch.is_grad_enabled() or autograd.edge_of(x) is None:
        return value
    return _FromWorker.apply(_ANCHOR, _Link(x, value))


def link_local_source(copy: RemoteTensor, source: torch.Tensor) -> None:
    """`copy` was just made on its worker from `source`, a tensor here that requires grad."""
    queue(torch.Tensor.requires_grad_, (copy, True), {}, returns_self=True)  # a leaf there: it keeps its grad
    node = autograd.Node("ToCopyBackward0", ())
    # so that a backward that reaches it names its gradient; held strongly (a cycle with the
    # copy, for the collector): the graph downstream needs it after the user's last reference
    node.retained = lambda: copy
    copy._rg, copy._grad_node = True, node
    copy.__dict__["_local_source"] = source


def deliver(receiving: list, retain_graph: bool) -> None:
    """After a backward on the worker: the gradients of copies made from tensors here go on into
    those tensors' own backward, here."""
    for t, _ in receiving:
        source = t.__dict__.get("_local_source")
        grad = t._grad_ptr if source is not None else None
        if grad is None:
            continue
        value = grad.get()
        t._grad_ptr = None  # not the copy's to keep: torch gives a non-leaf no .grad
        t._worker._set_grad_none_later(t)
        torch.autograd.backward([source], [value.to(source.dtype)], retain_graph=retain_graph)
