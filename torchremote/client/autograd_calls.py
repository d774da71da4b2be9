"""The autograd calls a RemoteTensor answers on the client, from the bookkeeping in `autograd.py`.

`backward()` and `torch.autograd.grad` are queued for the worker with one more op that names every
new gradient; `requires_grad`, `is_leaf`, `grad_fn`, `.grad` and `retain_grad()` are answered from
the client's graph of pointers, with no round trip.
"""
from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..wire import messages as m
from ..wire.ops import GRADS_OF
from . import autograd, bridges
from .dispatch import queue, remote_call, wrap_new
from .identity import raw
from .registry import implements
from .tensor import RemoteTensor

_T = torch.Tensor


@implements(_T.backward)
def _tensor_backward(func: Any, args: tuple, kwargs: dict) -> None:
    return _run_backward(func, args, kwargs, *_bind_tensor_backward(*args, **kwargs))


def _bind_tensor_backward(self: Any, gradient: Any = None, retain_graph: Any = None,
                          create_graph: bool = False, inputs: Any = None) -> tuple:
    return [self], [gradient], autograd.as_list(inputs), create_graph, retain_graph


@implements(torch.autograd.backward)
def _autograd_backward(func: Any, args: tuple, kwargs: dict) -> None:
    return _run_backward(func, args, kwargs, *_bind_autograd_backward(*args, **kwargs))


def _bind_autograd_backward(tensors: Any, grad_tensors: Any = None, retain_graph: Any = None,
                            create_graph: bool = False, grad_variables: Any = None,
                            inputs: Any = None) -> tuple:
    tensors = autograd.as_list(tensors)
    grads = autograd.as_list(grad_tensors if grad_tensors is not None else grad_variables) or [None] * len(tensors)
    return tensors, grads, autograd.as_list(inputs), create_graph, retain_graph


def _run_backward(func: Any, args: tuple, kwargs: dict, tensors: list, grads: list, inputs: list,
                  create_graph: bool, retain_graph: Any) -> None:
    """Queue the backward, then one op that names every `.grad` it makes: pointers to all the new
    gradients, with no message per parameter."""
    if len(grads) != len(tensors):
        raise RuntimeError(f"got {len(grads)} gradients for {len(tensors)} tensors")
    receiving = autograd.receivers(tensors, grads, inputs)
    hooked = _hooked(receiving)
    new = autograd.new_grads(receiving, create_graph)
    worker, _ = queue(func, args, kwargs)
    if new:
        _name_new_grads(worker, new, tensors, grads, create_graph)
    if hooked:
        _run_hooks(hooked, create_graph)
    bridges.deliver(receiving, retain_graph=bool(retain_graph) or create_graph)


def _name_new_grads(worker: Any, new: list, tensors: list, grads: list, create_graph: bool) -> None:
    op_id = worker._call(GRADS_OF, tuple(t._ref for t, _ in new), {})
    history = (tuple(e for e in (autograd.edge_of(t) for t in tensors) if e is not None)
               + tuple(e for e in (autograd.edge_of(g) for g in grads if isinstance(g, RemoteTensor)) if e is not None))
    for k, (t, meta) in enumerate(new):
        g = wrap_new(meta, worker, m.ClientRef(op_id, k))
        if create_graph:  # a gradient with a graph of its own: its history reaches the backward's
            g._grad_node = autograd.Node("AccumulateGradBackward", history)
        t._grad_ptr = g


# --- tensor hooks: kept where torch keeps them, run on the client once the worker's backward is done

def _hooked(receiving: list) -> list:
    """The leaves receiving a gradient that have hooks. The gradient a backward hook is given is the
    incoming one alone, so a leaf's `.grad` so far is set aside (its object kept, to accumulate into)."""
    hooked = []
    for t, retained in receiving:
        if retained:
            continue
        hooks, post = raw(_T._backward_hooks, t), raw(_T._post_accumulate_grad_hooks, t)
        if hooks or post:
            before = t._grad_ptr if hooks else None
            if before is not None:
                _grad_set(_T.grad.__set__, (t, None), {})
            hooked.append((t, hooks, post, before))
    return hooked


