"""Which private published data each value on a worker derives from.

The worker's owner publishes private data (`publish(t, private=True)`, or `allow_get=False`).
Whatever a client computes from it derives from it, through every path a value can take:

- op outputs derive from the op's inputs; an input an op changes in place (its version counter
  moved: `add_`, `out=`, `copy_`, an optimizer's foreach update, batch norm's running stats) gains
  the op's sources too;
- views share their base's storage, and provenance is kept per storage, so a view of derived data
  is derived, and an in-place change through a view taints its base;
- a backward pass over derived data taints every gradient it can have reached (every `.grad` of the
  client's tensors), and a parameter updated from such a gradient derives from it in turn.

Tracking starts for a session the first time it names private data: a session that never does pays
one attribute check per op. Entries go when their storage is freed (a finalizer), so a storage's
memory reused later is not mistaken for derived data.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable

import torch

from .store import storage_key

MAX_LINEAGE = 160
OPEN = "_"   # an open input, in a lineage
BACKWARD_OPS = frozenset({"torch.Tensor.backward", "torch.autograd.backward", "torch.autograd.grad"})


@dataclass(frozen=True, slots=True)
class Derived:
    sources: frozenset[str]   # the private published objects it derives from, by name
    lineage: str              # how, e.g. "mean(add(#X, #Y))"
    steps: int = 0            # backward passes in its history (a parameter after N training steps: N)


def short_name(op: str) -> str:
    """'torch.Tensor.add' -> 'add'; an ATen overload ('..._foreach_add_.List') -> its op's name."""
    parts = op.split(".")
    if len(parts) > 1 and (parts[-1][:1].isupper() or parts[-1] == "default"):
        return parts[-2]
    return parts[-1]


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_LINEAGE else text[:MAX_LINEAGE - 1] + "…"


class Provenance:
    """One session's record: storage -> `Derived`."""

    def __init__(self, private: dict[int, str]) -> None:
        self._private = private          # the store's private storages -> their names
        self._derived: dict[int, Derived] = {}
        self.watching = False            # set once the session names private data

    def of(self, t: torch.Tensor) -> Derived | None:
        if not self.watching or not t.numel():
            return None
        key = storage_key(t)
        name = self._private.get(key)
        if name is not None:
            return Derived(frozenset((name,)), name)
        return self._derived.get(key)

    def combine(self, op: str, inputs: Iterable[torch.Tensor]) -> Derived | None:
        """What an op's results derive from: the union of its inputs' sources (None: open data)."""
        parts = [self.of(t) for t in inputs]
        if not any(parts):
            return None
        sources = frozenset().union(*(p.sources for p in parts if p))
        lineage = _shorten(f"{short_name(op)}({', '.join(p.lineage if p else OPEN for p in parts)})")
        return Derived(sources, lineage, max(p.steps for p in parts if p))

    def mark(self, t: torch.Tensor, derived: Derived) -> None:
        """`t`'s storage now holds values derived from `derived.sources`."""
        if not t.numel():
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._private:
            return
        known = self._derived.get(key)
        if known is None:
            weakref.finalize(storage, self._derived.pop, key, None)
        elif not derived.sources <= known.sources or known.steps > derived.steps:
            derived = Derived(known.sources | derived.sources, derived.lineage, max(known.steps, derived.steps))
        self._derived[key] = derived

    def mark_gradients(self, tensors: Iterable[torch.Tensor], derived: Derived) -> None:
        """After a backward pass over derived data: every gradient it may have written."""
        grads = Derived(derived.sources, _shorten(f"grad({derived.lineage})"), derived.steps + 1)
        for t in tensors:
            if t.requires_grad and t.grad is not None:
                self.mark(t.grad, grads)

    @property
    def derived_count(self) -> int:
        return len(self._derived)
