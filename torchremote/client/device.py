"""The `remote` device: torch's PrivateUse1 backend under our name, one index per connected worker.

`x.device` of a RemoteTensor is `remote:i`, a device torch itself accepts, so code that writes
`device=x.device` keeps working and an op can tell which worker a tensor lives on.
"""
from __future__ import annotations

import threading
import types
import weakref
from typing import TYPE_CHECKING, Any

import torch

from ..wire.errors import WorkerConnectionError
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
    torch._register_device_module(BACKEND, _device_module())
    # x.remote(), model.remote(i), x.is_remote: torch's own methods for a renamed backend, as .cuda()
    torch.utils.generate_methods_for_privateuse1_backend(for_tensor=True, for_module=True,
                                                         for_packed_sequence=True, for_storage=False)
    # What torch's C++ expects of every backend (the autograd engine, functorch, autocast look them
    # up): without them, a RemoteTensor reaching those paths aborts the process.
    torch._C._acc.register_python_privateuseone_hook(_Hooks())
    torch._C._acc.register_python_privateuseone_device_guard(_DeviceGuard())


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return is_available()

    def has_primary_context(self, index: int) -> bool:
        return _live(index) is not None

    def is_built(self) -> bool:
        return True


class _DeviceGuard(torch._C._acc.DeviceGuard):
    """Device switching means nothing here: each op names its worker through its tensors."""

    def type_(self) -> Any:
        return torch._C._autograd.DeviceType.PrivateUse1


def _device_module() -> types.ModuleType:
    """`torch.remote`: what `torch.cuda` users call, for the connected workers."""
    module = types.ModuleType(f"torch.{BACKEND}")
    module.__doc__ = "Devices of torchremote workers: remote:i is the i-th worker this process connected to."
    for fn in (is_available, is_initialized, device_count, current_device, set_device, synchronize,
               manual_seed, manual_seed_all, get_device_name, get_amp_supported_dtype, is_bf16_supported,
               memory_allocated, max_memory_allocated, _is_in_bad_fork):
        setattr(module, fn.__name__, fn)
    return module


# --- torch.remote ---------------------------------------------------------------------------------

def is_available() -> bool:
    """Whether this process is connected to a worker (so `.to("remote")` has somewhere to go)."""
    return any(_live(i) is not None for i in list(_workers))


def is_initialized() -> bool:
    return True


def device_count() -> int:
    """The indices handed out so far (a closed worker's index stays taken until reused)."""
    return _next_index


def current_device() -> int:
    """Always 0: torch's device guard for Python backends fixes the current index at 0, so torch's
    C++ turns `torch.device("remote")` into remote:0, the first worker this process connected to."""
    return 0


def set_device(device: "torch.device | str | int") -> None:
    """Only remote:0 can be current (see `current_device`); name other workers' devices instead."""
    index = device if isinstance(device, int) else torch.device(device).index
    if index not in (None, 0):
        raise NotImplementedError(
            f"torch.{BACKEND}.set_device({index}): torch's device guard for Python backends keeps the "
            f"current device at {BACKEND}:0; pass the device itself instead (worker.device, x.device)")


def synchronize(device: "torch.device | str | int | None" = None) -> None:
    """Wait until every op sent to the worker has run (`worker.sync()`), as `torch.cuda.synchronize`."""
    worker_of(_as_device(device)).sync()


def manual_seed(seed: int) -> None:
    """Seed the current worker's generator (nothing to do while no worker is connected)."""
    worker = _live(current_device())
    if worker is not None:
        worker.manual_seed(seed)


def manual_seed_all(seed: int) -> None:
    """Seed every connected worker; `torch.manual_seed` calls this, as it seeds every CUDA device.
    A worker that cannot be reached is left out: seeding this process must not fail for it."""
    for i in list(_workers):
        worker = _live(i)
        if worker is not None:
            try:
                worker.manual_seed(seed)
            except WorkerConnectionError:
                pass


def memory_allocated(device: "torch.device | str | int | None" = None) -> int:
    """Bytes this process's tensors hold on that worker, as the worker counts them (each storage
    once; `torch.cuda.memory_allocated`'s counterpart). One round trip."""
    worker = worker_of(_as_device(device))
    return worker.memory().held_by(worker.client_id)


def max_memory_allocated(device: "torch.device | str | int | None" = None) -> int:
    """The most this process's tensors have held on that worker at once (since it connected)."""
    worker = worker_of(_as_device(device))
    return worker.memory().peak_of(worker.client_id)


def get_device_name(device: "torch.device | str | int | None" = None) -> str:
    worker = worker_of(_as_device(device))
    return f"torchremote worker {worker.id!r} at {worker.url}"


def get_amp_supported_dtype() -> list[torch.dtype]:
    """What torch.autocast may cast to on this device type; the worker applies its own device's rules."""
    return [torch.float16, torch.bfloat16]


def is_bf16_supported(including_emulation: bool = True) -> bool:
    return True


def _is_in_bad_fork() -> bool:
    return False


def _as_device(device: "torch.device | str | int | None") -> torch.device:
    if device is None:
        return torch.device(BACKEND, current_device())
    if isinstance(device, int):
        return torch.device(BACKEND, device)
    return torch.device(device)


def _live(index: int) -> "Session | None":
    ref = _workers.get(index)
    worker = ref() if ref is not None else None
    return None if worker is None or worker.closed else worker


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
