"""Optimizers a client stepped on the worker with `tr.compile(optimizer)`: torch's own optimizer,
made here over the parameters the client names, so that a step is one op instead of the dozen
multi-tensor calls (and ~200 metadata reads) an unchanged optimizer sends. Only torch's optimizer
classes, built from plain hyperparameters; one session's optimizers are its own."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..wire.errors import WorkerPermissionError
from ..wire.graphs import OPTIMIZER_NEW, OPTIMIZER_STATE, OPTIMIZER_STEP, OPTIMIZERS
from .provenance import Provenance


class Optimizers:
    def __init__(self, provenance: Provenance) -> None:
        self.provenance = provenance
        self._made: dict[int, torch.optim.Optimizer] = {}

    def ops(self) -> dict[str, Callable]:
        return {OPTIMIZER_NEW: self.new, OPTIMIZER_STEP: self.step, OPTIMIZER_STATE: self.state}

    def new(self, key: int, name: str, groups: list, *params: torch.Tensor) -> None:
        """`name` from `OPTIMIZERS`; `groups`: each group's parameter count and hyperparameters."""
        if name not in OPTIMIZERS:
            raise WorkerPermissionError(f"optimizer {name!r} is not one of {OPTIMIZERS}")
        made, i = [], 0
        for count, hyper in groups:
            _check_hyper(hyper)
            made.append({"params": list(params[i:i + count]), **hyper})
            i += count
        self._made[key] = getattr(torch.optim, name)(made)
        return None

    def step(self, key: int, hypers: list, *tensors: torch.Tensor) -> None:
        """One step, with each group's hyperparameters as the client has them now (a scheduler's
        lr). `tensors`: the parameters and their gradients, for provenance."""
        opt = self._optimizer(key)
        for group, hyper in zip(opt.param_groups, hypers):
            _check_hyper(hyper)
            group.update(hyper)
        opt.step()
        if self.provenance.watching:  # the state follows the gradients, as the parameters do
            derived = self.provenance.combine(OPTIMIZER_STEP, list(tensors))
            if derived is not None:
                for state in opt.state.values():
                    for t in state.values():
                        if isinstance(t, torch.Tensor):
                            self.provenance.mark(t, derived)
        return None

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
