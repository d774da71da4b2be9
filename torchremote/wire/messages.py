"""The messages client and worker exchange: a small tagged union, plus protocol constants.

A websocket message is one *batch*: a list of the items below (see `codec.py` for the bytes).
Client -> worker: `Hello` first, then batches of `Put`, `Call`, `Fetch`, `Release`, `Search`,
`ListObjects`, `ManualSeed`, `Sync`. Worker -> client: `Welcome`, then batches of `Reply` and
`Failure`. Either side may put an `Ack` first in a batch: how many of the other side's frames it
has taken (see `resume.py`: frames are kept for replay after a dropped connection until acknowledged). Ids are allocated by the client (as in TensorFlow's remote eager service), so a result can
be named - and used in the next op - before the worker has produced it: output `k` of the op with id
`n` is `ClientRef(n, k)`. Requests that want an answer carry a `req_id`; everything else is
fire-and-forget, and a failure of such an op is reported as a `Failure` with `req_id=None`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PROTOCOL_VERSION = 7
MAGIC = b"TRM2"                      # first bytes of every frame (and the wire version)
DEFAULT_MAX_MESSAGE_BYTES = 2**32   # websocket max_size, both directions
HANDSHAKE_TIMEOUT_S = 10.0
SHUTDOWN_REASON = "worker shut down"  # the reason of the normal close (1000) a stopping worker sends
CHUNK_BYTES = 4 << 20               # tensors larger than this travel as a header, then chunks
REMOTE_DEVICE_TYPE = "remote"        # torch's PrivateUse1 backend, renamed: pointers live on remote:i


# --- value types that travel inside messages -----------------------------------------------------

# The hot types (made for every op) are plain slotted dataclasses: a frozen one's __init__ costs
# three times as much. They are never mutated all the same.
@dataclass(slots=True, eq=False)
class ClientRef:
    """Output `index` of the client's op `op_id`: an object in that client's namespace."""
    op_id: int
    index: int = 0

    # written out: a worker looks up several per op, and the generated ones cost twice as much
    def __hash__(self) -> int:
        return self.op_id << 6 ^ self.index

    def __eq__(self, other: object) -> bool:
        return (other.__class__ is ClientRef and self.op_id == other.op_id  # type: ignore[attr-defined]
                and self.index == other.index)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class PublishedRef:
    """An object the worker's owner published; readable by every client, freed by none."""
    pub_id: int


Ref = ClientRef | PublishedRef


def object_id(ref: Ref) -> str:
    """The display id of a reference: '7' (op 7), '7.1' (its second output), 'p3' (published)."""
    if isinstance(ref, PublishedRef):
        return f"p{ref.pub_id}"
    return str(ref.op_id) if ref.index == 0 else f"{ref.op_id}.{ref.index}"


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What a client needs to stand in for a remote tensor without its data."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    dtype: torch.dtype
    requires_grad: bool

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorMeta":
        return cls(tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, t.requires_grad)

    def empty_meta(self, requires_grad: bool | None = None) -> torch.Tensor:
        if self.storage_offset:  # a storage that holds the offset too, as the worker's does
            extent = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if all(self.shape) else 0
            t = torch.empty(self.storage_offset + extent, dtype=self.dtype, device="meta")
            t = t.as_strided(self.shape, self.stride, self.storage_offset)
        else:
            t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")
        if requires_grad is None:
            requires_grad = self.requires_grad
        return t.requires_grad_(True) if requires_grad else t


@dataclass(frozen=True, slots=True)
class SameAs:
    """In a reply: this output is the very input object `ref` (an in-place op, `out=`)."""
    ref: Ref


@dataclass(frozen=True, slots=True)
class ChunkedTensor:
    """In a reply: a tensor too large for one message; `Chunk`s with this reply's id follow."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    perm: tuple[int, ...] | None   # memory order, as in wire.py; None when contiguous
    nbytes: int


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception as data: type name, message, the op that raised it, the remote traceback."""
    type: str
    message: str
    op: str | None = None
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class PublishedInfo:
    """A search hit: a pointer to published data and what the owner said about it."""
    ref: PublishedRef
    meta: TensorMeta
    tags: tuple[str, ...]
    description: str
    writable: bool = False   # clients may change it in place; read-only otherwise
    has_mock: bool = False   # the owner published a stand-in anyone may fetch (`FetchMock`)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One row of a worker's registry."""
    id: str
    owner: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    tags: tuple[str, ...] = ()
    description: str = ""


