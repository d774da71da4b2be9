"""The `remote` device: torch's PrivateUse1 backend under our name, one index per connected worker.

`x.device` of a RemoteTensor is `remote:i`, a device torch itself accepts, so code that writes
`device=x.device` keeps working and an op can tell which worker a tensor lives on.
"""
from __future__ import annotations

import threading
import types
import weakref
from typing import TYPE_CHECKING

import torch

from ..wire.messages import REMOTE_DEVICE_TYPE as BACKEND

if TYPE_CHECKING:
    from .session import Session

_lock = threading.Lock()
_workers: dict[int, "weakref.ref[Session]"] = {}
_next_index = 0


def _register_backend() -> None:
    current = torch._C._get_privateuse1_backend_name()
    if current == BACKEND:
        return
    if current != "privateuseone":
        raise ImportError(f"torchremote needs torch's PrivateUse1 backend, but {current!r} already uses it")
    torch.utils.rename_privateuse1_backend(BACKEND)
    module = types.ModuleType(f"torch.{BACKEND}")
    module.__doc__ = "Devices of torchremote workers: remote:i is the i-th worker this process connected to."
    module.is_available = lambda: True
    module.device_count = lambda: _next_index
    module.current_device = lambda: 0
    module._is_in_bad_fork = lambda: False
    module.manual_seed_all = lambda seed: None
    torch._register_device_module(BACKEND, module)
    # x.remote(), model.remote(i), x.is_remote: torch's own methods for a renamed backend, as .cuda()
    torch.utils.generate_methods_for_privateuse1_backend(for_tensor=True, for_module=True,
                                                         for_packed_sequence=True, for_storage=False)


_register_backend()


MAX_DEVICES = 128  # torch keeps a device index in 8 bits


def register(worker: "Session") -> torch.device:
    """Give a newly connected worker its device index: a new one, or one whose worker is closed or
    gone (torch's device indices stop at 127, and a long session may connect many times)."""
    global _next_index
    with _lock:
        if _next_index < MAX_DEVICES:
            index, _next_index = _next_index, _next_index + 1
        else:
            free = [i for i, ref in _workers.items() if (w := ref()) is None or w.closed]
            if not free:
                raise RuntimeError(f"a process can be connected to at most {MAX_DEVICES} torchremote "
                                   f"workers at once; close some (worker.close())")
            index = min(free)
        _workers[index] = weakref.ref(worker)
    return torch.device(BACKEND, index)


def worker_of(device: torch.device | str) -> "Session":
    device = torch.device(device)
    ref = _workers.get(device.index if device.index is not None else 0) if device.type == BACKEND else None
    worker = ref() if ref is not None else None
    if worker is None:
        raise RuntimeError(f"no connected torchremote worker has device {device}")
    return worker
