"""The worker's objects: data its owner published (with tags) and each client's own namespace.

A client can name only its own objects and published ones; ids of other clients' objects mean
nothing in its namespace. Published data belongs to the owner: no client frees it.
"""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ..wire import messages as m
from ..wire.messages import object_id


@dataclass(frozen=True)
class Published:
    tensor: torch.Tensor
    tags: tuple[str, ...]
    description: str
    allow_get: bool
    writable: bool = False   # clients may update it in place (a shared model); read-only otherwise
    mock: torch.Tensor | None = None  # a stand-in anyone may fetch: same shape and dtype, made-up values


def storage_key(t: torch.Tensor) -> int:
    """Identifies the memory behind a tensor: views of one tensor share it."""
    return t.untyped_storage().data_ptr()


class ObjectStore:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._lock = threading.Lock()
        self._published: dict[int, Published] = {}
        self._namespaces: dict[str, dict[m.ClientRef, torch.Tensor]] = {}
        self._next_pub = 1
        self.published_storages: set[int] = set()  # owned by the owner: never counted to a client
        self.published_bytes = 0  # the memory behind them, each storage once
        # behind data published read-only (the default): storage -> the name a refusal gives
        self.read_only_storages: dict[int, str] = {}
        # behind data published with allow_get=False (private): storage -> the name lineage shows
        self.no_get_storages: dict[int, str] = {}
        self._tickets: dict[str, tuple] = {}  # move tickets -> (client, slot, how to hold it)

    # --- published data ---
    def publish(self, tensor: torch.Tensor, tags: tuple[str, ...], description: str,
                allow_get: bool, writable: bool = False, mock: torch.Tensor | None = None) -> m.PublishedRef:
        with self._lock:
            pub_id, self._next_pub = self._next_pub, self._next_pub + 1
            self._published[pub_id] = Published(tensor, tags, description, allow_get, writable, mock)
            if tensor.numel():
                key, name = storage_key(tensor), tags[0] if tags else f"p{pub_id}"
                if key not in self.published_storages:
                    self.published_storages.add(key)
                    self.published_bytes += tensor.untyped_storage().nbytes()
                if not allow_get:
                    self.no_get_storages[key] = name
                if not writable:
                    self.read_only_storages[key] = name
        return m.PublishedRef(pub_id)

    def holds_storage(self, tensor: torch.Tensor) -> bool:
        """Whether published data already holds the memory behind `tensor`."""
        return not tensor.numel() or storage_key(tensor) in self.published_storages

    def published(self, ref: m.PublishedRef) -> Published:
        try:
            return self._published[ref.pub_id]
        except KeyError:
            raise LookupError(f"no published object {object_id(ref)} on this worker") from None

    def search(self, tags: tuple[str, ...]) -> list[m.PublishedInfo]:
        wanted = set(tags)
        with self._lock:
            hits = [(i, p) for i, p in self._published.items() if wanted <= set(p.tags)]
        return [m.PublishedInfo(m.PublishedRef(i), m.TensorMeta.of(p.tensor), p.tags, p.description, p.writable,
                                p.mock is not None) for i, p in hits]

    def published_rows(self) -> list[tuple[str, Published]]:
        """Every published object with its id, oldest first: what the owner's console lists."""
        with self._lock:
            return [(object_id(m.PublishedRef(i)), p) for i, p in self._published.items()]

    # --- client namespaces ---
    def open_namespace(self, client_id: str) -> dict[m.ClientRef, torch.Tensor]:
        with self._lock:
            return self._namespaces.setdefault(client_id, {})

    def close_namespace(self, client_id: str) -> int:
        """Forget everything a client created; returns how many objects were freed."""
        with self._lock:
            namespace = self._namespaces.pop(client_id, {})
        count = len(namespace)
        namespace.clear()
        return count

    # --- moves between workers ---
    def issue_ticket(self, client_id: str, slot: m.ClientRef,
                     hold: Callable[[m.ClientRef, torch.Tensor], None]) -> str:
        """A one-time ticket: what is handed over with it becomes `client_id`'s object `slot`,
        held (and counted against its memory) by `hold`."""
        ticket = secrets.token_urlsafe(24)
        with self._lock:
            self._tickets[ticket] = (client_id, slot, hold)
        return ticket

    def hand_over(self, ticket: str, tensor: torch.Tensor) -> None:
        with self._lock:
            entry = self._tickets.pop(ticket, None)
            live = entry is not None and entry[0] in self._namespaces
        if not live:
            raise LookupError("unknown or used move ticket (or its client has disconnected)")
        entry[2](entry[1], tensor)

    # --- the registry ---
    def rows(self, client_id: str | None = None) -> list[m.ObjectInfo]:
        """What `client_id` may see (published data and its own objects); everything if None."""
        with self._lock:
            published = list(self._published.items())
            namespaces = [(c, list(ns.items())) for c, ns in self._namespaces.items()
                          if client_id is None or c == client_id]
        rows = [_row(object_id(m.PublishedRef(i)), self.owner, p.tensor, p.tags, p.description)
                for i, p in published]
        for owner, items in namespaces:
            rows.extend(_row(object_id(ref), owner, t) for ref, t in items)
        return rows


def _row(oid: str, owner: str, t: torch.Tensor, tags: tuple[str, ...] = (), description: str = "") -> m.ObjectInfo:
    return m.ObjectInfo(oid, owner, tuple(t.shape), t.dtype, t.numel() * t.element_size(), tags, description)
