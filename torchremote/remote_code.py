"""Code that travels: a client's own function, or `autograd.Function`, run whole on the worker.

`worker.run(fn, *args)` and `@remote` ship the function with cloudpickle, so a training step costs
one round trip and a custom autograd.Function's backward exists where its forward ran. A worker
runs such code only when its owner started it with --allow-code (which needs a token). Otherwise the
client gets a `WorkerPermissionError` naming the flag, and the worker never unpickles anything.
"""
from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from .tensor import RemoteTensor

if TYPE_CHECKING:
    from .client import Worker

_BY_REFERENCE = ("torch", "torchremote", "builtins", "numpy")


def dumps(fn: Callable) -> bytes:
    """cloudpickle `fn`, carrying its own module's code by value (the worker cannot import it)."""
    import cloudpickle
    owner = getattr(fn, "__self__", None)  # a bound method (Function.apply): its class's module
    if owner is not None and not isinstance(owner, type):
        owner = type(owner)
    names = {getattr(fn, "__module__", None), getattr(owner, "__module__", None)}
    modules = [sys.modules[n] for n in names if n in sys.modules and n != "__main__"
               and n.split(".")[0] not in _BY_REFERENCE]
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(fn)
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)


def _worker_in(args: tuple, kwargs: dict) -> "Worker | None":
    for a in tree_flatten((args, kwargs))[0]:
        if isinstance(a, RemoteTensor):
            return a._worker
    return None


def _run(fn: Callable, worker: "Worker | None", args: tuple, kwargs: dict) -> Any:
    """On `worker`, or on the one its RemoteTensor arguments live on; here if there is none."""
    from .dispatch import run_remote
    worker = worker or _worker_in(args, kwargs)
    return fn(*args, **kwargs) if worker is None else run_remote(worker, fn, args, kwargs)


class RemoteFunction:
    """An `autograd.Function` that runs whole on the worker its inputs live on (locally otherwise)."""

    def __init__(self, function: type, worker: "Worker | None") -> None:
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
    from .client import Worker

    def wrap(obj: Any, worker: "Worker | None") -> Any:
        if isinstance(obj, type) and issubclass(obj, torch.autograd.Function):
            return RemoteFunction(obj, worker)

        @functools.wraps(obj)
        def call(*args: Any, **kwargs: Any) -> Any:
            return _run(obj, worker, args, kwargs)
        return call

    if target is None or isinstance(target, Worker):
        return lambda obj: wrap(obj, target)
    return wrap(target, None)


def refuse_inside_custom_function() -> None:
    """A custom autograd.Function's forward running op by op on pointers would lose its backward on
    the worker (the worker sees plain ops run without grad). Say so, instead of training wrongly."""
    frame = sys._getframe(3)
    for _ in range(8):
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
