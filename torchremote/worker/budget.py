"""One memory budget for the whole worker: no set of clients can take it past what the owner allows.

Every storage the worker holds is counted once, in host memory or (on a GPU worker) device memory:
each client's objects, sends still arriving, published data, and sessions parked for a resume (their
objects stay counted until freed). A request that would pass the budget is refused before it
allocates, from the sizes its metadata gives, with `torch.OutOfMemoryError`, as PyTorch itself
raises on a full device. What a client holds is also capped per client (`--max-client-bytes`), as
a share within the budget.

What is not counted: memory an op uses while it runs (workspaces, temporaries), and what autograd
keeps for a backward pass that the objects do not hold themselves. The default budget, 80% of
the machine's memory, leaves the rest for them and for the process itself.
"""
from __future__ import annotations

import os
import re
import threading
from typing import Any

import torch

from ..wire import messages as m

DEFAULT_SHARE = 0.8        # of physical memory (host), or of the device's memory (GPU)
DEFAULT_CLIENT_SHARE = 0.5  # of the budget, per client


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GiB
        return 16 << 30


def device_memory(device: torch.device) -> int | None:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


def parse_size(text: str | int | None, total: int | None) -> int | None:
    """'512MiB', '8GiB', '80%' (of `total`), a number of bytes; 0 means no limit (None)."""
    if text is None:
        return None
    if isinstance(text, int):
        return text or None
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", str(text))
    if found is None or (found.group(2) != "%" and found.group(2).lower() not in _UNITS):
        raise ValueError(f"not a size: {text!r} (use bytes, or a suffix: 512MiB, 8GiB, 80%)")
    number, unit = float(found.group(1)), found.group(2)
    if unit == "%":
        if total is None:
            raise ValueError(f"{text!r}: a share needs a known total memory")
        return int(total * number / 100) or None
    return int(number * _UNITS[unit.lower()]) or None


def describe(n: int | None) -> str:
    if n is None:
        return "no limit"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class Pool:
    """One kind of memory (host, or one device) and its budget."""
    __slots__ = ("name", "flag", "limit", "used", "lock")

    def __init__(self, name: str, flag: str, limit: int | None) -> None:
        self.name, self.flag, self.limit, self.used = name, flag, limit, 0
        self.lock = threading.Lock()


class MemoryBudget:
    """The worker's pools: host memory always, the GPU's too on a CUDA worker."""

    def __init__(self, host_limit: int | None, device: torch.device, device_limit: int | None = None) -> None:
        self.host = Pool("memory", "--max-memory", host_limit)
        self.gpu = Pool(f"{device} memory", "--max-gpu-memory", device_limit) if device.type == "cuda" else None
        self.holders: dict[str, Any] = {}  # client id -> its session (what it holds: `held_bytes`)

    def pool(self, storage: torch.UntypedStorage) -> Pool:
        return self.gpu if self.gpu is not None and storage.device.type == "cuda" else self.host

    def pool_for(self, device: torch.device | str) -> Pool:
        if self.gpu is None:
            return self.host
        return self.gpu if torch.device(device).type == "cuda" else self.host

    def check(self, pool: Pool, new: int, what: str, holder: str, held: int, pending: int = 0) -> None:
        """Refuse (`torch.OutOfMemoryError`) if `new` more bytes would pass the pool's budget
        (`pending`: what the asking session has taken that is not settled yet)."""
        used = pool.used + pending
        if pool.limit is not None and new and used + new > pool.limit:
            raise torch.OutOfMemoryError(
                f"{what} needs {describe(new)} more, which would take the worker past its {pool.name} budget "
                f"of {describe(pool.limit)} ({pool.flag}): {describe(used)} are in use, {describe(held)} "
                f"of it by {holder}. Free some pointers (del x), or wait for others to; the same call "
                f"succeeds once there is room")

    def charge(self, pool: Pool, n: int) -> None:
        with pool.lock:
            pool.used += n

    def credit(self, pool: Pool, n: int) -> None:
        with pool.lock:
            pool.used -= n

    def rows(self) -> list[tuple[str, int, int | None]]:
        """(pool, bytes in use, budget) for each pool."""
        return [(p.name, p.used, p.limit) for p in (self.host, self.gpu) if p is not None]

    def report(self, clients: list[str], client_limit: int | None) -> m.MemoryInfo:
        rows = self.rows()
        holders = dict(self.holders)
        return m.MemoryInfo(tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] or 0 for r in rows),
                            tuple(clients), tuple(holders[c].held_bytes if c in holders else 0 for c in clients),
                            client_limit or 0, tuple(holders[c].peak_bytes if c in holders else 0 for c in clients))
