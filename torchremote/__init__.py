"""torchremote: compute on tensors that live on another machine, with the torch code you have.

    server = torchremote.start_worker(id="bob")          # or: torchremote worker --id bob
    bob = torchremote.connect(server.url)
    x = torch.tensor([1., 2, 3]).send(bob)               # a RemoteTensor: a pointer, no data
    (x * 2).sum().item()                                 # runs on bob -> 12.0
"""
from . import device as _device  # noqa: F401  (registers the `remote` device first)
from .client import Worker, connect
from .errors import (ApprovalRequired, ProtocolError, RemoteError, TorchRemoteError, WorkerConnectionError,
                     WorkerPermissionError)
from .messages import ObjectInfo
from .server import WorkerServer, start_worker
from .module import get, on, send
from .remote_code import remote
from . import optim as _optim  # noqa: F401  (optimizers take their foreach path on RemoteTensors)
from .tensor import RemoteTensor

__version__ = "0.1.0"

__all__ = [
    "RemoteTensor", "Worker", "WorkerServer", "ObjectInfo", "connect", "start_worker", "send", "get", "on", "remote",
    "TorchRemoteError", "WorkerConnectionError", "WorkerPermissionError", "ProtocolError",
    "RemoteError", "ApprovalRequired",
]
