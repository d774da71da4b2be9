"""Sans-I/O sessions: the state of each end of a connection, with no sockets and no threads.

Calling rules, client side: `hello()` first and send its bytes; feed the worker's first message to
`receive_welcome()`. Then any number of `put`/`call`/`request`/`release` calls queue commands, and
`data_to_send()` returns the next frame (all queued commands as one batch, releases included) or an
empty list. Every message from the worker goes to `receive_data()`, which returns `Reply`,
`Failure` and `Ack` items. `release()` may be called from any thread, a garbage collector included; the other
methods need the caller's lock. The worker side is the mirror image (`ServerProtocol`).

Two of these wired back to back (see tests/wire/test_protocol.py) exercise the whole protocol without I/O.
"""
from __future__ import annotations

import collections
import itertools
from typing import Any, Callable

import torch

from . import messages as m
from . import codec
from .errors import ProtocolError, from_info, to_info
from .websocket import Placed

Chunks = list  # list[bytes | memoryview]: the parts of one websocket message, in order


def _queued_count(release: tuple[int, m.ClientRef]) -> int:
    return release[0]


class ClientProtocol:
    def __init__(self, client_name: str = "client", token: str | None = None) -> None:
        self.client_name = client_name
        self._token = token
        self._ids = itertools.count(1)
        self._outbox: list = []
        self.pending_bytes = 0  # tensor bytes queued in the outbox
        self._queued = 0        # commands queued since the start, sent or not
        # (commands queued when the pointer died, ref): a release goes right after those commands
        self._releases: collections.deque[tuple[int, m.ClientRef]] = collections.deque()
        self.welcome: m.Welcome | None = None
        self._incoming: dict[int, codec.Assembly] = {}
        self.placement = ChunkPlacement(self._incoming.get)  # large replies, straight into place
        # called as on_chunk(req_id, received, total) while a large reply arrives
        self.on_chunk: Callable[[int, int, int], None] | None = None

    # --- handshake ---
    def hello(self, resume: str | None = None, received: int = 0) -> Chunks:
        """The first message; with `resume`, it takes up that session (`received`: how many of the
        worker's frames arrived before the connection dropped)."""
        return codec.encode([m.Hello(m.PROTOCOL_VERSION, self.client_name, self._token, resume, received)])

    def receive_welcome(self, data: bytes) -> m.Welcome:
        items = codec.decode(data)
        if len(items) == 1 and isinstance(items[0], m.Welcome):
            self.welcome = items[0]
            return self.welcome
        if len(items) == 1 and isinstance(items[0], m.Failure):
            raise from_info(items[0].error, "worker")
        raise ProtocolError("the worker did not answer the handshake with Welcome")

    # --- commands ---
    def next_id(self) -> int:
        return next(self._ids)

    def put(self, tensor: torch.Tensor, requires_grad: bool = False, device: str = "") -> m.ClientRef:
        op_id = self.next_id()
        self._queue(m.Put(op_id, tensor, requires_grad, device), tensor.numel() * tensor.element_size())
        return m.ClientRef(op_id, 0)

    def put_begin(self, header: m.ChunkedTensor, requires_grad: bool = False, device: str = "") -> m.ClientRef:
        """Announce a large tensor; send its bytes with `chunk(ref.op_id, ...)`, one per frame."""
        op_id = self.next_id()
        self._queue(m.PutBegin(op_id, header, requires_grad, device))
        return m.ClientRef(op_id, 0)

    def chunk(self, op_id: int, offset: int, data: torch.Tensor) -> None:
        self._queue(m.Chunk(op_id, offset, data), data.numel())

    def call(self, op: str, args: tuple, kwargs: dict, *, reply: bool, grad_enabled: bool,
             autocast: torch.dtype | None = None, nbytes: int = 0, out_bytes: int = 0) -> int:
        """Queue op `op` (with `nbytes` of local tensors; `out_bytes`, what its new outputs take);
        returns its id. Output k is `ClientRef(id, k)`."""
        op_id = self.next_id()
        self._queue(m.Call(op_id, op, args, kwargs, reply, grad_enabled, autocast, out_bytes), nbytes)
        return op_id

    def run(self, code: bytes, args: tuple, kwargs: dict, *, grad_enabled: bool,
            autocast: torch.dtype | None = None, nbytes: int = 0) -> int:
        """Queue a client function to run on the worker; answered like a synchronous call."""
        op_id = self.next_id()
        self._queue(m.Run(op_id, code, args, kwargs, grad_enabled, autocast), nbytes + len(code))
        return op_id

    def checkpoint_region(self, region: int) -> None:
        """The ops queued from now on run in activation-checkpointing region `region` (0: none)."""
        self._queue(m.CheckpointRegion(region))

    @property
    def token(self) -> str | None:
        return self._token

    def request(self, kind: type, *fields: Any) -> int:
        """Queue a request that wants a reply (`Fetch`, `Search`, `ListObjects`, `ManualSeed`, `Sync`,
        `Expect`, `Push`, `Handover`)."""
        req_id = self.next_id()
        self._queue(kind(req_id, *fields))
        return req_id

    def _queue(self, item: Any, nbytes: int = 0) -> None:
        """Every command enters the outbox here, with the tensor bytes it carries."""
        self._outbox.append(item)
        self._queued += 1
        self.pending_bytes += nbytes

    def release(self, ref: m.ClientRef) -> None:
        # deque.append and an int read are atomic: safe from __del__ in any thread, lock or not
        self._releases.append((self._queued, ref))

    @property
    def pending_releases(self) -> int:
        return len(self._releases)

    @property
    def pending_commands(self) -> int:
        return len(self._outbox)

    def data_to_send(self) -> Chunks:
        """The next frame: `encode(take())`, or an empty list when nothing is queued."""
        items = self.take()
        return self.encode(items) if items else []

    def take(self) -> list:
        """The items of the next frame, taken off the queue: the queued commands, each release
        placed after the commands that were queued before its pointer died (a later command cannot
        name a dead pointer; an earlier may). Linear in commands plus releases."""
        releases = []
        while self._releases:
            releases.append(self._releases.popleft())
        releases.sort(key=_queued_count)  # already in order but for a race between threads
        commands, self._outbox = self._outbox, []
        self.pending_bytes = 0
        first = self._queued - len(commands)  # the count before this frame's first command
        items: list = []
        r, n = 0, len(releases)
        for position, command in enumerate(commands):
            if r < n and releases[r][0] - first <= position:
                due = []
                while r < n and releases[r][0] - first <= position:
                    due.append(releases[r][1])
                    r += 1
                items.append(m.Release(tuple(due)))
            items.append(command)
        if r < n:
            items.append(m.Release(tuple(ref for _, ref in releases[r:])))
        return items

    @staticmethod
    def encode(items: list) -> Chunks:
        """The frame for taken items (needs no lock: it touches no session state)."""
        return codec.encode(items)

    def receive_data(self, data: bytes | Placed) -> list:
        """The replies and failures in a message; a chunked tensor is returned once complete."""
        events = []
        for item in decode(data):
            if isinstance(item, m.Reply) and isinstance(item.value, m.ChunkedTensor):
                self._incoming[item.req_id] = codec.Assembly(item.value)
            elif isinstance(item, m.Chunk):
                assembly = self._incoming.get(item.id)
                if assembly is None:
                    raise ProtocolError("a chunk for a reply that was not announced")
                done = assembly.add(item)
                if self.on_chunk is not None:
                    self.on_chunk(item.id, assembly.received, assembly.header.nbytes)
                if done:
                    del self._incoming[item.id]
                    events.append(m.Reply(item.id, assembly.tensor()))
            elif isinstance(item, (m.Reply, m.Failure, m.Ack)):
                events.append(item)
            else:
                raise ProtocolError(f"unexpected {type(item).__name__} from the worker")
        return events


