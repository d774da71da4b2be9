"""Code that travels: a client's own function, or `autograd.Function`, run whole on the worker.

`worker.run(fn, *args)` and `@remote` ship the function with cloudpickle, so a training step costs
one round trip and a custom autograd.Function's backward exists where its forward ran. A worker
runs such code only when its owner started it with --allow-code (which needs a token). Otherwise the
client gets a `WorkerPermissionError` naming the flag, and the worker never unpickles anything.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from .dispatch import run_remote
from .session import Session
from .tensor import RemoteTensor


def _worker_in(args: tuple, kwargs: dict) -> "Session | None":
    for a in tree_flatten((args, kwargs))[0]:
        if isinstance(a, RemoteTensor):
            return a._worker
    return None


def _run(fn: Callable, worker: "Session | None", args: tuple, kwargs: dict) -> Any:
    """On `worker`, or on the one its RemoteTensor arguments live on; here if there is none."""
    worker = worker or _worker_in(args, kwargs)
    return fn(*args, **kwargs) if worker is None else run_remote(worker, fn, args, kwargs)


class RemoteFunction:
    """An `autograd.Function` that runs whole on the worker its inputs live on (locally otherwise)."""

    def __init__(self, function: type, worker: "Session | None") -> None:
        self.function = function
        self.worker = worker
        functools.update_wrapper(self, function, updated=())

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.function.apply, self.worker, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.function, name)


def remote(target: Any = None) -> Any:
    """Decorator: run this function (or autograd.Function) on the worker, whole, in one round trip.

        @tr.remote(bob)          # always on bob
        @tr.remote               # on whichever worker its RemoteTensor arguments live (else here)
    """
    def wrap(obj: Any, worker: "Session | None") -> Any:
        if isinstance(obj, type) and issubclass(obj, torch.autograd.Function):
            return RemoteFunction(obj, worker)

        @functools.wraps(obj)
        def call(*args: Any, **kwargs: Any) -> Any:
            return _run(obj, worker, args, kwargs)
        return call

    if target is None or isinstance(target, Session):
        return lambda obj: wrap(obj, target)
    return wrap(target, None)
