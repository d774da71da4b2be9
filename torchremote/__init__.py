"""torchremote: compute on tensors that live on another machine, with the torch code you have.

    server = torchremote.start_worker(id="bob")          # or: torchremote worker --id bob
    bob = torchremote.connect(server.url)
    x = torch.tensor([1., 2, 3]).send(bob)               # a RemoteTensor: a pointer, no data
    (x * 2).sum().item()                                 # runs on bob -> 12.0

Where code runs: `client/` in the user's process, `worker/` in the worker's, `wire/` on both sides.
"""
from . import client as _client  # noqa: F401  (registers the `remote` device and the dispatcher)
from .client.checkpoints import load_on_worker, save_on_worker
from .client.collectives import Group, all_gather, all_reduce_, broadcast_, group
from .client.compile import CompiledModel, compile
from .client.data_parallel import average_gradients, replicate
from .client.handle import Worker, connect
from .client.module import get, on, send
from .client.remote_code import remote
from .client.tensor import RemoteTensor
from .launch import start_worker
from .wire.errors import (ApprovalRequired, ProtocolError, RemoteError, TorchRemoteError, WorkerConnectionError,
                          WorkerPermissionError)
from .wire.messages import ObjectInfo
from .worker.server import WorkerServer

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "ray":  # fleets on Ray: imported when asked for (Ray is an optional extra)
        import importlib

        return importlib.import_module(".fleet", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "RemoteTensor", "Worker", "WorkerServer", "ObjectInfo", "connect", "start_worker", "send", "get", "on", "remote",
    "save_on_worker", "load_on_worker", "compile", "CompiledModel",
    "Group", "group", "all_reduce_", "broadcast_", "all_gather", "replicate", "average_gradients",
    "TorchRemoteError", "WorkerConnectionError", "WorkerPermissionError", "ProtocolError",
    "RemoteError", "ApprovalRequired",
]
