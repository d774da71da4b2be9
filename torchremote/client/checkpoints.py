"""`torch.save` and `torch.load` of RemoteTensors, as of CUDA tensors: a checkpoint holds each
tensor's bytes with its device (`remote:i`), and loading puts it back on the worker that has that
device now, on another with `map_location=worker.device`, or here with `map_location="cpu"`.

Saving fetches the data (the release rules apply: private-derived data raises `ApprovalRequired`).
The fetched copy's storage is tagged with the pointer's device through torch's own registry of
storage locations (`torch.serialization.register_package`); on load, the deserializer for `remote`
locations remembers which storages belong on which worker, and the pointer's rebuild function,
allowed for `weights_only=True` loads, sends them there.
"""
from __future__ import annotations

import re
import weakref
from typing import Any

import torch
import torch.nn as nn

from ..wire import messages as m
from .device import BACKEND, worker_of
from .registry import implements
from .tensor import RemoteTensor, send

_saved: dict[int, str] = {}  # data_ptr of a fetched copy being saved -> its device
_loaded: dict[int, tuple[weakref.ref, str]] = {}  # data_ptr of a loaded storage -> (storage, device)


@implements(torch.Tensor.__reduce_ex__)
def _reduce(func: Any, args: tuple, kwargs: dict) -> tuple:
    x = args[0]
    local = x.get()
    if local.untyped_storage().data_ptr():
        ptr = local.untyped_storage().data_ptr()
        _saved[ptr] = str(x.device)
        weakref.finalize(local, _saved.pop, ptr, None)
    return rebuild, (local, x.requires_grad, isinstance(x, nn.Parameter))


def rebuild(local: torch.Tensor, requires_grad: bool, is_param: bool) -> torch.Tensor:
    """A tensor from a checkpoint: on the worker its storage was restored for, or here."""
    entry = _loaded.get(local.untyped_storage().data_ptr()) if local.untyped_storage().data_ptr() else None
    if entry is not None and entry[0]() is not None:
        tensor = send(local, worker_of(entry[1]))
    else:
        tensor = local
    if is_param:
        return nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


def _tag(storage: Any) -> str | None:
    return _saved.get(storage.data_ptr()) if storage.device.type == "cpu" and storage.data_ptr() else None


def _restore(storage: Any, location: str) -> Any:
    if not re.fullmatch(f"{BACKEND}(:[0-9]+)?", location):
        return None
    try:
        if worker_of(location).closed:
            raise RuntimeError("closed")
    except RuntimeError:
        raise RuntimeError(
            f"Attempting to deserialize object on {location}, but no connected torchremote worker has "
            f"that device. Connect to one first, or use torch.load with map_location=worker.device to "
            f"put the tensors on another worker, or map_location=torch.device('cpu') to map your "
            f"storages to the CPU.") from None
    if storage.data_ptr():
        _loaded[storage.data_ptr()] = (weakref.ref(storage), location)
        weakref.finalize(storage, _loaded.pop, storage.data_ptr(), None)
    return storage  # stays here until `rebuild` sends the tensors made from it


torch.serialization.register_package(9, _tag, _restore)  # before the CPU's own tag (10)
torch.serialization.add_safe_globals([rebuild])


# --- checkpoints that stay on the worker's disk (worker/checkpoints.py) ---------------------------

def save_on_worker(obj: Any, name: str) -> str:
    """Save a state dict of RemoteTensors (or a module's `state_dict()`, or one tensor) as the
    safetensors file `name` in its worker's checkpoint directory, without moving the bytes; returns
    the file's name. The worker must allow it (`--checkpoint-dir`). Private-derived data may be
    saved (it stays on the worker) and loads back as private-derived."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    elif isinstance(obj, torch.Tensor):
        obj = {"tensor": obj}
    if not isinstance(obj, dict) or not obj:
        raise TypeError("save_on_worker takes a state dict (name -> RemoteTensor), a module or a RemoteTensor")
    workers = {id(t._worker): t._worker for t in obj.values() if isinstance(t, RemoteTensor)}
    if len(workers) != 1 or not all(isinstance(t, RemoteTensor) for t in obj.values()):
        raise ValueError("save_on_worker saves RemoteTensors of one worker: move the others there first "
                         "(or torch.save what lives here)")
    (worker,) = workers.values()
    return worker._request(m.SaveCheckpoint, name, tuple(str(k) for k in obj), tuple(t._ref for t in obj.values()))


def load_on_worker(worker: Any, name: str) -> dict[str, RemoteTensor]:
    """The tensors of the worker's checkpoint `name`, as pointers (nothing crosses the wire):
    `model.load_state_dict(tr.load_on_worker(w, "step-100"))`."""
    req_id, (keys, metas) = worker._ask(lambda: worker._protocol.request(m.LoadCheckpoint, name), "load")
    return {key: RemoteTensor._wrap(meta, worker, m.ClientRef(req_id, k)) for k, (key, meta) in
            enumerate(zip(keys, metas))}
