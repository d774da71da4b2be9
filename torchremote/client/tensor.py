"""`RemoteTensor`: a torch.Tensor that holds no data, only a pointer to a tensor on a worker.

It is a wrapper subclass on the `remote:i` device with a meta-device stand-in beside it: metadata
(shape, dtype, strides, requires_grad) is real and answered locally, and anything that slipped past
interception would fail loudly on meta rather than read garbage. Every torch call on it goes to the
dispatcher that `dispatch.py` installs (`use_dispatcher`): this layer sits below it. When the last
local reference dies, the worker is told to free the object.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..wire import codec
from ..wire import messages as m
from ..wire.messages import object_id
from . import inference
from .session import ReleaseHandle, Session


def _no_dispatcher(func: Callable, args: tuple, kwargs: dict) -> Any:
    raise RuntimeError("torchremote.client.dispatch is not imported: import torchremote")


_dispatch: Callable[[Callable, tuple, dict], Any] = _no_dispatcher
_PROXY = torch._C._TorchDispatchModeKey.PROXY  # make_fx is tracing


def use_dispatcher(dispatch: Callable[[Callable, tuple, dict], Any]) -> None:
    """Every torch call on a RemoteTensor goes to `dispatch(func, args, kwargs)` from now on."""
    global _dispatch
    _dispatch = dispatch


class _Lease:
    """Shared ownership of one worker object by several pointers (made by `__tensor_unflatten__`):
    the worker frees it when the last of them is gone."""

    __slots__ = ("worker", "ref")

    def __init__(self, worker: "Session", ref: m.Ref) -> None:
        self.worker, self.ref = worker, ref

    def __del__(self) -> None:
        if type(self.ref) is m.ClientRef:
            self.worker._release(self.ref)


class RemoteTensor(torch.Tensor):
    # _tmeta/_key: metadata and its cache key; _meta: the meta stand-in, made when first needed.
    # _rg, _grad_node, _grad_ptr, _view_base, _fam_version: autograd bookkeeping (see autograd.py).
    # No __slots__: torch.utils.swap_tensors, with which a Parameter keeps its object when its data
    # moves (`identity.py`), needs the same slots on both sides, and Parameter has none.
    _meta: torch.Tensor | None
    _tmeta: m.TensorMeta
    _worker: "Session"
    _ref: m.Ref
    _published: m.PublishedInfo | None
    _lease: _Lease | None = None  # set once the worker object is shared with another pointer

    def __new__(cls, *args: Any, **kwargs: Any) -> "RemoteTensor":
        raise TypeError("RemoteTensors come from tensor.send(worker), worker.search(tag) or ops on them")

    @classmethod
    def _wrap(cls, tmeta: m.TensorMeta, worker: "Session", ref: m.Ref, key: "inference.MetaKey | None" = None,
              meta: torch.Tensor | None = None, published: m.PublishedInfo | None = None) -> "RemoteTensor":
        """A pointer with this metadata. `key` and `meta` are passed when already known (a cached
        plan shares one key among all its results); requires_grad starts as `tmeta` says."""
        r = torch.Tensor._make_wrapper_subclass(
            cls, tmeta.shape, strides=tmeta.stride, storage_offset=tmeta.storage_offset,
            dtype=tmeta.dtype, device=worker.device, requires_grad=False)
        r.__dict__ = {  # one dict, not eleven attribute stores: this runs for every op's result
            "_tmeta": tmeta, "_key": key, "_meta": meta, "_worker": worker, "_ref": ref, "_published": published,
            "_rg": tmeta.requires_grad, "_grad_node": None, "_grad_ptr": None, "_view_base": None, "_fam_version": 0}
        return r

    def _stand_in(self) -> torch.Tensor:
        """The meta-device tensor that stands in for this one (never requiring grad)."""
        meta = self._meta
        if meta is None:
            tmeta, base = self._tmeta, self._view_base
            if base is not None and base.dtype == tmeta.dtype:
                # a view shares its base's storage, as on the worker (forward AD compares sizes)
                meta = base._stand_in().as_strided(tmeta.shape, tmeta.stride, tmeta.storage_offset)
            else:
                meta = tmeta.empty_meta(requires_grad=False)
            self._meta = meta
        return meta

    def _meta_key(self) -> "inference.MetaKey":
        key = self._key
        if key is None:
            key = self._key = inference.tensor_key(self._stand_in())
        return key

    def _metadata_changed(self) -> None:
        """An in-place op may have changed the stand-in's shape or strides: take them from it."""
        self._tmeta, self._key = m.TensorMeta.of(self._stand_in()), None

    # --- pointer API ---
    @property
    def worker(self) -> "Session":
        """The worker that holds this tensor's data."""
        return self._worker

    @property
    def id(self) -> str:
        """The object's id on its worker, as `worker.objects()` lists it."""
        return object_id(self._ref)

    def get(self, timeout: float | None = None) -> torch.Tensor:
        """A local copy of the data. The pointer stays valid; the worker keeps its object.

        Data derived from a worker's private data leaves only with its owner's approval:
        `tr.ApprovalRequired` names the request filed. With `timeout`, wait that many seconds for
        the owner's decision: the value once approved; `PermissionError` if denied or still pending."""
        if timeout is None:
            return self._worker._fetch(self._ref)
        return self._worker._fetch_when_approved(self._ref, timeout)

    def mock(self) -> torch.Tensor:
        """The mock the owner published beside this data: a local tensor of the same shape and
        dtype with made-up values, free to fetch (the real values may be private)."""
        if self._published is None:
            raise LookupError("mock(): only a pointer to published data (from worker.search) has a mock; "
                              "this one was computed or sent")
        if not self._published.has_mock:
            name = self._published.tags[0] if self._published.tags else m.object_id(self._ref)
            raise LookupError(f"the owner of {name!r} published no mock beside it")
        return self._worker._request(m.FetchMock, self._ref)

    def request(self, reason: str = "") -> "ReleaseHandle":
        """Ask the worker's owner to release this tensor's value (or say why, for a request filed
        already); returns a handle with `.id` and `.status`."""
        return ReleaseHandle(self._worker, self._worker._request(m.RequestRelease, self._ref, reason))

    def send(self, worker: "Session") -> "RemoteTensor":
        """Already on `worker`: itself. On another worker: `move` it there."""
        return self if worker is self._worker else self.move(worker)

    def move(self, worker: "Session") -> "RemoteTensor":
        """A copy of this tensor on `worker`, sent from worker to worker: the data does not pass
        through this process. The source worker authenticates with `worker`'s token."""
        if worker is self._worker:
            return self
        slot, ticket = worker._ask(lambda: worker._protocol.request(m.Expect), "move")
        # sent after every op queued for the source, so the data it pushes is up to date
        self._worker._request(m.Push, self._ref, worker.url, worker._protocol.token, ticket)
        meta = codec.meta_after_transfer(self._stand_in())  # a leaf, as the source sends it
        return RemoteTensor._wrap(meta, worker, m.ClientRef(slot, 0))

    def copy(self) -> "RemoteTensor":
        """A copy on the same worker (`clone()`): changing one leaves the other alone."""
        return self.clone()

    def numpy(self, *, force: bool = False) -> Any:
        """Fetches the data (like `get()`) and returns it as a NumPy array."""
        return self.get().numpy(force=force)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        meta = self._tmeta
        parts = [f"id={self.id}", f"worker={self._worker.id!r}", f"shape={tuple(meta.shape)}",
                 f"dtype={meta.dtype}"]
        if self._rg:
            parts.append("requires_grad=True")
        if self._published is not None and self._published.tags:
            parts.append(f"tags={list(self._published.tags)}")
        return f"RemoteTensor({', '.join(parts)})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        if spec and not self._tmeta.shape:
            return format(self.item(), spec)  # what torch does for 0-dim tensors: fetches one value
        return format(repr(self), spec)

    def __del__(self) -> None:
        ref = getattr(self, "_ref", None)
        if type(ref) is m.ClientRef and self._lease is None:
            self._worker._release(ref)

    # --- torch's protocol for wrapper subclasses (`is_traceable_wrapper_subclass`) ---
    # With it, nn.Module.to() swaps a RemoteTensor into the Parameter it converts (the same object,
    # hooks and optimizer state kept) instead of making a new one; so do parametrizations.
    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        """No inner tensors: the data is on the worker. The context is what rebuilds the pointer."""
        lease = self._lease
        if lease is None:
            lease = self._lease = _Lease(self._worker, self._ref)
        return [], (self._tmeta, lease, self._published)

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx: tuple, outer_size: Any, outer_stride: Any) -> "RemoteTensor":
        """Another pointer to the same worker object, sharing its lease."""
        tmeta, lease, published = ctx
        if outer_size is not None and (tuple(outer_size) != tuple(tmeta.shape)
                                       or tuple(outer_stride) != tuple(tmeta.stride)):
            raise ValueError(f"a RemoteTensor of shape {tuple(tmeta.shape)} cannot be rebuilt with "
                             f"shape {tuple(outer_size)} and strides {tuple(outer_stride)}")
        r = RemoteTensor._wrap(tmeta, lease.worker, lease.ref, published=published)
        r._lease = lease
        return r

    # --- interception ---
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if _made_by_factories:
            _adopt_requires_grad()
        return _dispatch(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if torch._C._get_dispatch_mode(_PROXY) is not None:
            raise NotImplementedError(
                f"{func}: make_fx cannot trace RemoteTensors as they are (torch.func.linearize and "
                f"other tracing transforms record this client's bookkeeping, not the worker's "
                f"ops); use torch.func.jvp, or trace a function of local tensors")
        result = _dispatch(func, args, kwargs or {})
        # reached from torch's C++ (a factory's kernels, for one), which may set requires_grad next
        return made_by_factory(result) if type(result) is RemoteTensor else result


# `torch.randn(..., device=remote, requires_grad=True)`: torch sets requires_grad in C++ on what
# the factory made, after its kernels ran (through the fallback and __torch_dispatch__) and past
# interception. What those return waits here until the next torch call on a RemoteTensor from
# Python, which takes the flag into the bookkeeping (and to the worker).
_made_by_factories: list[RemoteTensor] = []


def made_by_factory(t: RemoteTensor) -> RemoteTensor:
    _made_by_factories.append(t)
    return t


def _adopt_requires_grad() -> None:
    while _made_by_factories:
        t = _made_by_factories.pop()
        with torch._C.DisableTorchFunctionSubclass():
            flagged = torch.Tensor.requires_grad.__get__(t) and torch.Tensor.grad_fn.__get__(t) is None
            if flagged:  # a leaf, as factories make: the wrapper's own flag goes, ours takes over
                t.requires_grad_(False)
        if flagged and not t._rg:
            t.requires_grad_(True)


def send(tensor: torch.Tensor, worker: "Session", device: str | torch.device | None = None) -> RemoteTensor:
    """Copy a local tensor to `worker`; returns the pointer. Also available as `tensor.send(worker)`.

    `device` picks where the worker keeps it ("cuda", "cuda:1"); by default, the worker's --device.
    """
    if isinstance(tensor, RemoteTensor):
        return tensor.send(worker)
    check_sendable(tensor)
    return put(worker, [tensor], device)[0]


def put(worker: "Session", tensors: list[torch.Tensor], device: str | torch.device | None = None) -> list[RemoteTensor]:
    """Pointers to local tensors sent to `worker` together, in as few frames as fit."""
    return [RemoteTensor._wrap(meta, worker, ref) for meta, ref in worker._put_many(tensors, device_name(device))]


def check_sendable(tensor: Any) -> None:
    """A local tensor `send` can carry; checked before it is queued with others: a bad one fails alone."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"send() takes a torch.Tensor, not {type(tensor).__qualname__}")
    if tensor.layout != torch.strided:
        raise NotImplementedError(f"send() of a {tensor.layout} tensor: torchremote supports strided "
                                  f"tensors only (send tensor.to_dense())")
    codec.check_sendable(tensor)


def device_name(device: str | torch.device | None) -> str:
    return str(torch.device(device)) if device is not None else ""


def get(tensor: torch.Tensor) -> torch.Tensor:
    """The local data of a RemoteTensor (a plain tensor is returned as is)."""
    return tensor.get() if isinstance(tensor, RemoteTensor) else tensor


torch.Tensor.send = send  # an added method; torch's own functions stay untouched
