"""How an op that fails on private-derived data fails without the client learning that it did.

Whether `gather` finds an index out of range, or `_assert_async` a condition false, depends on the
values; if the client were told, each failure would answer a yes/no question about private data.
So the op "succeeds" as far as the client can see: its outputs exist on the worker with the
metadata a run on fake tensors gives (what the same op on any data of those shapes yields), held
and counted like real results. Their values are zeros, and their provenance carries the error, so
whatever derives from them carries it too. Nothing about it leaves until the owner approves a
release: his request list shows the error, and an approved release raises it for the client
instead of a value.

Outputs that alias inputs stay aliases (an in-place op returns its target, a view views its base),
and inputs the op writes into gain the error; outputs that require grad are connected to the
inputs that do, with zero gradients, so a backward pass reaches the same leaves it would have.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Iterator

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           FakeTensorMode, UnsupportedOperatorException)
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_map


class Outcome:
    """What a failed op is taken to have done: its outputs (stand-ins, or inputs it returns) and
    the inputs it writes into."""
    __slots__ = ("outputs", "written")

    def __init__(self, outputs: list[torch.Tensor], written: list[torch.Tensor]) -> None:
        self.outputs, self.written = outputs, written


def stand_in_outcome(func: Callable, args: tuple, kwargs: dict, grad_enabled: bool,
                     autocast: tuple[str, torch.dtype] | None) -> Outcome | Exception:
    """The outcome of `func(*args, **kwargs)` as a fake run sees it, made of real tensors; or the
    fake run's own error, if it fails too (one that knows no values, so it can be told)."""
    mode = FakeTensorMode()
    real_of: dict[int, torch.Tensor] = {}
    fakes: list[torch.Tensor] = []

    def fake(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        f = mode.from_tensor(v)
        if id(f) not in real_of:
            real_of[id(f)] = v
            fakes.append(f)
        return f

    try:
        fake_args, fake_kwargs = tree_map(fake, args), tree_map(fake, kwargs)
        versions = [f._version for f in fakes]
        with _quiet_fake_errors(), mode, torch.set_grad_enabled(grad_enabled):
            if autocast is not None:
                with torch.autocast(*autocast):
                    result = func(*fake_args, **fake_kwargs)
            else:
                result = func(*fake_args, **fake_kwargs)
    except Exception as e:
        return e
    written = [real_of[id(f)] for f, version in zip(fakes, versions) if f._version != version]
    storages = {StorageWeakRef(f.untyped_storage()): real_of[id(f)] for f in fakes}
    differentiable = [real_of[id(f)] for f in fakes if f.requires_grad and f.dtype.is_floating_point]
    leaves = result if isinstance(result, torch.Tensor) else tree_flatten(result)[0]
    outputs = []
    for leaf in [leaves] if isinstance(leaves, torch.Tensor) else leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        real = real_of.get(id(leaf))
        if real is None:
            base = storages.get(StorageWeakRef(leaf.untyped_storage()))
            real = (base.as_strided(leaf.shape, leaf.stride(), leaf.storage_offset()) if base is not None
                    else _zeros_like(leaf, differentiable, grad_enabled))
        outputs.append(real)
    return Outcome(outputs, written)


def knows_no_values(fake_error: Exception) -> bool:
    """Whether a fake run's error says something of the op and its metadata only, not of the fake
    run's own limits (no fake kernel, an output shape that depends on the data), which a real run
    on some values passes."""
    return not isinstance(fake_error, (DataDependentOutputException, DynamicOutputShapeException,
                                       UnsupportedOperatorException, NotImplementedError))


def backward_outcome(op: str, args: tuple, kwargs: dict) -> Outcome:
    """What a failed backward pass is taken to have done: `autograd.grad` returns zero gradients
    for its inputs; `backward()` returns nothing (`give_missing_grads` fills in the `.grad`s)."""
    if op != "torch.autograd.grad":
        return Outcome([], [])
    wrt = args[1] if len(args) > 1 else kwargs.get("inputs", ())
    wrt = [wrt] if isinstance(wrt, torch.Tensor) else list(wrt)
    return Outcome([torch.zeros_like(t) for t in wrt], [])


def give_missing_grads(roots: list[torch.Tensor]) -> None:
    """Zero `.grad`s for the leaves a backward pass from `roots` reaches that have none yet: those
    a pass that had not failed would have written."""
    seen, stack = set(), [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad: a leaf's gradient goes there
        if isinstance(leaf, torch.Tensor) and leaf.grad is None:
            leaf.grad = torch.zeros_like(leaf)
        stack.extend(next_node for next_node, _ in node.next_functions)


def _zeros_like(fake: torch.Tensor, differentiable: list[torch.Tensor], grad_enabled: bool) -> torch.Tensor:
    """Zeros of `fake`'s metadata; requiring grad through `differentiable` where `fake` does."""
    zeros = torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype, device=fake.device).zero_()
    if not fake.requires_grad:
        return zeros
    if not differentiable:  # a factory asked for requires_grad=True
        return zeros.requires_grad_()
    with torch.set_grad_enabled(grad_enabled):
        return zeros + sum(t.sum() for t in differentiable) * 0


_quiet = threading.local()


class _DuringStandIns(logging.Filter):
    """Drops torch's log of a failing fake run made by this thread for stand-ins: there it is an
    answer, not a fault (other threads' records pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "on", False)


logging.getLogger("torch._subclasses.fake_tensor").addFilter(_DuringStandIns())


@contextlib.contextmanager
def _quiet_fake_errors() -> Iterator[None]:
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = False
