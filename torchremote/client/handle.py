"""`Worker`: the user's handle on a worker - a `Session` plus what needs pointers (search, run).

It sits above dispatch, so the session below it can stay free of `RemoteTensor`.
"""
from __future__ import annotations

import ssl as ssl_module
from typing import Any

from ..wire import messages as m
from .dispatch import run_remote
from .session import Session
from .tensor import RemoteTensor


class Worker(Session):
    """A connection to a torchremote worker. Create with `torchremote.connect(url)`."""

    def search(self, *tags: str, mock: bool = False) -> list[RemoteTensor] | list[torch.Tensor]:
        """Pointers to the data the worker's owner published with all of these tags. `mock=True`:
        instead, local copies of the mocks the owner published beside them (made-up values of the
        same shape and dtype), to develop code on before running it on the pointers."""
        hits = self._request(m.Search, tuple(tags))
        pointers = [RemoteTensor._wrap(h.meta, self, h.ref, published=h) for h in hits]
        return [p.mock() for p in pointers] if mock else pointers

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` on the worker, whole, in one round trip.

        RemoteTensors in the arguments arrive as the worker's tensors; tensors it returns come back
        as RemoteTensors, other values as they are. `fn` travels with cloudpickle, so the worker
        must have been started with --allow-code.
        """
        return run_remote(self, fn, args, kwargs)


def connect(url: str, token: str | None = None, *, name: str | None = None, timeout: float = 10.0,
            retry_for: float = 0.0, ssl: ssl_module.SSLContext | None = None,
            max_message_bytes: int = m.DEFAULT_MAX_MESSAGE_BYTES) -> Worker:
    """Connect to the worker at `url` (ws:// or wss://host:port).

    `token` defaults to $TORCHREMOTE_TOKEN. `retry_for` keeps trying (with back-off) for that many
    seconds while the worker is not up yet. `ssl` passes a context for wss:// (for example one that
    trusts a self-signed certificate); certificates are verified by default.
    """
    return Worker(url, token=token, name=name, timeout=timeout, retry_for=retry_for, ssl=ssl,
                  max_message_bytes=max_message_bytes)
