"""Autograd bookkeeping on the client: a light graph of pointers, no meta-device autograd.

The worker holds the real autograd graph and runs `backward`. The client only answers what torch
answers locally - `requires_grad`, `is_leaf`, `grad_fn`, whether `.grad` exists and its metadata -
and it does so from this graph, with no round trip:

- every RemoteTensor that requires grad and is not a leaf has a `Node`: the name of its grad_fn and
  edges to the nodes (or leaf tensors) its history reaches. The edges come from the op's cached plan
  (`inference.py` works them out once per op and input metadata), so recording costs a tuple.
- `backward()` walks the graph from its roots: every leaf (and `retain_grad()` tensor) it reaches has
  a `.grad` from then on. The new `.grad` objects are named by one op queued right after the
  backward (`torchremote.grads_of`), so their pointers exist at once, with no message per parameter;
  later accumulations change them in place, as on the worker. `zero_grad()`'s `p.grad = None`
  resets travel together as one op too.
- views share their base's history as torch's do: an in-place op on a view (or on the base) makes
  the base's node a `CopySlices` and every view re-derives its node from the base when next used.

The torch calls that read or drive this graph (`backward`, `autograd.grad`, `requires_grad`, `.grad`,
...) are answered in `autograd_calls.py`, above dispatch.

Which inputs an op's gradient reaches comes from one meta backward per cold plan, so undefined
gradients (torch's None, as for `norm(x, 0)`) are known. Where the answer depends on data, or for
the graph of a gradient made with `create_graph=True` (taken to reach all it came from), the
prediction can differ from the worker: then `grads_of` fails at the next synchronisation with a
clear error rather than hand out a wrong pointer. The worker is the ground truth for values; this
graph, only for which pointers exist.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch

from ..wire import messages as m
from ..wire.codec import strides_after_transfer
from . import inference
from .inference import LEAF, NO_GRAD, NON_LEAF, VIEW_OF_LEAF, VIEW_OF_NON_LEAF
from .tensor import RemoteTensor


class Node:
    """A RemoteTensor's grad_fn: its name and the edges of its history (Nodes, or leaf tensors)."""

    __slots__ = ("_name", "edges", "retained", "__weakref__")

    def __init__(self, name: str, edges: tuple) -> None:
        self._name = name
        self.edges = edges
        self.retained: weakref.ref | None = None  # the tensor that called retain_grad(), if any

    def name(self) -> str:
        return self._name

    @property
    def next_functions(self) -> tuple:
        return tuple((e if isinstance(e, Node) else AccumulateGrad(e), 0) for e in self.edges)

    def __repr__(self) -> str:
        return f"<{self._name} (on a torchremote worker)>"


class AccumulateGrad:
    """What `next_functions` shows for a leaf, as torch does."""

    __slots__ = ("variable",)

    def __init__(self, variable: RemoteTensor) -> None:
        self.variable = variable

    def name(self) -> str:
        return "torch::autograd::AccumulateGrad"

    next_functions = ()


# --- per tensor ----------------------------------------------------------------------------------

def refresh(t: RemoteTensor) -> None:
    """A view whose family changed in place since its node was made re-derives it from the base."""
    base = t._view_base
    if base is not None and t._fam_version != base._fam_version:
        edge = edge_of(base)
        t._rg = base._rg
        t._grad_node = Node("AsStridedBackward0", (edge,)) if edge is not None else None
        t._fam_version = base._fam_version


def edge_of(t: RemoteTensor) -> Any:
    """Where a gradient for `t` flows: its node, itself (a leaf that requires grad), or None."""
    if t._view_base is not None:
        refresh(t)
    if not t._rg:
        return None
    return t._grad_node if t._grad_node is not None else t


def standing(t: RemoteTensor) -> int:
    if t._view_base is not None:
        refresh(t)
        if not t._rg:
            return NO_GRAD
        base = t._view_base
        return VIEW_OF_LEAF if base._rg and base._grad_node is None else VIEW_OF_NON_LEAF
    if not t._rg:
        return NO_GRAD
    return LEAF if t._grad_node is None else NON_LEAF


def record(plan: inference.Plan, flat: list, results: list) -> None:
    """Give a call's results their autograd standing, from its plan (results as `plan.outs`)."""
    for out, result in zip(plan.outs, results):
        info = out.grad
        if info is None:
            continue
        requires_grad, name, reaches, recorded = info
        if out.kind == inference.NEW:
            result._rg = requires_grad
            if recorded:
                result._grad_node = Node(name, edges(flat, reaches))
        elif out.kind == inference.IN:
            _in_place(result, requires_grad, name, edges(flat, reaches) if recorded else None)


def record_node(t: RemoteTensor, name: str, edges: tuple) -> None:
    """`t` is the output of one call whose gradient flows to `edges` (a compiled graph's call)."""
    t._rg = True
    t._grad_node = Node(name, edges)


def edges(flat: list, positions: tuple[int, ...]) -> tuple:
    """The edges to the flat inputs at `positions` that require grad."""
    found = []
    for i in positions:
        a = flat[i]
        if isinstance(a, RemoteTensor):
            e = edge_of(a)
            if e is not None:
                found.append(e)
    return tuple(found)


