"""Optimizers a client stepped on the worker with `tr.compile(optimizer)`: torch's own optimizer,
made here over the parameters the client names, so that a step is one op instead of the dozen
multi-tensor calls (and ~200 metadata reads) an unchanged optimizer sends. Only torch's optimizer
classes, built from plain hyperparameters; one session's optimizers are its own."""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ..wire.errors import WorkerPermissionError
from ..wire.graphs import OPTIMIZER_NEW, OPTIMIZER_STATE, OPTIMIZER_STEP, OPTIMIZERS
from .provenance import Provenance


class Optimizers:
    def __init__(self, provenance: Provenance) -> None:
        self.provenance = provenance
        self._made: dict[int, torch.optim.Optimizer] = {}
        self._impl: dict[int, dict] = {}  # the implementation chosen for groups that left it to torch

    def ops(self) -> dict[str, Callable]:
        return {OPTIMIZER_NEW: self.new, OPTIMIZER_STEP: self.step, OPTIMIZER_STATE: self.state}

    def new(self, key: int, name: str, groups: list, *params: torch.Tensor) -> None:
        """`name` from `OPTIMIZERS`; `groups`: each group's parameter count and hyperparameters.
        Groups that leave the implementation to torch get its fused kernel where the optimizer
        and device have one (one kernel for the whole step), else its multi-tensor one."""
        if name not in OPTIMIZERS:
            raise WorkerPermissionError(f"optimizer {name!r} is not one of {OPTIMIZERS}")
        made, i = [], 0
        for count, hyper in groups:
            _check_hyper(hyper)
            made.append({"params": list(params[i:i + count]), **hyper})
            i += count
        cls = getattr(torch.optim, name)
        accepts = inspect.signature(cls).parameters
        free = [g.get("fused") is None and g.get("foreach") is None for g in made]
        for impl in ({"fused": True}, {"foreach": True}, {}):
            if any(k not in accepts for k in impl):
                continue
            chosen = [{k: v for k, v in g.items() if k not in impl or not f} if impl else g
                      for g, f in zip(made, free)]
            try:
                opt = cls(chosen, **impl)  # torch checks here that the kernel exists for these tensors
            except (RuntimeError, ValueError):
                continue
            self._made[key], self._impl[key] = opt, impl
            return None
        raise RuntimeError(f"torch.optim.{name} could not be made from these parameter groups")

    def step(self, key: int, hypers: list, *tensors: torch.Tensor) -> tuple:
        """One step, with each group's hyperparameters as the client has them now (a scheduler's
        lr). `tensors`: the parameters and their gradients, for provenance. Returns the state
        tensors this step made (the first step's), so that the session holds them and the memory
        budget counts them; the client names none of them, and they go with the session."""
        opt = self._optimizer(key)
        before = {id(t) for state in opt.state.values() for t in state.values()}
        impl = self._impl[key]
        for group, hyper in zip(opt.param_groups, hypers):
            _check_hyper(hyper)
            if impl and hyper.get("fused") is None and hyper.get("foreach") is None:
                hyper = {k: v for k, v in hyper.items() if k not in ("fused", "foreach")}  # the kernel chosen here stays
            group.update(hyper)
        opt.step()
        if self.provenance.watching:  # parameters and state follow the gradients' provenance
            derived = self.provenance.combine(OPTIMIZER_STEP, list(tensors))
            if derived is not None:  # marked here: a fused kernel changes them without a version bump
                for group in opt.param_groups:
                    for p in group["params"]:
                        self.provenance.mark(p, derived)
                        for t in opt.state.get(p, {}).values():
                            if isinstance(t, torch.Tensor):
                                self.provenance.mark(t, derived)
        return tuple(t for state in opt.state.values() for t in state.values()
                     if isinstance(t, torch.Tensor) and id(t) not in before)

    def state(self, key: int) -> list:
        """Each parameter's state, in order: `[[name, tensor], ...]` per parameter."""
        opt = self._optimizer(key)
        out = []
        for group in opt.param_groups:
            for p in group["params"]:
                out.append([[k, v] for k, v in sorted(opt.state.get(p, {}).items())])
        return out

    def _optimizer(self, key: int) -> torch.optim.Optimizer:
        opt = self._made.get(key)
        if opt is None:
            raise LookupError(f"optimizer {key} was not made on this worker")
        return opt


def _check_hyper(hyper: dict) -> None:
    for k, v in hyper.items():
        if not isinstance(k, str) or not _plain(v):
            raise WorkerPermissionError(f"optimizer hyperparameter {k!r} must be a number, bool, None or a "
                                        f"tuple of those")


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float)):
        return True
    return isinstance(v, (list, tuple)) and all(_plain(x) for x in v)
