"""Functions that travel: cloudpickled, with the user's own module carried by value.

The worker cannot import the client's modules, so the code of the module a function comes from
travels with it; torch, torchremote, numpy and builtins are named by reference.
"""
from __future__ import annotations

import sys
from typing import Callable

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