def _run_hooks(hooked: list, create_graph: bool) -> None:
    """What torch's AccumulateGrad does with hooks: each backward hook may replace the incoming
    gradient; the result is accumulated into `.grad`; then the post-accumulate hooks see the tensor.
    They run here after the worker's whole backward, not during it: for leaves the values are the
    same, since nothing downstream of a leaf's gradient is computed from it."""
    with torch.set_grad_enabled(create_graph):
        for t, hooks, post, before in hooked:
            if hooks:
                incoming = t._grad_ptr
                grad = _through_hooks(t, incoming, create_graph)
                if before is not None:
                    grad = before + grad if create_graph else before.add_(grad)
                if grad is not incoming:
                    _grad_set(_T.grad.__set__, (t, grad), {})
            for hook in tuple(post.values()) if post else ():
                hook(t)


def _add_hook(attr: Any, t: RemoteTensor, hook: Any) -> RemovableHandle:
    hooks = raw(attr, t)
    if hooks is None:
        hooks = OrderedDict()
        with torch._C.DisableTorchFunctionSubclass():
            attr.__set__(t, hooks)
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    return handle


@implements(_T.register_hook)
def _register_hook(func: Any, args: tuple, kwargs: dict) -> RemovableHandle:
    t, hook = _bind_hook(*args, **kwargs)
    if autograd.edge_of(t) is None:
        raise RuntimeError("cannot register a hook on a tensor that doesn't require gradient")
    if not _is_leaf(func, (t,), {}):
        raise NotImplementedError(
            "a hook on a RemoteTensor that is not a leaf would have to run in the middle of the "
            "worker's backward pass, which torchremote does not interrupt; hook a leaf (a parameter or "
            "an input that requires grad), or take this gradient with torch.autograd.grad")
    return _add_hook(_T._backward_hooks, t, hook)


@implements(_T.register_post_accumulate_grad_hook)
def _register_post_accumulate_grad_hook(func: Any, args: tuple, kwargs: dict) -> RemovableHandle:
    t, hook = _bind_hook(*args, **kwargs)
    if autograd.edge_of(t) is None:
        raise RuntimeError("cannot register a hook on a tensor that doesn't require gradient")
    if not _is_leaf(func, (t,), {}):
        raise RuntimeError("post accumulate grad hooks cannot be registered on non-leaf tensors")
    return _add_hook(_T._post_accumulate_grad_hooks, t, hook)


def _bind_hook(self: Any, hook: Any) -> tuple:
    return self, hook


@implements(_T._backward_hooks.__get__, _T._backward_hooks.__set__,
            _T._post_accumulate_grad_hooks.__get__, _T._post_accumulate_grad_hooks.__set__)