class ChunkPlacement:
    """Where a chunk of a large tensor goes (`websocket.Placement`): straight into the buffer of
    its assembly, when `assembly_of(id)` has one and it is the next chunk. Either side uses it."""
    head_length = staticmethod(codec.head_length)

    def __init__(self, assembly_of: Callable[[int], codec.Assembly | None]) -> None:
        self._assembly_of = assembly_of

    def destination(self, head: bytes, remaining: int) -> tuple[torch.Tensor, m.Chunk] | None:
        chunk = codec.chunk_in(head, remaining)
        assembly = self._assembly_of(chunk.id) if chunk is not None else None
        slot = assembly.slot(chunk.offset, remaining) if assembly is not None else None
        return None if slot is None else (slot, m.Chunk(chunk.id, chunk.offset, slot))


def decode(data: bytes | Placed) -> list:
    """A message's items; a placed one is the chunk whose bytes are already where they belong."""
    return [data.message] if isinstance(data, Placed) else codec.decode(data)


class ServerProtocol:
    """The worker's end: validates the handshake, decodes command batches, encodes replies."""

    _COMMANDS = (m.Put, m.Call, m.Fetch, m.Release, m.Search, m.ListObjects, m.ManualSeed, m.Sync,
                 m.PutBegin, m.Chunk, m.Run, m.Expect, m.Push, m.Handover, m.Ack, m.RequestRelease,
                 m.ReleaseStatus, m.ListReleases, m.Decide, m.MemoryReport, m.SaveCheckpoint, m.LoadCheckpoint,
                 m.CheckpointRegion, m.FetchMock)

    def receive_hello(self, data: bytes) -> m.Hello:
        items = codec.decode(data)
        if len(items) != 1 or not isinstance(items[0], m.Hello):
            raise ProtocolError("a connection must start with Hello")
        hello = items[0]
        if hello.version != m.PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {hello.version} is not supported "
                                f"(this worker speaks {m.PROTOCOL_VERSION})")
        return hello

    @staticmethod
    def welcome(worker_id: str, client_id: str, max_message_bytes: int, resume_token: str = "",
                resume_grace_s: float = 0.0, received: int = 0, device: str = "cpu") -> Chunks:
        return codec.encode([m.Welcome(m.PROTOCOL_VERSION, worker_id, client_id, max_message_bytes,
                                      resume_token, float(resume_grace_s), received, device)])

    @staticmethod
    def refuse(exc: BaseException) -> Chunks:
        return codec.encode([m.Failure(None, None, to_info(exc))])

    def receive_data(self, data: bytes | Placed) -> list:
        items = decode(data)
        for item in items:
            if not isinstance(item, self._COMMANDS):
                raise ProtocolError(f"unexpected {type(item).__name__} from a client")
        return items

    @staticmethod
    def send(items: list) -> list[Chunks]:
        """The frames for a batch of replies: one for the small ones, one per `Chunk` after them."""
        small = [i for i in items if not isinstance(i, m.Chunk)]
        frames = [codec.encode(small)] if small else []
        frames.extend(codec.encode([i]) for i in items if isinstance(i, m.Chunk))
        return frames

