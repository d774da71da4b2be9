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

Which inputs an op's gradient reaches comes from one meta backward per cold plan, so undefined
gradients (torch's None, as for `norm(x, 0)`) are known. Where the answer depends on data, or for
the graph of a gradient made with `create_graph=True` (taken to reach all it came from), the
prediction can differ from the worker: then `grads_of` fails at the next synchronisation with a
clear error rather than hand out a wrong pointer. The worker is the ground truth for values; this
graph, only for which pointers exist.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Iterable

import torch

from . import inference
from . import messages as m
from .inference import LEAF, NO_GRAD, NON_LEAF, VIEW_OF_LEAF, VIEW_OF_NON_LEAF
from .ops import GRADS_OF, implements
from .tensor import RemoteTensor

_T = torch.Tensor


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
                result._grad_node = Node(name, _edges(flat, reaches))
        elif out.kind == inference.IN:
            _in_place(result, requires_grad, name, _edges(flat, reaches) if recorded else None)


def _edges(flat: list, positions: tuple[int, ...]) -> tuple:
    edges = []
    for i in positions:
        a = flat[i]
        if isinstance(a, RemoteTensor):
            e = edge_of(a)
            if e is not None:
                edges.append(e)
    return tuple(edges)


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
    edges = None
    for r in results:
        if r._rg:
            if edges is None:
                edges = _edges(flat, tuple(range(len(flat))))
            r._grad_node = Node(name, edges)


# --- backward and autograd.grad ------------------------------------------------------------------

def _walk(roots: list) -> tuple[set[int], list[RemoteTensor], list[Node]]:
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


def _check_roots(tensors: list, grads: list) -> list:
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


def _as_list(v: Any) -> list:
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
        from .wire import strides_after_transfer
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


def _backward(tensors: list, grads: list, inputs: list, create_graph: bool) -> list:
    """Check the roots, walk the graph; the tensors that get a new `.grad` object, with its metadata."""
    roots = _check_roots(tensors, grads)
    seen, leaves, nodes = _walk(roots)
    new: list = []
    targets = None
    if inputs:
        targets = set()
        for t in inputs:
            e = edge_of(t) if isinstance(t, RemoteTensor) else None
            if e is None:
                raise RuntimeError("One of the differentiated Tensors does not require grad")
            targets.add(id(e))
            if id(e) in seen:
                _receives(t, create_graph, isinstance(e, Node), new)
    else:
        for leaf in leaves:
            _receives(leaf, create_graph, False, new)
    for node in nodes:  # retain_grad() tensors whose node the engine runs
        t = node.retained() if node.retained is not None else None
        if t is not None and t._grad_node is node and (targets is None or targets & _walk([node])[0]):
            _receives(t, create_graph, True, new)
    return new


@implements(_T.backward)
def _tensor_backward(func: Any, args: tuple, kwargs: dict) -> None:
    return _run_backward(func, args, kwargs, *_bind_tensor_backward(*args, **kwargs))


def _bind_tensor_backward(self: Any, gradient: Any = None, retain_graph: Any = None,
                          create_graph: bool = False, inputs: Any = None) -> tuple:
    return [self], [gradient], _as_list(inputs), create_graph


@implements(torch.autograd.backward)
def _autograd_backward(func: Any, args: tuple, kwargs: dict) -> None:
    return _run_backward(func, args, kwargs, *_bind_autograd_backward(*args, **kwargs))


def _bind_autograd_backward(tensors: Any, grad_tensors: Any = None, retain_graph: Any = None,
                            create_graph: bool = False, grad_variables: Any = None,
                            inputs: Any = None) -> tuple:
    tensors = _as_list(tensors)
    grads = _as_list(grad_tensors if grad_tensors is not None else grad_variables) or [None] * len(tensors)
    return tensors, grads, _as_list(inputs), create_graph


def _run_backward(func: Any, args: tuple, kwargs: dict, tensors: list, grads: list, inputs: list,
                  create_graph: bool) -> None:
    """Queue the backward, then one op that names every `.grad` it makes: pointers to all the new
    gradients, with no message per parameter."""
    from .dispatch import queue, wrap_new
    if len(grads) != len(tensors):
        raise RuntimeError(f"got {len(grads)} gradients for {len(tensors)} tensors")
    new = _backward(tensors, grads, inputs, create_graph)
    worker, _ = queue(func, args, kwargs)
    if not new:
        return
    op_id = worker._call(GRADS_OF, tuple(t._ref for t, _ in new), {})
    history = (tuple(e for e in (edge_of(t) for t in tensors) if e is not None)
               + tuple(e for e in (edge_of(g) for g in grads if isinstance(g, RemoteTensor)) if e is not None))
    for k, (t, meta) in enumerate(new):
        g = wrap_new(meta, worker, m.ClientRef(op_id, k))
        if create_graph:  # a gradient with a graph of its own: its history reaches the backward's
            g._grad_node = Node("AccumulateGradBackward", history)
        t._grad_ptr = g


@implements(torch.autograd.grad)
def _autograd_grad(func: Any, args: tuple, kwargs: dict) -> Any:
    return _grad(func, args, kwargs, *args, **kwargs)


def _grad(func: Any, args: tuple, kwargs: dict, outputs: Any, inputs: Any, grad_outputs: Any = None,
          retain_graph: Any = None, create_graph: bool = False, only_inputs: bool = True,
          allow_unused: bool | None = None, is_grads_batched: bool = False,
          materialize_grads: bool = False) -> Any:
    from .dispatch import queue, remote_call, wrap_new
    if is_grads_batched or not all(isinstance(t, RemoteTensor) for t in _as_list(inputs)):
        return remote_call(func, args, kwargs, sync=True)  # rare forms: the worker answers exactly
    outs = _as_list(outputs)
    grads = _as_list(grad_outputs) or [None] * len(outs)
    roots = _check_roots(outs, grads)
    seen, _, _ = _walk(roots)
    allow_unused = materialize_grads if allow_unused is None else allow_unused
    graph = tuple(roots)
    metas: list = []
    for i, t in enumerate(_as_list(inputs)):
        e = edge_of(t)
        if e is None:
            raise RuntimeError("One of the differentiated Tensors does not require grad")
        if id(e) in seen or materialize_grads:
            metas.append(grad_meta(t, requires_grad=create_graph))
        elif allow_unused:
            metas.append(None)
        else:
            raise RuntimeError(f"The differentiated Tensor at index {i} appears to not have been used in "
                               f"the graph. Set allow_unused=True if this is the desired behavior.")
    worker, op_id = queue(func, args, kwargs)
    results, k = [], 0
    for meta in metas:
        if meta is None:
            results.append(None)
            continue
        r = wrap_new(meta, worker, m.ClientRef(op_id, k))
        k += 1
        if create_graph:
            r._grad_node = Node("GradBackward", graph)
        results.append(r)
    return tuple(results)


# --- the attributes torch answers locally --------------------------------------------------------

@implements(_T.requires_grad.__get__)
def _requires_grad(func: Any, args: tuple, kwargs: dict) -> bool:
    t = args[0]
    if t._view_base is not None:
        refresh(t)
    return t._rg


@implements(_T.is_leaf.__get__)
def _is_leaf(func: Any, args: tuple, kwargs: dict) -> bool:
    t = args[0]
    return edge_of(t) is None or t._grad_node is None


@implements(_T.grad_fn.__get__)
def _grad_fn(func: Any, args: tuple, kwargs: dict) -> Node | None:
    t = args[0]
    e = edge_of(t)
    return e if isinstance(e, Node) else None


@implements(_T.retains_grad.__get__)
def _retains_grad(func: Any, args: tuple, kwargs: dict) -> bool:
    node = _grad_fn(func, args, kwargs)
    return node is not None and node.retained is not None and node.retained() is args[0]


@implements(_T.retain_grad)
def _retain_grad(func: Any, args: tuple, kwargs: dict) -> None:
    from .dispatch import queue
    t = args[0]
    e = edge_of(t)
    if e is None:
        raise RuntimeError("can't retain_grad on Tensor that has requires_grad=False")
    if isinstance(e, Node) and e.retained is None:
        e.retained = weakref.ref(t)
        queue(func, args, kwargs)


def _set_requires_grad(t: RemoteTensor, value: bool, dtypes: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"requires_grad must be a bool, not {type(value).__name__}")
    if edge_of(t) is not None and t._grad_node is not None:
        if not value:
            raise RuntimeError(
                "you can only change requires_grad flags of leaf variables. If you want to use a "
                "computed variable in a subgraph that doesn't require differentiation use "
                "var_no_grad = var.detach().")
        return
    if value and not (t.dtype.is_floating_point or t.dtype.is_complex):
        raise RuntimeError(f"only Tensors of {dtypes} dtype can require gradients")
    t._rg = value


@implements(_T.requires_grad_)
def _requires_grad_(func: Any, args: tuple, kwargs: dict) -> RemoteTensor:
    from .dispatch import queue
    t, value = _bind_requires_grad_(*args, **kwargs)
    _set_requires_grad(t, value, "floating point")  # torch's own wording for each form
    queue(func, args, kwargs, returns_self=True)
    return t


def _bind_requires_grad_(self: Any, requires_grad: bool = True) -> tuple:
    return self, requires_grad


@implements(_T.requires_grad.__set__)
def _requires_grad_set(func: Any, args: tuple, kwargs: dict) -> None:
    from .dispatch import queue
    _set_requires_grad(args[0], args[1], "floating point and complex")
    queue(func, args, kwargs)


@implements(_T.grad.__get__)
def _grad_get(func: Any, args: tuple, kwargs: dict) -> RemoteTensor | None:
    t = args[0]
    g = t._grad_ptr
    if g is None and edge_of(t) is not None and t._grad_node is not None \
            and not _retains_grad(func, args, kwargs):
        warnings.warn(
            "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad "
            "attribute won't be populated during autograd.backward(). If you indeed want the .grad "
            "field to be populated for a non-leaf Tensor, use .retain_grad() on the non-leaf Tensor.",
            UserWarning, stacklevel=3)
    return g


@implements(_T.grad.__set__)
def _grad_set(func: Any, args: tuple, kwargs: dict) -> None:
    from .dispatch import queue
    t, g = args[0], args[1]
    if g is not None:
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"assigned grad expected to be a Tensor or None but got grad of type "
                            f"{type(g).__name__}")
        if not isinstance(g, RemoteTensor) or g._worker is not t._worker:
            raise RuntimeError(f"assigned grad has data located on a different device: {g.device} "
                               f"instead of {t.device}")
        if g.dtype != t.dtype:
            raise RuntimeError("assigned grad has data of a different type")
        if g.shape != t.shape:
            raise RuntimeError("assigned grad has data of a different size")
    t._grad_ptr = g
    if g is None:  # zero_grad() does this for every parameter: one message for them all
        t._worker._set_grad_none_later(t)
    else:
        queue(func, args, kwargs)


