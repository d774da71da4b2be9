"""A captured forward as plain data: what `tr.compile` sends, and how a worker rebuilds it (and the
names of the worker's own ops that `tr.compile` uses, for models and for optimizers).

A graph is a list of nodes, each an ATen op named as the op vocabulary names it ("aten.addmm.default")
with its arguments: numbers, strings, dtypes and other torch enums, lists of them, and references
to earlier values (`{"v": i}`: the i-th value, placeholders first) or to constant tensors that
travel with the graph (`{"c": i}`). The device the client traced on (meta) is written as `HERE`,
the worker's own device. Nothing is code: `to_graph_module` resolves every op through the worker's
allow-list before it builds anything, and refuses the whole graph otherwise.
"""
from __future__ import annotations

import hashlib
import operator
import threading
from typing import Any

import torch
import torch.fx

from .errors import WorkerPermissionError
from .ops import resolve

BUILD_GRAPH = "torchremote.build_graph"  # the worker's ops: check and build a graph, and run it
RUN_GRAPH = "torchremote.run_graph"
OPTIMIZER_NEW = "torchremote.optimizer_new"  # tr.compile(optimizer): torch's optimizer made on the worker
OPTIMIZER_STEP = "torchremote.optimizer_step"
OPTIMIZER_STATE = "torchremote.optimizer_state"
OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")
GETITEM = "getitem"  # a multi-output op's i-th result: the one structural node
HERE = {"device": "here"}
_NAMESPACES = ("aten.", "prims.")
# Held while a client traces a forward and while a worker runs a compiled graph: with the worker in
# the client's process, torch's FX tracing flag is process-wide, and a compiled function run while
# another thread traces refuses to run ("FX to symbolically trace a dynamo-optimized function").
TRACING = threading.Lock()
_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


# what a client may ask torch.compile for: nothing that names code or files
OPTIONS = ("backend", "mode", "fullgraph", "dynamic")
BACKENDS = ("inductor", "aot_eager", "eager")
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def checked_options(options: dict) -> dict:
    """`torch.compile` keyword arguments a client may choose, in full; anything else is refused."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise WorkerPermissionError(f"tr.compile options {sorted(unknown)} are not accepted (backend, "
                                    f"mode, fullgraph and dynamic are)")
    backend = options.get("backend", "inductor")
    if backend not in BACKENDS:
        raise WorkerPermissionError(f"tr.compile backend {backend!r} is not one of {BACKENDS}")
    if options.get("mode") not in _MODES:
        raise WorkerPermissionError(f"tr.compile mode {options.get('mode')!r} is not one of {_MODES[1:]}")
    if options.get("dynamic") not in (None, True, False):
        raise WorkerPermissionError("tr.compile dynamic= takes True, False or None")
    return {"backend": backend, "mode": options.get("mode"), "fullgraph": bool(options.get("fullgraph", False)),
            "dynamic": options.get("dynamic", False)}


class NotCapturable(Exception):
    """The traced graph holds something that cannot travel as data (the caller falls back to eager)."""


def from_graph_module(gm: torch.fx.GraphModule) -> tuple[dict, list[torch.Tensor]]:
    """`gm` (traced on meta by make_fx) as graph data, and the constant tensors it needs."""
    index: dict[torch.fx.Node, int] = {}
    constants: list[torch.Tensor] = []
    nodes: list[list] = []
    placeholders = 0
    output: Any = None

    def value(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return {"v": index[a]}
        if isinstance(a, (list, tuple)):
            return [value(x) for x in a]
        if isinstance(a, torch.device):
            if a.type != "meta":
                raise NotCapturable(f"the forward names the device {a} (only its inputs' device can be compiled)")
            return HERE
        if a is None or isinstance(a, (bool, int, float, str)) or isinstance(a, _ENUMS):
            return a
        raise NotCapturable(f"an argument of type {type(a).__name__} cannot travel in a graph")

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            index[node] = len(index)
            placeholders += 1
        elif node.op == "get_attr":
            t = getattr(gm, node.target)
            if not isinstance(t, torch.Tensor):
                raise NotCapturable(f"the graph holds a {type(t).__name__} constant")
            index[node] = len(index)
            if t.device.type == "meta":  # made on the inputs' device in the forward: only empty ones are known
                if t.numel():
                    raise NotCapturable("the forward makes a tensor with data the trace cannot see "
                                        "(a constant on the inputs' device)")
                nodes.append(["aten.empty_strided.default", [list(t.shape), list(t.stride())],
                              {"dtype": t.dtype, "device": HERE}])
                continue
            nodes.append(["constant", [{"c": len(constants)}], {}])
            constants.append(t.detach())
        elif node.op == "call_function":
            if node.target is operator.getitem:
                name = GETITEM
            elif isinstance(node.target, torch._ops.OpOverload):
                name = f"{node.target.namespace}.{node.target._opname}.{node.target._overloadname}"
            else:
                raise NotCapturable(f"the graph calls {node.target!r}, which is not an ATen op")
            index[node] = len(index)
            nodes.append([name, value(node.args), {k: value(v) for k, v in node.kwargs.items()}])
        elif node.op == "output":
            output = value(node.args[0])
        else:
            raise NotCapturable(f"a graph node of kind {node.op!r}")
    return {"placeholders": placeholders, "nodes": nodes, "output": output}, constants


def content_key(data: dict, constants: list[torch.Tensor], options: dict) -> str:
    """A hash of everything that makes the compiled code: the graph, its constants, the options."""
    h = hashlib.sha256(repr((data, sorted(options.items()))).encode())
    for t in constants:
        h.update(repr((t.dtype, tuple(t.shape))).encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_graph_module(data: dict, constants: list[torch.Tensor], device: torch.device) -> torch.fx.GraphModule:
    """Rebuild a graph on `device`; every op is checked against the allow-list first."""
    nodes = data["nodes"]
    targets = []
    for name, _, _ in nodes:
        if name in (GETITEM, "constant"):
            targets.append(name)
            continue
        if not name.startswith(_NAMESPACES):
            raise WorkerPermissionError(f"graph node {name!r} is not an ATen op; this worker builds "
                                        f"graphs of ATen ops only")
        func = resolve(name)
        if not isinstance(func, torch._ops.OpOverload):
            raise WorkerPermissionError(f"graph node {name!r} is not an ATen op")
        targets.append(func)
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    values: list[torch.fx.Node] = [graph.placeholder(f"input_{i}") for i in range(data["placeholders"])]

    def build(a: Any) -> Any:
        if isinstance(a, dict):
            if "v" in a:
                return values[a["v"]]
            if a == HERE:
                return device
            raise WorkerPermissionError(f"a graph argument {a!r} this worker does not know")
        if isinstance(a, list):
            return [build(x) for x in a]
        return a

    for (name, args, kwargs), target in zip(nodes, targets):
        if target == "constant":
            i = args[0]["c"]
            attr = f"constant_{i}"
            root.register_buffer(attr, constants[i].to(device))
            values.append(graph.get_attr(attr))
        elif target == GETITEM:
            values.append(graph.call_function(operator.getitem, (build(args[0]), args[1])))
        else:
            values.append(graph.call_function(target, tuple(build(args)), {k: build(v) for k, v in kwargs.items()}))
    graph.output(build(data["output"]))
    return torch.fx.GraphModule(root, graph)
