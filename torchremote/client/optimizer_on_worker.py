"""`tr.compile(optimizer)`: the optimizer's step as one op on the worker.

An unchanged torch optimizer steps through the client's dispatch: for AdamW a dozen multi-tensor
calls plus some 200 metadata reads per step, most of a compiled training step's client time. Here
the worker makes the same torch optimizer over the parameters it holds (`worker/optimizers.py`)
and each `step()` sends one op with each group's hyperparameters as they are now, so an LR
scheduler's changes apply; `zero_grad()` resets every `.grad` in one op too. The state lives on the worker; `state_dict()` gives pointers to it
(one round trip), which `torch.save` stores as it stores any pointer.
"""
from __future__ import annotations

import itertools
import types
from typing import Any

import torch

from ..wire.graphs import OPTIMIZER_NEW, OPTIMIZER_STATE, OPTIMIZER_STEP, OPTIMIZERS
from .dispatch import remote_call_sync
from .tensor import RemoteTensor

_keys = itertools.count(1)
_ATTR = "_torchremote_on_worker"


def compile_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`opt` itself, its `step()` now one op on the worker that holds its parameters."""
    name = type(opt).__name__
    if name not in OPTIMIZERS or getattr(torch.optim, name) is not type(opt):
        raise TypeError(f"tr.compile steps torch's own optimizers on a worker ({', '.join(OPTIMIZERS)}), "
                        f"not {type(opt).__qualname__}")
    params = [p for g in opt.param_groups for p in g["params"]]
    workers = {p._worker for p in params if isinstance(p, RemoteTensor)}
    if len(workers) != 1 or not all(isinstance(p, RemoteTensor) for p in params):
        raise ValueError("tr.compile(optimizer) needs every parameter on one worker")
    if any(opt.state.values()):
        raise NotImplementedError("tr.compile(optimizer) before its first step: its state is made on the worker")
    for g in opt.param_groups:
        _hyper(g)  # refuses what cannot travel (a tensor lr), before anything is sent
    setattr(opt, _ATTR, _OnWorker(workers.pop(), params, [len(g["params"]) for g in opt.param_groups]))
    opt.step = types.MethodType(_step, opt)  # a bound method, as LR schedulers expect to wrap
    opt.zero_grad = types.MethodType(_zero_grad, opt)
    opt.state_dict = types.MethodType(_state_dict, opt)
    opt.load_state_dict = types.MethodType(_load_state_dict, opt)
    return opt


class _OnWorker:
    __slots__ = ("worker", "params", "counts", "key", "made")

    def __init__(self, worker: Any, params: list, counts: list[int]) -> None:
        self.worker, self.params, self.counts = worker, params, counts
        self.key = next(_keys)
        self.made = False


def _hyper(group: dict) -> dict:
    hyper = {k: v for k, v in group.items() if k != "params"}
    for k, v in hyper.items():
        if isinstance(v, torch.Tensor):
            raise NotImplementedError(f"tr.compile(optimizer): hyperparameter {k!r} is a tensor; give it as a number")
    return hyper


def _step(opt: torch.optim.Optimizer, closure: Any = None) -> None:
    if closure is not None:
        raise NotImplementedError("tr.compile(optimizer).step(closure) is not supported; call the closure first")
    on = getattr(opt, _ATTR)
    worker = on.worker
    if [len(g["params"]) for g in opt.param_groups] != on.counts:
        raise NotImplementedError("the optimizer's parameter groups changed after tr.compile(optimizer) "
                                  "(add_param_group): compile a new optimizer instead")
    hypers = [_hyper(g) for g in opt.param_groups]
    if not on.made:
        groups = [[count, hyper] for count, hyper in zip(on.counts, hypers)]
        worker._call(OPTIMIZER_NEW, (on.key, type(opt).__name__, groups, *[p._ref for p in on.params]), {})
        on.made = True
    grads = [g._ref for g in (p._grad_ptr for p in on.params) if g is not None]
    worker._call(OPTIMIZER_STEP, (on.key, hypers, *[p._ref for p in on.params], *grads), {})
    return None


def _zero_grad(opt: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    """As torch's, with no torch call per parameter: the resets travel as one op, as they do when
    torch's own zero_grad sets each `.grad` to None."""
    if not set_to_none:
        return type(opt).zero_grad(opt, set_to_none=False)
    on = getattr(opt, _ATTR)
    for p in on.params:
        if p._grad_ptr is not None:
            p._grad_ptr = None
            on.worker._set_grad_none_later(p)
    return None


def _state_dict(opt: torch.optim.Optimizer) -> dict:
    """torch's state_dict, its state pointers to the worker's (fetched once per call)."""
    on = getattr(opt, _ATTR)
    if on.made:
        states = remote_call_sync(on.worker, OPTIMIZER_STATE, (on.key,))
        opt.state.clear()
        for p, entries in zip(on.params, states):
            if entries:
                opt.state[p] = {k: v for k, v in entries}
    return type(opt).state_dict(opt)


def _load_state_dict(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    raise NotImplementedError("load an optimizer's state before tr.compile(optimizer): its state then lives "
                              "on the worker")
