"""`torch.compile` of code that uses pointers runs it eagerly, op by op, as torch falls back for
what it cannot trace (compiling the worker's side of a step is another matter).

Left alone, dynamo traces into RemoteTensor's own Python - its `__torch_function__` and the dispatch
below it - and fails there with an internal error. Torch's own knobs keep it out: the class is
registered as a subclass that dynamo models conservatively
(`torch._dynamo.config.nontraceable_tensor_subclasses`), and `__torch_function__` is
`torch._dynamo.disable`d, so an op on a pointer is a graph break that runs eagerly. Importing dynamo
costs about a second, so this waits until something imports it (`torch.compile` does, on its first
call).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

from .backend import Kernel
from .tensor import RemoteTensor

_DYNAMO = "torch._dynamo"


def _keep_dynamo_out() -> None:
    import torch._dynamo  # already imported: what this module waited for

    torch._dynamo.config.nontraceable_tensor_subclasses.add(RemoteTensor)
    for hook in ("__torch_function__", "__torch_dispatch__"):  # the second: reached from torch's C++
        setattr(RemoteTensor, hook, classmethod(torch._dynamo.disable(getattr(RemoteTensor, hook).__func__)))
    Kernel.__call__ = torch._dynamo.disable(Kernel.__call__)


class _AfterDynamoLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `torch._dynamo` is about to load, it lets the usual finder find it
    and runs `_keep_dynamo_out` once the module has been executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _DYNAMO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _keep_dynamo_out()

        spec.loader.exec_module = exec_module
        return spec


if _DYNAMO in sys.modules:
    _keep_dynamo_out()
else:
    sys.meta_path.insert(0, _AfterDynamoLoads())