class ObjectTable(list):
    """A list of `ObjectInfo` rows that prints as a table."""

    def __str__(self) -> str:
        header = ("id", "owner", "tags", "shape", "dtype", "bytes", "description")
        lines = [header] + [
            (r.id, r.owner, " ".join(r.tags), str(tuple(r.shape)), str(r.dtype).removeprefix("torch."),
             str(r.nbytes), r.description) for r in self]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)

    def __repr__(self) -> str:
        return str(self)


@dataclass(frozen=True, slots=True)
class ReleaseInfo:
    """A release request, as its client and the worker's owner see it."""
    id: int
    client: str
    object: str
    reason: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int
    lineage: str
    steps: int       # backward passes in its history
    status: str
    decided_by: str = ""
    note: str = ""
    failure: str = ""  # the owner's view only: the error an op on it met, kept from the client


# --- handshake -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    """`resume`: the secret of a session to take up again after a dropped connection, with how many
    of the worker's frames the client received in it (`received`)."""
    version: int
    client_name: str
    token: str | None = None
    resume: str | None = None
    received: int = 0


@dataclass(frozen=True, slots=True)
class Welcome:
    """`resume_token`: the secret that resumes this session within `resume_grace_s` of a dropped
    connection ("" when the worker keeps nothing). On a resume, `received` is how many of the
    client's frames the worker has run: the client sends the rest again. `device`: where the worker
    computes (`cpu`, `cuda:0`), whose autocast rules the client's metadata must follow."""
    version: int
    worker_id: str
    client_id: str
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # the largest frame this worker accepts
    resume_token: str = ""
    resume_grace_s: float = 0.0
    received: int = 0
    device: str = "cpu"


# --- client -> worker ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Put:
    """Store `tensor` (sent with this message) as `ClientRef(op_id, 0)`, on `device` if given."""
    op_id: int
    tensor: torch.Tensor
    requires_grad: bool = False
    device: str = ""


@dataclass(slots=True)
class Call:
    """Run op `op` on the worker; its tensor outputs become `ClientRef(op_id, k)` in flatten order.

    With `reply` the worker answers a `Reply(op_id, value)` whose tensors are `TensorMeta`/`SameAs`.
    `autocast`: the dtype of the client's `torch.autocast` region for the remote device, which the
    worker applies with its own device's rules; None outside one. `out_bytes`: the memory its new
    outputs take, as the client's plan says (the worker refuses it before running when there is no
    room, and checks the real outputs after).
    """
    op_id: int
    op: str
    args: tuple
    kwargs: dict
    reply: bool = False
    grad_enabled: bool = True
    autocast: torch.dtype | None = None
    out_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Fetch:
    """Send the data of `ref` back (only its elements, never the storage behind a view)."""
    req_id: int
    ref: Ref


@dataclass(frozen=True, slots=True)
class FetchMock:
    """Send the mock the owner published beside `ref`: same shape and dtype, made-up values."""
    req_id: int
    ref: PublishedRef


@dataclass(frozen=True, slots=True)
class Release:
    """The client holds no pointer to these any more."""
    refs: tuple[ClientRef, ...]


@dataclass(frozen=True, slots=True)
class Search:
    req_id: int
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ListObjects:
    req_id: int


@dataclass(frozen=True, slots=True)
class MemoryReport:
    """Ask how the worker's memory budget stands (answered with a `MemoryInfo`)."""
    req_id: int


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """The worker's memory: per pool (host memory, a GPU's) the bytes in use and the budget (0:
    none); per client, the bytes it holds (a client sees itself only, the owner every client)."""
    pools: tuple[str, ...]
    used: tuple[int, ...]
    limits: tuple[int, ...]
    clients: tuple[str, ...]
    held: tuple[int, ...]
    client_limit: int = 0
    peaks: tuple[int, ...] = ()  # per client, the most it has held at once

    def held_by(self, client: str) -> int:
        return dict(zip(self.clients, self.held)).get(client, 0)

    def peak_of(self, client: str) -> int:
        return dict(zip(self.clients, self.peaks)).get(client, 0)

    def __str__(self) -> str:
        def size(n: int) -> str:
            for unit, one in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
                if n >= one:
                    return f"{n / one:.1f} {unit}"
            return f"{n} B"
        lines = [f"{name}: {size(used)} in use of {size(limit) if limit else 'no limit'}"
                 for name, used, limit in zip(self.pools, self.used, self.limits)]
        lines += [f"  {client}: {size(held)}" + (f" of {size(self.client_limit)} per client" if self.client_limit else "")
                  for client, held in zip(self.clients, self.held)]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class SaveCheckpoint:
    """Write these objects, under `keys`, to the safetensors file `name` in the worker's checkpoint
    directory: on the worker's disk, nothing crosses the wire."""
    req_id: int
    name: str
    keys: tuple[str, ...]
    refs: tuple


