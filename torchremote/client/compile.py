"""`tr.compile(model)`: a model's forward captured once per input signature, sent as a graph, compiled
on the worker, and run there as one op.

The capture needs no data and no round trip: the model is copied onto the meta device (its pointers'
stand-ins), and `make_fx` traces the forward with its parameters and buffers as inputs, giving a
graph of ATen ops. That graph travels as plain data (`wire/graphs.py`); the worker checks every
node against its allow-list, builds it over the parameters it already holds and compiles it with
`torch.compile` (inductor by default), keyed by content. Each later call with the same signature
is one `run_graph` op: its inputs by reference, its outputs' metadata known from the trace. For
autograd the call is one node whose inputs are the arguments and the parameters; the worker's
compiled backward (AOTAutograd) runs inside the usual `backward()`.

Where capture fails (data-dependent control flow, an argument that cannot travel), the call runs
eagerly, op by op, and one warning names the reason.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..wire import messages as m
from ..wire.graphs import (BUILD_GRAPH, OPTIONS, RUN_GRAPH, TRACING, NotCapturable, checked_options, content_key,
                           from_graph_module)
from . import autograd
from .dispatch import to_wire, worker_of
from .optimizer_on_worker import compile_optimizer
from .session import Session, autocast_dtype
from .tensor import RemoteTensor

_TENSOR = object()  # in an output's leaves: a tensor's place


def compile(model: nn.Module | torch.optim.Optimizer, **compile_kwargs: Any) -> Any:  # noqa: A001 (as torch.compile)
    """`model` with its forward compiled on the worker that holds its parameters (see module doc).
    `compile_kwargs` go to the worker's `torch.compile`: backend ("inductor", "aot_eager" or
    "eager"), mode, fullgraph, dynamic. Given a torch optimizer instead, its `step()` becomes
    one op on that worker (`optimizer_on_worker.py`)."""
    if isinstance(model, torch.optim.Optimizer):
        if compile_kwargs:
            raise TypeError("tr.compile(optimizer) takes no options")
        return compile_optimizer(model)
    unknown = set(compile_kwargs) - set(OPTIONS)
    if unknown:
        raise TypeError(f"tr.compile() got unexpected options {sorted(unknown)}; it takes {OPTIONS}")
    return CompiledModel(model, checked_options(compile_kwargs))


class _Capture:
    """One input signature's graph: what to send, and what its outputs are."""

    __slots__ = ("key", "data", "constants", "options", "outs", "spec", "reaches", "built_on", "new_bytes")

    def __init__(self, key: str, data: dict, constants: list, options: dict, outs: list, spec: Any,
                 reaches: tuple[int, ...]) -> None:
        self.key, self.data, self.constants, self.options = key, data, constants, options
        self.outs = outs  # per output leaf: (TensorMeta, requires_grad) or ("value", the value)
        self.spec = spec
        self.reaches = reaches  # the flat inputs the outputs' gradients reach
        self.built_on: set[int] = set()  # id() of the sessions that were sent the graph
        self.new_bytes = sum(math.prod(o[0].shape) * o[0].dtype.itemsize for o in outs if o[0] != "value")