def _in_place(t: RemoteTensor, requires_grad: bool, name: str | None, edges: tuple | None) -> None:
    if edges is None:  # not recorded: only requires_grad can change (detach_, requires_grad_)
        t._rg = requires_grad
        if not requires_grad:
            t._grad_node = None
        return
    node = Node(name, edges)
    base = t._view_base
    if base is None:
        _retain_moves(t._grad_node, node)
        t._grad_node, t._rg = node, True
        t._fam_version += 1
        return
    base_edge = edge_of(base)
    base._grad_node = Node("CopySlices", ((base_edge,) if base_edge is not None else ()) + (node,))
    base._rg = True
    base._fam_version += 1
    t._grad_node, t._rg, t._fam_version = Node("AsStridedBackward0", (base._grad_node,)), True, base._fam_version


def _retain_moves(old: Node | None, new: Node) -> None:
    if old is not None and old.retained is not None:
        new.retained, old.retained = old.retained, None


def rebuild_outputs(flat: list, name: str, results: Iterable[RemoteTensor]) -> None:
    """Results of a synchronous call that require grad: their history reaches every input's."""
    reached = None
    for r in results:
        if r._rg:
            if reached is None:
                reached = edges(flat, tuple(range(len(flat))))
            r._grad_node = Node(name, reached)


# --- backward and autograd.grad ------------------------------------------------------------------

def walk(roots: list) -> tuple[set[int], list[RemoteTensor], list[Node]]:
    """Everything reachable from `roots` (edges): node ids, leaf tensors, nodes."""
    seen: set[int] = set()
    leaves: list[RemoteTensor] = []
    nodes: list[Node] = []
    todo = list(roots)
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, Node):
            nodes.append(e)
            todo.extend(e.edges)
        else:
            leaves.append(e)
    return seen, leaves, nodes


def check_roots(tensors: list, grads: list) -> list:
    roots = []
    for i, (t, g) in enumerate(zip(tensors, grads)):
        e = edge_of(t) if isinstance(t, RemoteTensor) else None
        if e is None:
            raise RuntimeError(f"element {i} of tensors does not require grad and does not have a grad_fn")
        if g is None:
            if t.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
        elif isinstance(g, torch.Tensor) and g.shape != t.shape:
            raise RuntimeError(f"Mismatch in shape: grad_output[{i}] has a shape of {g.shape} and "
                               f"output[{i}] has a shape of {t.shape}.")
        roots.append(e)
    return roots


def as_list(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, torch.Tensor):
        return [v]
    return list(v)


_grad_metas: dict[tuple, m.TensorMeta] = {}


def grad_meta(t: RemoteTensor, requires_grad: bool = False, contiguous: bool = False) -> m.TensorMeta:
    """The metadata of a gradient torch makes for `t`: its strides if dense, else contiguous."""
    key = (t._meta_key(), requires_grad, contiguous)
    meta = _grad_metas.get(key)
    if meta is None:
        stand_in = t._stand_in()
        if contiguous:
            stride = torch.empty(stand_in.shape, device="meta").stride()
        else:
            stride = strides_after_transfer(stand_in)  # the same rule: its strides if dense, else contiguous
        meta = _grad_metas[key] = m.TensorMeta(tuple(stand_in.shape), tuple(stride), 0, stand_in.dtype,
                                               requires_grad)
    return meta


def _receives(t: RemoteTensor, create_graph: bool, retained: bool, new: list) -> None:
    """`t` receives a gradient. A new `.grad` object goes on `new`: there is none yet, or it is a
    retain_grad() tensor's (a contiguous clone, then `grad + new`: a new tensor each time), or
    create_graph makes the sum out of place. Otherwise the worker accumulates in place, and the
    pointer the client holds stays right."""
    if t._grad_ptr is None or retained or create_graph:
        new.append((t, grad_meta(t, create_graph, contiguous=retained)))


def receivers(tensors: list, grads: list, inputs: list) -> list[tuple[RemoteTensor, bool]]:
    """Check the roots and walk the graph: the tensors a backward gives a gradient, each with
    whether it is a retain_grad() tensor (a non-leaf) rather than a leaf."""
    roots = check_roots(tensors, grads)
    seen, leaves, nodes = walk(roots)
    out: list = []
    targets = None
    if inputs:
        targets = set()
        for t in inputs:
            e = edge_of(t) if isinstance(t, RemoteTensor) else None
            if e is None:
                raise RuntimeError("One of the differentiated Tensors does not require grad")
            targets.add(id(e))
            if id(e) in seen:
                out.append((t, isinstance(e, Node)))
    else:
        out.extend((leaf, False) for leaf in leaves)
    for node in nodes:  # retain_grad() tensors whose node the engine runs
        t = node.retained() if node.retained is not None else None
        if t is not None and t._grad_node is node and (targets is None or targets & walk([node])[0]):
            out.append((t, True))
    return out


def new_grads(receiving: list[tuple[RemoteTensor, bool]], create_graph: bool) -> list:
    """The tensors that get a new `.grad` object from a backward, with its metadata."""
    new: list = []
    for t, retained in receiving:
        _receives(t, create_graph, retained, new)
    return new
