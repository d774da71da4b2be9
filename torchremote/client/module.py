"""Models on a worker: `send`/`get` of whole modules, and `on(worker)` to build them there.

`send(model, worker)` moves every parameter and buffer in place, as `model.to(device)` does:
parameters keep their objects, so tied weights stay tied and optimizers, hooks and `.grad` made
before stay valid; buffers are replaced, as torch replaces them. `get(model)` brings them all back
the same way, and the worker frees its copies.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from . import tensor as tensor_module
from .session import Session
from .tensor import RemoteTensor

M = TypeVar("M", bound=nn.Module)


def _move(module: nn.Module, convert_all: Callable[[list], list]) -> None:
    """Move every parameter, buffer and `.grad`, converting all the distinct tensors in one go
    (`convert_all(tensors) -> new tensors`, so transfers batch), then put them in place through
    torch's own `nn.Module._apply`, as `.to()` does (modules such as RNNs prepare for it)."""
    params = list(module.parameters())
    grads = {id(p): p.grad for p in params if p.grad is not None}
    distinct: dict[int, torch.Tensor] = {}
    for t in (*params, *module.buffers(), *grads.values()):
        distinct.setdefault(id(t), t)
    converted = dict(zip(distinct, convert_all(list(distinct.values()))))
    for p in params:
        if id(p) in grads:
            p.grad = None  # moved below, with the others: not one by one by _apply
    module._apply(lambda t: converted.get(id(t), t))
    for p in params:
        if id(p) in grads:
            p.grad = converted[id(grads[id(p)])]


def _send_all(tensors: list, worker: "Session", device: str | torch.device | None) -> list:
    local = [t.detach() for t in tensors if not isinstance(t, RemoteTensor)]
    for t in local:
        tensor_module.check_sendable(t)
    sent = iter(tensor_module.put(worker, local, device))
    return [t.detach().move(worker) if isinstance(t, RemoteTensor) else next(sent) for t in tensors]


def _get_all(tensors: list) -> list:
    by_worker: dict[Any, list] = {}
    for t in tensors:
        if isinstance(t, RemoteTensor):
            by_worker.setdefault(t._worker, []).append(t)
    fetched: dict[int, torch.Tensor] = {}
    for worker, remote in by_worker.items():
        fetched.update(zip((id(t) for t in remote), worker._fetch_many([t._ref for t in remote])))
    return [fetched[id(t)] if isinstance(t, RemoteTensor) else t.detach() for t in tensors]


def send(obj: Any, worker: "Session", device: str | torch.device | None = None) -> Any:
    """Send a tensor (returns its pointer) or a module (moved in place, returned) to `worker`.

    `device` picks where the worker keeps the data ("cuda"); by default, the worker's --device.
    A module's parameters and buffers travel together, in as few messages as fit.
    """
    if isinstance(obj, nn.Module):
        _move(obj, lambda tensors: _send_all(tensors, worker, device))
        return obj
    return tensor_module.send(obj, worker, device)


def get(obj: Any) -> Any:
    """Fetch a RemoteTensor (returns a plain tensor) or a module (fetched in place, returned, in
    one round trip per worker)."""
    if isinstance(obj, nn.Module):
        _move(obj, _get_all)
        return obj
    return tensor_module.get(obj)


class on(TorchFunctionMode):
    """`with tr.on(worker):` tensors that factories create inside are created on the worker.

    Modules built inside have their weights initialised there: the data never exists locally.
    """

    def __init__(self, worker: "Session") -> None:
        super().__init__()
        self.worker = worker

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": self.worker.device}
        return func(*args, **kwargs)


_FACTORIES = frozenset({
    torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
    torch.randperm, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.empty_strided,
    torch.scalar_tensor, torch.tensor, torch.as_tensor,
})