@dataclass(frozen=True, slots=True)
class LoadCheckpoint:
    """Read the worker's checkpoint `name`; its tensors become `ClientRef(req_id, k)`, in the order
    of the reply `(keys, metas)`."""
    req_id: int
    name: str


@dataclass(frozen=True, slots=True)
class CheckpointRegion:
    """The client's ops from here on run in activation-checkpointing region `region` (0: in none).
    What they save for backward is not kept: backward recomputes it by running them again."""
    region: int


@dataclass(frozen=True, slots=True)
class ManualSeed:
    req_id: int
    seed: int


@dataclass(frozen=True, slots=True)
class Sync:
    """A barrier: answered once everything sent before it has run."""
    req_id: int


@dataclass(frozen=True, slots=True)
class PutBegin:
    """A large `Put`: the tensor's layout now, its bytes in the `Chunk`s that follow."""
    op_id: int
    header: ChunkedTensor
    requires_grad: bool = False
    device: str = ""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes `offset...` of the large tensor announced under `id` (a PutBegin op, or a reply)."""
    id: int
    offset: int
    data: torch.Tensor  # uint8


@dataclass(frozen=True, slots=True)
class Run:
    """Run a client's own function (cloudpickled) on the worker; answered like `Call(reply=True)`.

    Refused unless the worker was started with --allow-code (which needs a token)."""
    op_id: int
    code: bytes
    args: tuple
    kwargs: dict
    grad_enabled: bool = True
    autocast: torch.dtype | None = None


@dataclass(frozen=True, slots=True)
class Expect:
    """Ask the destination of a move for a one-time ticket: what arrives with it becomes
    `ClientRef(req_id, 0)` in this client's namespace. The reply is the ticket."""
    req_id: int


@dataclass(frozen=True, slots=True)
class Push:
    """Ask the source of a move to send `ref` to the worker at `url` itself (the data does not pass
    through the client), authenticating with `token` there and handing it over to `ticket`."""
    req_id: int
    ref: Ref
    url: str
    token: str | None
    ticket: str


@dataclass(frozen=True, slots=True)
class Handover:
    """From a worker pushing a move: give my object `ref` to whoever holds `ticket`."""
    req_id: int
    ref: ClientRef
    ticket: str


@dataclass(frozen=True, slots=True)
class RequestRelease:
    """File (or add a reason to) the request to release `ref`; answered with its `ReleaseInfo`."""
    req_id: int
    ref: Ref
    reason: str


@dataclass(frozen=True, slots=True)
class ReleaseStatus:
    """How this client's release request `request_id` stands; answered with its `ReleaseInfo`."""
    req_id: int
    request_id: int


@dataclass(frozen=True, slots=True)
class ListReleases:
    """The owner only: every release request, newest last."""
    req_id: int


@dataclass(frozen=True, slots=True)
class Decide:
    """The owner only: approve or deny release request `request_id`."""
    req_id: int
    request_id: int
    approve: bool
    reason: str = ""


# --- either way ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ack:
    """The sender has taken the first `count` frames the other side sent in this session."""
    count: int


# --- worker -> client ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Reply:
    req_id: int
    value: Any


@dataclass(frozen=True, slots=True)
class Failure:
    """`req_id` failed; or, with `req_id=None`, the fire-and-forget op `op_id` failed."""
    req_id: int | None
    op_id: int | None
    error: ErrorInfo


# Wire codes: append only (a type added to the messages moves the values' codes: bump PROTOCOL_VERSION).
MESSAGE_TYPES: tuple[type, ...] = (
    Hello, Welcome, Put, Call, Fetch, Release, Search, ListObjects, ManualSeed, Sync, Reply, Failure,
    PutBegin, Chunk, Run, Expect, Push, Handover, Ack, RequestRelease, ReleaseStatus, ListReleases, Decide,
    MemoryReport, SaveCheckpoint, LoadCheckpoint, CheckpointRegion, FetchMock,
)
VALUE_TYPES: tuple[type, ...] = (
    TensorMeta, SameAs, ErrorInfo, PublishedInfo, ObjectInfo, ChunkedTensor, ReleaseInfo, MemoryInfo,
)
