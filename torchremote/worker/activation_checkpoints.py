"""Activation checkpointing on the worker: a client's `torch.utils.checkpoint` region, done here.

The client says where a region starts and ends (`CheckpointRegion`); its ops arrive one at a time,
so there is no function to call again as torch's checkpoint does. Instead a `Region` records each
op as it runs (the callable, its arguments - the region's own results by position, anything else
by reference, as torch's checkpoint holds its inputs - grad mode and autocast) and runs it under
saved-tensor hooks that keep a numbered holder in place of each tensor saved for backward. The
first time backward needs one, the region's ops run again, from the RNG state it started with,
under hooks that collect what they save, in the same order; each is handed over once and dropped.
So between forward and backward a region keeps only what its callers hold - its inputs and its
outputs - and the worker's peak memory falls as it does locally.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_flatten, tree_map


class _Result:
    """Output `k` of the region's op `index`, as an argument of a later op of the region."""

    __slots__ = ("index", "k")

    def __init__(self, index: int, k: int) -> None:
        self.index, self.k = index, k


class _Holder:
    """What autograd keeps for the region's saved tensor `number`."""

    __slots__ = ("region", "number")

    def __init__(self, region: "Region", number: int) -> None:
        self.region, self.number = region, number


class Region:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self._ops: list[tuple] = []  # (func, args, kwargs, grad_enabled, autocast dtype)
        self._results: dict[int, tuple[weakref.ref, int, int]] = {}  # id(tensor) -> its op's index, k
        self._last_use: dict[int, int] = {}  # op -> the last op of the region that uses its outputs
        self._saved = 0  # tensors saved for backward, numbered in the order they were
        self._recomputed: dict[int, list] = {}  # backward (graph task id) -> what the replay saved

    def hooks(self) -> saved_tensors_hooks:
        return saved_tensors_hooks(self._pack, _unpack)

    def record(self, func: Callable, args: tuple, kwargs: dict, grad_enabled: bool,
               autocast: torch.dtype | None, outputs: list[torch.Tensor]) -> None:
        """An op of the region has run (under `hooks()`), with these tensor outputs."""
        index = len(self._ops)
        args, kwargs = tree_map(lambda v: self._as_argument(v, index), (args, kwargs))
        self._ops.append((func, args, kwargs, grad_enabled, autocast))
        for k, t in enumerate(outputs):
            self._results[id(t)] = (weakref.ref(t), index, k)

    def _as_argument(self, value: Any, user: int) -> Any:
        if isinstance(value, torch.Tensor):
            known = self._results.get(id(value))
            if known is not None and known[0]() is value:
                self._last_use[known[1]] = user
                return _Result(known[1], known[2])
        return value

    def _pack(self, tensor: torch.Tensor) -> _Holder:
        holder = _Holder(self, self._saved)
        self._saved += 1
        return holder

    def unpack(self, number: int) -> torch.Tensor:
        task = torch._C._current_graph_task_id()
        saved = self._recomputed.get(task)
        if saved is None or saved[number] is None:
            saved = self._recomputed[task] = self._replay()
        tensor, saved[number] = saved[number], None
        if all(t is None for t in saved):
            del self._recomputed[task]
        return tensor

    def _replay(self) -> list:
        """Run the region's ops again, as they first ran; what they save for backward, in order."""
        saved: list = []

        def pack(t: torch.Tensor) -> None:
            saved.append(t.detach() if t.requires_grad else t)

        results: dict[int, list[torch.Tensor]] = {}  # op -> its outputs, while a later op needs them
        done_with: dict[int, list[int]] = {}  # op -> the ops whose outputs it uses last
        for op, user in self._last_use.items():
            done_with.setdefault(user, []).append(op)

        def argument(value: Any) -> Any:
            return results[value.index][value.k] if isinstance(value, _Result) else value

        cuda = [self.device] if self._cuda_rng is not None else []
        with torch.random.fork_rng(devices=cuda, device_type=self.device.type), saved_tensors_hooks(pack, _unused):
            torch.set_rng_state(self._cpu_rng)
            if self._cuda_rng is not None:
                torch.cuda.set_rng_state(self._cuda_rng, self.device)
            for index, (func, args, kwargs, grad_enabled, autocast) in enumerate(self._ops):
                if len(saved) >= self._saved:
                    break  # everything backward needs is back
                args, kwargs = tree_map(argument, (args, kwargs))
                with torch.set_grad_enabled(grad_enabled), (
                        torch.autocast(self.device.type, autocast) if autocast is not None else contextlib.nullcontext()):
                    result = func(*args, **kwargs)
                del args, kwargs
                if index in self._last_use:
                    results[index] = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
                del result
                for op in done_with.get(index, ()):
                    del results[op]
        if len(saved) != self._saved:
            raise RuntimeError(
                f"torchremote: recomputing a checkpointed region saved {len(saved)} tensors for backward "
                f"where its forward saved {self._saved}: the region's ops did not run the same way again")
        return saved


def _unpack(holder: _Holder) -> torch.Tensor:
    return holder.region.unpack(holder.number)


def _unused(_: Any) -> None:
    raise RuntimeError("torchremote: a recomputation's own graph is never backwarded")
