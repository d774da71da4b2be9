"""Graphs that clients captured with `tr.compile`, compiled once per content and shared by every
client of this worker: a second client sending the same graph (the same model, the same inputs'
metadata, the same options) runs the code compiled for the first."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import torch

from ..wire.errors import WorkerPermissionError
from ..wire.graphs import BUILD_GRAPH, RUN_GRAPH, TRACING, checked_options, content_key, to_graph_module


class CompiledGraphs:
    """The worker's compiled graphs, by content hash."""

    def __init__(self, device: torch.device | str, log: logging.Logger | None = None) -> None:
        self.device = torch.device(device)
        self.log = log or logging.getLogger("torchremote.worker")
        self._lock = threading.Lock()
        self._graphs: dict[str, Callable] = {}
        self._failed: dict[str, Exception] = {}
        self._ran: set[str] = set()  # graphs compiled by a first run
        self.builds = 0  # graphs built here (a reused one is not counted again)

    def ops(self) -> dict[str, Callable]:
        return {BUILD_GRAPH: self.build, RUN_GRAPH: self.run}

    def build(self, key: str, data: dict, constants: list, options: dict) -> None:
        """Check and build a graph (compiled at its first run); nothing to do if it is known. Why a
        build failed is kept, for the runs that follow it to raise."""
        with self._lock:
            if key in self._graphs:
                return None
        started = time.perf_counter()
        try:
            options = checked_options(options)
            if content_key(data, constants, options) != key:
                raise WorkerPermissionError("a graph's key does not match its content")
            gm = to_graph_module(data, constants, self.device)  # every node against the allow-list first
        except Exception as e:
            self._failed[key] = e
            raise
        fn = gm if options["backend"] == "eager" else torch.compile(
            gm, **{k: v for k, v in options.items() if v is not None})
        with self._lock:
            self._graphs.setdefault(key, fn)
            self._failed.pop(key, None)
            self.builds += 1
        self.log.info("built graph %s (%d nodes, %s) in %.2f s", key[:12], len(data["nodes"]),
                      options["backend"], time.perf_counter() - started)
        return None

    def run(self, key: str, *tensors: torch.Tensor) -> Any:
        """Run a built graph. Its first run compiles it, backward included (not at the first
        backward, as torch would): the client waits for that run, so that no compilation overlaps
        its own torch code (torch's compiling flag is process-wide, and a worker may share the
        client's process)."""
        fn = self._graphs.get(key)
        if fn is None:
            failed = self._failed.get(key)
            if failed is not None:
                raise type(failed)(f"the graph was refused: {failed}")
            raise LookupError(f"graph {key[:12]} was not built on this worker")
        with TRACING:
            if key in self._ran:
                return fn(*tensors)
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                result = fn(*tensors)
            self._ran.add(key)
            return result