class CompiledModel(nn.Module):
    """What `tr.compile` returns: call it as the model. `module` is the model itself (its parameters,
    `train()`/`eval()`, `state_dict()` under the `module.` prefix, as DistributedDataParallel does)."""

    def __init__(self, model: nn.Module, options: dict) -> None:
        super().__init__()
        self.module = model
        self._options = dict(options)
        self._captures: dict[Any, _Capture | str] = {}  # signature -> its capture, or why it failed
        self._warned: set = set()  # the signatures whose eager fallback was warned of
        self.captures = 0  # graphs captured (a new signature captures again)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = [*self.module.parameters(), *self.module.buffers()]  # once per call: each walk costs
        worker = _worker_of(tensors, args, kwargs)
        if worker is None:  # nothing on a worker: the model as it is
            return self.module(*args, **kwargs)
        signature = _signature(self.module, tensors, args, kwargs)
        capture = self._captures.get(signature) if signature is not None else "an argument is not hashable"
        if capture is None:
            capture = self._captures[signature] = self._capture(args, kwargs)
        if isinstance(capture, str):
            if signature not in self._warned:
                self._warned.add(signature)
                warnings.warn(f"tr.compile: {capture}; this call runs eagerly, op by op", stacklevel=2)
            return self.module(*args, **kwargs)
        return self._run(worker, capture, tensors, args, kwargs)

    # --- capture ---
    def _capture(self, args: tuple, kwargs: dict) -> _Capture | str:
        if autocast_dtype() is not None:
            return "capture under torch.autocast is not supported yet"
        params = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        memo: dict[int, Any] = {}
        for t in [*params.values(), *buffers.values()]:
            if not isinstance(t, RemoteTensor):
                return "a parameter or buffer of the model is not on the worker"
            meta = _fresh_meta(t)
            memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
        try:
            meta_model = copy.deepcopy(self.module, memo)
        except Exception as e:
            return f"the model could not be copied onto the meta device ({type(e).__name__}: {e})"
        flat_args, args_spec = tree_flatten((args, kwargs))
        positions = [i for i, a in enumerate(flat_args) if isinstance(a, torch.Tensor)]
        names = [*params, *buffers]
        box: dict[str, Any] = {}

        def forward(state: list, inputs: list) -> list:
            leaves = list(flat_args)
            for i, t in zip(positions, inputs):
                leaves[i] = t
            call_args, call_kwargs = tree_unflatten(leaves, args_spec)
            out = torch.func.functional_call(meta_model, dict(zip(names, state)), tuple(call_args), call_kwargs)
            out_leaves, box["spec"] = tree_flatten(out)
            box["values"] = [_TENSOR if isinstance(o, torch.Tensor) else o for o in out_leaves]
            return [o for o in out_leaves if isinstance(o, torch.Tensor)]

        state = [memo[id(t)] for t in [*params.values(), *buffers.values()]]
        inputs = [_meta_of(flat_args[i]) for i in positions]
        if any(i is None for i in inputs):
            return "an argument is a tensor on neither the worker nor the CPU"
        try:
            with TRACING:
                gm = make_fx(forward, pre_dispatch=True)(state, inputs)
            data, constants = from_graph_module(gm)
        except NotCapturable as e:
            return str(e)
        except Exception as e:  # data-dependent control flow, an op with no meta kernel, ...
            return f"the forward could not be captured ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        options = self._options
        key = content_key(data, constants, options)
        outs, reaches = _outputs(gm, state, inputs, box)
        self.captures += 1
        return _Capture(key, data, constants, options, outs, box["spec"], reaches)

    # --- run ---
    def _run(self, worker: Session, capture: _Capture, tensors: list, args: tuple, kwargs: dict) -> Any:
        flat_args = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        flat = [*tensors, *flat_args]
        worker_of(flat, worker)  # one worker, or torch's mixed-device error naming both
        refs, nbytes = to_wire(flat)  # pointers by reference, local inputs as a snapshot
        first = id(worker) not in capture.built_on
        if first:
            worker._call(BUILD_GRAPH, (capture.key, capture.data, capture.constants, capture.options), {},
                         sum(t.numel() * t.element_size() for t in capture.constants))
            capture.built_on.add(id(worker))
        op_id = worker._call(RUN_GRAPH, (capture.key, *refs), {}, nbytes, capture.new_bytes)
        if first:  # the first run compiles: wait for it (see worker/graphs.py); a refusal raises here
            worker.sync()
        grad = torch.is_grad_enabled()
        edges = autograd.edges(flat, capture.reaches) if grad else ()
        results, k = [], 0
        for out in capture.outs:
            if out[0] == "value":
                results.append(out[1])
                continue
            meta, requires_grad = out
            r = RemoteTensor._wrap(meta, worker, m.ClientRef(op_id, k))
            k += 1
            if requires_grad and grad and edges:
                autograd.record_node(r, "CompiledFunctionBackward", edges)
            results.append(r)
        return tree_unflatten(results, capture.spec)


def _fresh_meta(t: torch.Tensor) -> torch.Tensor:
    """A new meta tensor shaped like `t` (a pointer's own stand-in must never be traced into)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _meta_of(t: torch.Tensor) -> torch.Tensor | None:
    if not isinstance(t, RemoteTensor) and t.device.type != "cpu":
        return None
    meta = _fresh_meta(t)
    return meta.requires_grad_(t.requires_grad) if t.requires_grad else meta


def _outputs(gm: torch.fx.GraphModule, state: list, inputs: list, box: dict) -> tuple[list, tuple[int, ...]]:
    """Each output's metadata and whether it requires grad, and which flat inputs its gradients
    reach: the graph run once more on fresh meta tensors, under autograd."""
    def fresh(ts: list) -> list:
        return [_fresh_meta(t).requires_grad_(t.requires_grad) for t in ts]

    state, inputs = fresh(state), fresh(inputs)
    flat = [*state, *inputs]
    with torch.set_grad_enabled(torch.is_grad_enabled()):
        outs = gm(state, inputs)
    wanted = [i for i, t in enumerate(flat) if t.requires_grad]
    differentiable = [o for o in outs if o.requires_grad]
    reaches: tuple[int, ...] = ()
    if wanted and differentiable:
        grads = torch.autograd.grad(differentiable, [flat[i] for i in wanted],
                                    [torch.empty_like(o) for o in differentiable], allow_unused=True)
        reaches = tuple(i for i, g in zip(wanted, grads) if g is not None)
    described, it = [], iter(outs)
    for value in box["values"]:
        if value is _TENSOR:
            o = next(it)
            described.append((m.TensorMeta.of(o.detach()), o.requires_grad))
        else:
            described.append(("value", value))
    return described, reaches


def _worker_of(tensors: list, args: tuple, kwargs: dict) -> Session | None:
    for t in [*tensors, *tree_flatten((args, kwargs))[0]]:
        if isinstance(t, RemoteTensor):
            return t._worker
    return None


def _signature(model: nn.Module, tensors: list, args: tuple, kwargs: dict) -> Any:
    """What a capture depends on: the inputs' metadata (shapes, strides, dtypes, requires_grad), the
    other arguments' values, the parameters' and buffers' metadata, each module's training mode,
    grad mode and autocast. Read from the pointers' own metadata: no torch call per parameter."""
    flat, spec = tree_flatten((args, kwargs))
    parts: list[Any] = [spec, torch.is_grad_enabled(), autocast_dtype()]
    for a in flat:
        if type(a) is RemoteTensor:
            parts.append((a._tmeta, a._rg))
        elif isinstance(a, torch.Tensor):
            parts.append((tuple(a.shape), a.stride(), a.dtype, a.requires_grad, "local"))
        else:
            parts.append((type(a), a))
    for t in tensors:  # the parameters, then the buffers
        parts.append((t._tmeta, t._rg) if type(t) is RemoteTensor else (t.shape, t.dtype, t.requires_grad))
    parts.append(tuple(m.training for m in model.modules()))
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key