def _hook_dict(func: Any, args: tuple, kwargs: dict) -> Any:
    """Kept on the Python object, as for any tensor; the client reads them at backward."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


@implements(torch.autograd.grad)
def _autograd_grad(func: Any, args: tuple, kwargs: dict) -> Any:
    return _grad(func, args, kwargs, *args, **kwargs)


def _grad(func: Any, args: tuple, kwargs: dict, outputs: Any, inputs: Any, grad_outputs: Any = None,
          retain_graph: Any = None, create_graph: bool = False, only_inputs: bool = True,
          allow_unused: bool | None = None, is_grads_batched: bool = False,
          materialize_grads: bool = False) -> Any:
    if is_grads_batched or not all(isinstance(t, RemoteTensor) for t in autograd.as_list(inputs)):
        return remote_call(func, args, kwargs, sync=True)  # rare forms: the worker answers exactly
    outs = autograd.as_list(outputs)
    grads = autograd.as_list(grad_outputs) or [None] * len(outs)
    if not all(isinstance(o, RemoteTensor) for o in outs) and not create_graph:  # x.to("cpu") in between
        allow = materialize_grads if allow_unused is None else allow_unused
        return bridges.grad_through_local(outs, grads, autograd.as_list(inputs), retain_graph, allow)
    roots = autograd.check_roots(outs, grads)
    seen, _, _ = autograd.walk(roots)
    allow_unused = materialize_grads if allow_unused is None else allow_unused
    graph = tuple(roots)
    metas: list = []
    for i, t in enumerate(autograd.as_list(inputs)):
        e = autograd.edge_of(t)
        if e is None:
            raise RuntimeError("One of the differentiated Tensors does not require grad")
        if id(e) in seen or materialize_grads:
            metas.append(autograd.grad_meta(t, requires_grad=create_graph))
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
            r._grad_node = autograd.Node("GradBackward", graph)
        results.append(r)
    return tuple(_through_hooks(t, r, create_graph) for t, r in zip(autograd.as_list(inputs), results))


def _through_hooks(t: RemoteTensor, grad: Any, create_graph: bool) -> Any:
    """torch.autograd.grad passes an input's gradient through the input's tensor hooks."""
    hooks = raw(_T._backward_hooks, t) if grad is not None else None
    if hooks:
        with torch.set_grad_enabled(create_graph):
            for hook in tuple(hooks.values()):
                result = hook(grad)
                if result is not None:
                    grad = result
    return grad


# --- the attributes torch answers locally --------------------------------------------------------

@implements(_T.requires_grad.__get__)
def _requires_grad(func: Any, args: tuple, kwargs: dict) -> bool:
    t = args[0]
    if t._view_base is not None:
        autograd.refresh(t)
    return t._rg


@implements(_T.is_leaf.__get__)
def _is_leaf(func: Any, args: tuple, kwargs: dict) -> bool:
    t = args[0]
    return autograd.edge_of(t) is None or t._grad_node is None


@implements(_T.grad_fn.__get__)
def _grad_fn(func: Any, args: tuple, kwargs: dict) -> autograd.Node | None:
    t = args[0]
    e = autograd.edge_of(t)
    return e if isinstance(e, autograd.Node) else None


@implements(_T.retains_grad.__get__)
def _retains_grad(func: Any, args: tuple, kwargs: dict) -> bool:
    node = _grad_fn(func, args, kwargs)
    return node is not None and node.retained is not None and node.retained() is args[0]


@implements(_T.retain_grad)
def _retain_grad(func: Any, args: tuple, kwargs: dict) -> None:
    t = args[0]
    e = autograd.edge_of(t)
    if e is None:
        raise RuntimeError("can't retain_grad on Tensor that has requires_grad=False")
    if isinstance(e, autograd.Node) and e.retained is None:
        e.retained = weakref.ref(t)
        queue(func, args, kwargs)


def _set_requires_grad(t: RemoteTensor, value: bool, dtypes: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"requires_grad must be a bool, not {type(value).__name__}")
    if autograd.edge_of(t) is not None and t._grad_node is not None:
        if not value:
            raise RuntimeError(
                "you can only change requires_grad flags of leaf variables. If you want to use a "
                "computed variable in a subgraph that doesn't require differentiation use "
                "var_no_grad = var.detach().")
        return
    if value and not (t.dtype.is_floating_point or t.dtype.is_complex):
        raise RuntimeError(f"only Tensors of {dtypes} dtype can require gradients")
    if value and type(t._ref) is m.PublishedRef:
        _own_leaf(t)
    t._rg = value


def _own_leaf(t: RemoteTensor) -> None:
    """A published pointer that is to require grad becomes a leaf of this client's own: an alias of
    the owner's memory on the worker (no copy), whose flag and `.grad` no other client shares."""
    _, op_id = queue(_T.detach, (t,), {})
    t._ref, t._lease = m.ClientRef(op_id, 0), None


@implements(_T.requires_grad_)
def _requires_grad_(func: Any, args: tuple, kwargs: dict) -> RemoteTensor:
    t, value = _bind_requires_grad_(*args, **kwargs)
    _set_requires_grad(t, value, "floating point")  # torch's own wording for each form
    queue(func, args, kwargs, returns_self=True)
    return t


def _bind_requires_grad_(self: Any, requires_grad: bool = True) -> tuple:
    return self, requires_grad


@implements(_T.requires_grad.__set__)
def _requires_grad_set(func: Any, args: tuple, kwargs: dict) -> None:
    _set_requires_grad(args[0], args[1], "floating point and complex")
    queue(func, args, kwargs)


@implements(_T.grad.__get__)
def _grad_get(func: Any, args: tuple, kwargs: dict) -> RemoteTensor | None:
    t = args[0]
    g = t._grad_ptr
    if g is None and autograd.edge_of(t) is not None and t._grad_node is not None \
            and not _retains_grad(func, args, kwargs):
        warnings.warn(
            "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad "
            "attribute won't be populated during autograd.backward(). If you indeed want the .grad "
            "field to be populated for a non-leaf Tensor, use .retain_grad() on the non-leaf Tensor.",
            UserWarning, stacklevel=3)
    return g


@implements(_T.grad.__set__)
def _grad_set(func: Any, args: tuple, kwargs: dict) -> None:
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




@implements(torch._VF._make_dual, torch._VF._unpack_dual)
def _forward_ad_here(func: Any, args: tuple, kwargs: dict) -> Any:
    """Forward-mode AD is kept on the client, as reverse mode's graph of pointers is: torch's C++
    attaches the tangent pointer to the primal pointer, and each op's tangent formula is made of
    ops that run on the worker."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)
