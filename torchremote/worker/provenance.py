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
one attribute check per op.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch

from ..wire.messages import ErrorInfo
from ..wire.ops import short_name

MAX_LINEAGE = 160
LINEAGE_DEPTH = 12   # levels of lineage kept as a tree before it is written out
OPEN = "_"   # an open input, in a lineage
BACKWARD_OPS = frozenset({"torch.Tensor.backward", "torch.autograd.backward", "torch.autograd.grad"})


class Derived:
    """What a value derives from: `sources` (private published objects, by name), `lineage` (how,
    e.g. "mean(add(#X, #Y))"), `steps` (backward passes in its history: a parameter after N
    training steps has N), `error` (the first error an op in its history met: see `failures.py`;
    the owner sees it, the client only through an approved release). The lineage is kept as a small
    tree and written out only when asked for (a release request); every LINEAGE_DEPTH levels it
    is written out and the tree dropped."""
    __slots__ = ("sources", "steps", "error", "_op", "_parts", "_text", "_depth")

    def __init__(self, sources: frozenset[str], steps: int = 0, op: str = "", parts: tuple = (),
                 text: str = "", error: ErrorInfo | None = None) -> None:
        self.sources, self.steps, self.error = sources, steps, error
        self._op, self._parts, self._text = op, parts, text
        depth = 0
        for p in parts:
            if p is not None and p._depth >= depth:
                depth = p._depth + 1
        self._depth = depth
        if depth > LINEAGE_DEPTH:
            self._text, self._parts, self._depth = self.lineage, (), 0

    @property
    def lineage(self) -> str:
        if self._text or not self._op:
            return self._text
        inner = ", ".join(p.lineage if p is not None else OPEN for p in self._parts)
        return _shorten(f"{short_name(self._op)}({inner})")

    def failed(self, error: ErrorInfo) -> "Derived":
        """The same history, ending in an op that failed with `error`."""
        return Derived(self.sources, self.steps, self._op, self._parts, self._text, self.error or error)

    def __repr__(self) -> str:
        failed = f", failed: {self.error.type}" if self.error is not None else ""
        return f"Derived({sorted(self.sources)}, {self.lineage!r}, steps={self.steps}{failed})"


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_LINEAGE else text[:MAX_LINEAGE - 1] + "…"


class _StorageRef(weakref.ref):
    """A weak reference to a storage that knows the key of its entry."""
    __slots__ = ("key",)


class Provenance:
    """One session's record: storage -> `Derived`. An entry holds a weak reference to its storage
    (torch keeps one Python object per live storage), and goes when the storage is freed: memory
    reused later is never mistaken for the old storage."""

    def __init__(self, private: dict[int, str]) -> None:
        self._private = private          # the store's private storages -> their names
        self._named: dict[str, Derived] = {}
        self._derived: dict[int, tuple[_StorageRef, Derived]] = {}
        self.watching = False            # set once the session names private data

    def _forget(self, ref: _StorageRef) -> None:
        entry = self._derived.get(ref.key)
        if entry is not None and entry[0] is ref:
            del self._derived[ref.key]

    def of(self, t: torch.Tensor) -> Derived | None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not key:
            return None
        name = self._private.get(key)
        if name is not None:
            derived = self._named.get(name)
            if derived is None:
                derived = self._named[name] = Derived(frozenset((name,)), text=name)
            return derived
        entry = self._derived.get(key)
        return entry[1] if entry is not None and entry[0]() is storage else None

    def combine(self, op: str, inputs: list[torch.Tensor]) -> Derived | None:
        """What an op's results derive from: the union of its inputs' sources (None: open data)."""
        of = self.of
        if len(inputs) == 1:  # the common case, made cheap
            p = of(inputs[0])
            return None if p is None else Derived(p.sources, p.steps, op, (p,), error=p.error)
        parts = tuple([of(t) for t in inputs])
        first = None
        for p in parts:
            if p is not None:
                first = p
                break
        if first is None:
            return None
        sources, steps, error = first.sources, first.steps, first.error
        for p in parts:
            if p is not None and p is not first:
                if not p.sources <= sources:
                    sources = sources | p.sources
                steps = max(steps, p.steps)
                error = error or p.error
        return Derived(sources, steps, op, parts, error=error)

    def mark(self, t: torch.Tensor, derived: Derived) -> None:
        """`t`'s storage now holds values derived from `derived.sources`."""
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not key or key in self._private:
            return
        entry = self._derived.get(key)
        if entry is not None and entry[0]() is storage:
            known = entry[1]
            if not derived.sources <= known.sources or known.steps > derived.steps:
                derived = Derived(known.sources | derived.sources, max(known.steps, derived.steps),
                                  text=derived.lineage, error=known.error or derived.error)
            elif known.error is not None and derived.error is None:
                derived = derived.failed(known.error)  # an error in its history stays there
            self._derived[key] = (entry[0], derived)
            return
        ref = _StorageRef(storage, self._forget)
        ref.key = key
        self._derived[key] = (ref, derived)

    def mark_gradients(self, tensors: Iterable[torch.Tensor], derived: Derived) -> None:
        """After a backward pass over derived data: every gradient it may have written."""
        grads = Derived(derived.sources, derived.steps + 1, "grad", (derived,), error=derived.error)
        for t in tensors:
            if t.requires_grad and (t.is_leaf or t.retains_grad) and t.grad is not None:
                self.mark(t.grad, grads)
