"""`Session`: the client's session with one worker - what it asks of it, around a `ClientProtocol`.

It speaks in references (`m.ClientRef`) and local tensors; pointers (`RemoteTensor`) are made by the
layers above, and `handle.Worker` adds what needs them. Calling rules: any thread may use a session.
Asynchronous ops are queued and sent in batches; requests that need an answer (`get`, `item`,
`search`, ...) flush the queue from the caller's thread and wait for their reply, reading the socket
themselves (`connection.py` says who reads and writes when; `wire/websocket.py` how bytes move).
"""
from __future__ import annotations

import atexit
import os
import ssl as ssl_module
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any

import torch

from ..wire import codec
from ..wire import messages as m
from ..wire._gc import freeze_long_lived
from ..wire.errors import (ApprovalRequired, TorchRemoteError, WorkerConnectionError, WorkerPermissionError,
                           from_info)
from ..wire.messages import ObjectTable
from ..wire.ops import SET_GRADS_NONE
from ..wire.protocol import ClientProtocol
from ..wire.websocket import WebSocket, open_client
from . import codepickle
from .activation_checkpoints import region_of_this_call
from . import device as devices
from .connection import ClientConnection, open_connection, send_chunks
from .progress import transfer_bar

MAX_QUEUED_COMMANDS = 1024   # past this, the caller sends the batch itself (back-pressure)
FRAME_OVERHEAD = 64 * 1024   # room left in a frame for the header beside tensor bytes
APPROVAL_POLL_S = (0.05, 1.0)  # get(timeout=) asks how a release request stands this often: first, most
CALL_SITES = 4096  # the call sites of this many recent asynchronous ops are kept, for their errors
WAIT_FOR_ACK_BYTES = 1 << 20  # a put this large waits for the worker to run it, instead of a copy

_open_sessions: "weakref.WeakSet[Session]" = weakref.WeakSet()


def autocast_dtype() -> torch.dtype | None:
    """The dtype of the `torch.autocast` region this thread is in for the remote device, if any:
    every call made in it runs under autocast on the worker."""
    return torch.get_autocast_dtype(devices.BACKEND) if torch.is_autocast_enabled(devices.BACKEND) else None


@atexit.register
def close_open_sessions() -> None:
    """At exit, close what is still open: each worker frees this client's objects at once, instead
    of keeping them for a resume that will not come."""
    for session in list(_open_sessions):
        try:
            session.close()
        except Exception:
            pass


class Session:
    """A session with a torchremote worker, over one connection at a time (resumed after a drop).
    Users hold it as a `Worker` (`torchremote.connect(url)`)."""

    def __init__(self, url: str, *, token: str | None = None, name: str | None = None,
                 timeout: float = 10.0, retry_for: float = 0.0,
                 ssl: ssl_module.SSLContext | None = None,
                 max_message_bytes: int = m.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.url = url
        token = token if token is not None else os.environ.get("TORCHREMOTE_TOKEN")
        self._protocol = ClientProtocol(name or f"client-{os.getpid()}", token)
        self._lock = threading.RLock()        # the protocol's state: held only to queue or take
        self._grads_to_reset: list = []  # pointers whose `.grad = None` is sent as one op before the next
        self._region: object | None = None  # the activation-checkpointing region the last op ran in
        self._regions = 0  # regions numbered for the worker
        self._pending: dict[int, Future] = {}
        self._deferred: list[m.Failure] = []
        self._call_sites: list = [None] * CALL_SITES  # op_id % CALL_SITES -> (op_id, code, line)
        self._closed: WorkerConnectionError | None = None
        self._open = lambda: open_client(url, timeout=timeout, ssl=ssl, max_size=max_message_bytes)
        ws = open_connection(url, timeout=timeout, retry_for=retry_for, ssl=ssl, max_size=max_message_bytes)
        try:
            welcome = self._handshake(ws)
        except TorchRemoteError:
            raise
        except Exception as e:
            raise WorkerConnectionError(f"handshake with {url} failed: {e}") from e
        self.id: str = welcome.worker_id
        self.max_message_bytes: int = welcome.max_message_bytes
        self._chunk_bytes = min(m.CHUNK_BYTES, self.max_message_bytes - FRAME_OVERHEAD)
        self._bars: dict[int, tuple[Any, list[int]]] = {}  # req_id -> (bar, [bytes shown])
        self._protocol.on_chunk = self._fetch_progress
        self.client_id: str = welcome.client_id
        self.compute_device = torch.device(welcome.device)  # the worker's own: cpu, cuda:0
        self._resume_token = welcome.resume_token
        try:
            self.device: torch.device = devices.register(self)
        except RuntimeError:
            ws.close()
            raise
        freeze_long_lived()
        self._connection = ClientConnection(ws, self.id, url, grace_s=welcome.resume_grace_s,
                                            reconnect=self._reopen if welcome.resume_token else None)
        self._connection.start(on_message=self._on_message, flush=self._send_batch, has_queued=self._has_queued,
                               on_lost=self._shutdown, placement=self._protocol.placement)
        _open_sessions.add(self)

    def _handshake(self, ws: WebSocket, resume: str | None = None, received: int = 0) -> m.Welcome:
        """Hello and Welcome on a new connection: a new session, or with `resume`, this one again."""
        try:
            send_chunks(ws, self._protocol.hello(resume, received))
            reply = ws.receive(timeout=m.HANDSHAKE_TIMEOUT_S)
            if reply is None:
                raise TimeoutError(f"no answer within {m.HANDSHAKE_TIMEOUT_S:g} s")
            return self._protocol.receive_welcome(reply)
        except BaseException:
            ws.close()
            raise

    def _reopen(self, received: int) -> tuple[WebSocket, int]:
        """A new connection that has taken this session up again (`client_connection.Reconnect`)."""
        ws = self._open()
        return ws, self._handshake(ws, self._resume_token, received).received

    # --- public API ---
    def objects(self) -> ObjectTable:
        """What this client may see on the worker: published data and its own objects."""
        return ObjectTable(self._request(m.ListObjects))

    def memory(self) -> m.MemoryInfo:
        """How the worker's memory budget stands, and what this client holds there (with the
        owner token: what every client holds)."""
        return self._request(m.MemoryReport)

    def manual_seed(self, seed: int) -> None:
        """Seed the worker's random number generator."""
        self._request(m.ManualSeed, int(seed))

    def sync(self) -> None:
        """Wait until every op sent so far has run; raise the first error among them, if any."""
        self._request(m.Sync)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self) -> None:
        """Flush what is queued and disconnect; the worker frees what this client created."""
        if self._closed is not None:
            return
        try:
            if not self._connection.resuming:  # else the worker is out of reach: send nothing more
                self._flush()
        except TorchRemoteError:
            pass
        self._shutdown(WorkerConnectionError(f"the connection to worker {self.id!r} was closed"))
        self._connection.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "connected"
        return f"Worker(id={self.id!r}, url={self.url!r}, device={self.device}, {state})"

    # --- the owner's side of releases (a connection made with the owner token) ---
    def requests(self) -> list[m.ReleaseInfo]:
        """Every release request on the worker, newest last (owner token only)."""
        return self._request(m.ListReleases)

    def approve(self, request_id: int) -> m.ReleaseInfo:
        return self._request(m.Decide, int(request_id), True, "")

    def deny(self, request_id: int, reason: str = "") -> m.ReleaseInfo:
        return self._request(m.Decide, int(request_id), False, reason)

    # --- used by the pointer and dispatch layers ---
    def _fetch_when_approved(self, ref: m.Ref, timeout: float) -> torch.Tensor:
        """`get(timeout=)`: the value once the owner approves its release (polled, with back-off)."""
        deadline = time.monotonic() + timeout
        try:
            return self._fetch(ref)
        except ApprovalRequired as e:
            request_id = e.request_id
        delay = APPROVAL_POLL_S[0]
        while True:
            info = self._request(m.ReleaseStatus, request_id)
            if info.status == "approved":
                return self._fetch(ref)
            if info.status != "pending":
                note = f": {info.note}" if info.note else ""
                raise WorkerPermissionError(f"release request #{request_id} was {info.status}{note}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerPermissionError(
                    f"release request #{request_id} is still pending after {timeout:g} s: the owner has not decided")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, APPROVAL_POLL_S[1])


    def _put(self, tensor: torch.Tensor, device: str = "") -> tuple[m.TensorMeta, m.ClientRef]:
        return self._put_many([tensor], device)[0]

    def _put_many(self, tensors: list[torch.Tensor], device: str = "") -> list[tuple[m.TensorMeta, m.ClientRef]]:
        """Send tensors in as few frames as fit (a model's parameters: one frame, not one each);
        returns each one's metadata on the worker and its reference there. Their bytes have left
        when this returns, so no snapshot is copied: they may change after."""
        out, small = [], 0
        for tensor in tensors:
            meta = codec.meta_after_transfer(tensor)
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes <= self._chunk_bytes:
                self._make_room(nbytes)
                with self._lock:
                    self._check_open()
                    self._queue_grad_resets()
                    ref = self._protocol.put(tensor.detach(), tensor.requires_grad, device)
                small += nbytes
            else:
                self._check_open()
                ref = self._put_chunked(tensor, device)
            out.append((meta, ref))
        if small >= WAIT_FOR_ACK_BYTES:
            self._send_and_wait()
            self._raise_refused([ref.op_id for _, ref in out])  # it waited anyway: say so here
        else:
            self._flush()
        return out

    def _raise_refused(self, op_ids: list[int]) -> None:
        """Raise, at the call that asked, a failure the worker has reported for one of these ops
        (a send refused for want of memory, say)."""
        wanted = set(op_ids)
        with self._lock:
            mine = [f for f in self._deferred if f.op_id in wanted]
            self._deferred = [f for f in self._deferred if f.op_id not in wanted]
        if mine:
            raise from_info(mine[0].error, self.id)

    def _put_chunked(self, tensor: torch.Tensor, device: str) -> m.ClientRef:
        """A large tensor, one chunk per message: neither side ever holds a second full copy."""
        header, chunks = codec.split_for_transfer(tensor.detach(), self._chunk_bytes)
        with self._lock:
            self._queue_grad_resets()
            ref = self._protocol.put_begin(header, tensor.requires_grad, device)
        self._send_and_wait()  # one round trip: a send the worker has no room for streams nothing
        self._raise_refused([ref.op_id])
        bar = transfer_bar(header.nbytes, f"send to {self.id}")
        try:
            for offset, data in chunks:
                with self._lock:
                    self._protocol.chunk(ref.op_id, offset, data)
                self._flush(caller_waits=True)  # one chunk a frame: read straight into place there
                bar.update(data.numel())
            self._send_and_wait()
        finally:
            bar.close()
        return ref

    def _call(self, op: str, args: tuple, kwargs: dict, nbytes: int = 0, out_bytes: int = 0) -> int:
        """Queue an asynchronous op; its error, if the worker meets one, is raised at the next
        synchronisation, naming the op and the line that called it (`_call_site`)."""
        if nbytes:
            self._check_size(nbytes, op)
            self._make_room(nbytes)
        site = _call_site()
        with self._lock:
            self._check_open()
            self._queue_grad_resets()
            self._mark_region()
            op_id = self._protocol.call(op, args, kwargs, reply=False, grad_enabled=torch.is_grad_enabled(),
                                        autocast=autocast_dtype(), nbytes=nbytes, out_bytes=out_bytes)
            full = self._protocol.pending_commands >= MAX_QUEUED_COMMANDS
        self._call_sites[op_id % CALL_SITES] = (op_id, site.f_code, site.f_lineno)
        if full:
            self._flush()  # back-pressure: the caller sends the batch itself
        else:
            self._connection.wake()
        return op_id

    def _call_sync(self, op: str, args: tuple, kwargs: dict, nbytes: int = 0) -> tuple[int, Any]:
        return self._ask(lambda: self._protocol.call(op, args, kwargs, reply=True, nbytes=nbytes,
                                                     grad_enabled=torch.is_grad_enabled(),
                                                     autocast=autocast_dtype()), op, nbytes)

    def _run_sync(self, fn: Any, args: tuple, kwargs: dict, nbytes: int = 0) -> tuple[int, Any]:
        code = codepickle.dumps(fn)
        return self._ask(lambda: self._protocol.run(code, args, kwargs, nbytes=nbytes,
                                                    grad_enabled=torch.is_grad_enabled(),
                                                    autocast=autocast_dtype()),
                         "this function and its local tensors", nbytes + len(code))

    def _fetch(self, ref: m.Ref) -> torch.Tensor:
        return self._request(m.Fetch, ref)

    def _fetch_many(self, refs: list[m.Ref]) -> list[torch.Tensor]:
        """Several tensors in one round trip (a model's parameters: not one round trip each)."""
        with self._lock:
            self._check_open()
            self._queue_grad_resets()
            futures = []
            for ref in refs:
                req_id = self._protocol.request(m.Fetch, ref)
                futures.append(self._pending.setdefault(req_id, Future()))
        self._flush()
        return [self._wait(f, "fetch") for f in futures]

    def _fetch_progress(self, req_id: int, received: int, total: int) -> None:
        if req_id not in self._bars:
            self._bars[req_id] = (transfer_bar(total, f"get from {self.id}"), [0])
        bar, shown = self._bars[req_id]
        bar.update(received - shown[0])
        shown[0] = received
        if received == total:
            del self._bars[req_id]
            bar.close()

    def _set_grad_none_later(self, t: Any) -> None:
        """`t.grad = None` on the worker, sent with the others as one op before whatever comes next
        (the list holds `t`, so its pointer cannot be released first)."""
        with self._lock:
            self._grads_to_reset.append(t)

    def _queue_grad_resets_now(self) -> None:
        """Queue the waiting `.grad = None` resets as a command now: a pointer they name is about
        to hand its worker object to another (`identity.become`), which may release it."""
        with self._lock:
            self._queue_grad_resets()

    def _queue_grad_resets(self) -> None:
        if self._grads_to_reset:
            refs = tuple(t._ref for t in self._grads_to_reset)
            self._grads_to_reset = []
            self._protocol.call(SET_GRADS_NONE, refs, {}, reply=False, grad_enabled=False)

    def _mark_region(self) -> None:
        """Tell the worker when ops start running in another activation-checkpointing region."""
        region = region_of_this_call()
        if region is not self._region:
            self._region = region
            if region is not None:
                self._regions += 1
            self._protocol.checkpoint_region(0 if region is None else self._regions)

    def _release(self, ref: m.ClientRef) -> None:
        if self._closed is None:
            self._protocol.release(ref)

    # --- I/O ---
    def _request(self, kind: type, *fields: Any) -> Any:
        return self._ask(lambda: self._protocol.request(kind, *fields), kind.__name__.lower())[1]

    def _ask(self, queue: Any, what: str, nbytes: int = 0) -> tuple[int, Any]:
        """Queue one command that wants an answer (`queue()`, under the lock), send it, and wait."""
        self._check_size(nbytes, what)
        self._make_room(nbytes)
        with self._lock:
            self._check_open()
            self._queue_grad_resets()
            self._mark_region()
            req_id = queue()
            future = self._pending[req_id] = Future()
        self._flush()
        return req_id, self._wait(future, what)

    def _wait(self, future: Future, what: str) -> Any:
        try:
            value = self._connection.wait(future)
        except BaseException:
            self._deferred.clear()  # this error is what surfaces now
            raise
        if self._deferred:
            first, self._deferred = self._deferred[0], []
            exc = from_info(first.error, self.id)
            exc.add_note(f"this error belongs to an earlier call: {self._describe_async(first)}; it failed on the "
                         f"worker after that call had returned. This is the first synchronisation since ({what}); "
                         f"that op's results are invalid")
            raise exc
        return value

    def _describe_async(self, failure: m.Failure) -> str:
        """'torch.gather (asynchronous op #12) at train.py:31, in step', as far as it is known."""
        what = failure.error.op or "an asynchronous op"
        if failure.op_id is None:
            return what
        what += f" (asynchronous op #{failure.op_id})"
        site = self._call_sites[failure.op_id % CALL_SITES]
        if site is not None and site[0] == failure.op_id:
            what += f" at {site[1].co_filename}:{site[2]}, in {site[1].co_name}"
        return what

    def _send_and_wait(self) -> None:
        """Send what is queued, uncopied, and wait until the worker has run it. For puts of large
        tensors: frames kept for a replay after a drop point into them, and the caller may change
        them once the put returns (smaller frames are copied instead)."""
        with self._lock:
            self._check_open()
            future = self._pending[self._protocol.request(m.Sync)] = Future()
        self._flush(caller_waits=True)
        self._connection.wait(future)

    def _check_size(self, nbytes: int, what: str) -> None:
        """Local operands travel inside their op's message, so they must fit in one."""
        if nbytes + FRAME_OVERHEAD > self.max_message_bytes:
            raise WorkerPermissionError(
                f"{what}: {nbytes} bytes of local data would not fit in one message to worker {self.id!r}, which "
                f"accepts at most {self.max_message_bytes} bytes (--max-message-bytes)")

    def _make_room(self, nbytes: int) -> None:
        """Send what is queued first if adding `nbytes` would make the frame too large."""
        if nbytes and self._protocol.pending_bytes + nbytes + FRAME_OVERHEAD > self.max_message_bytes:
            self._flush()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise WorkerConnectionError(str(self._closed))

    def _flush(self, caller_waits: bool = False) -> None:
        """Send everything queued as one frame. The queue is taken under the state lock, which is
        then let go: callers queueing ops never wait while this thread encodes and sends.
        `caller_waits`: see `ClientConnection.send_locked`."""
        connection = self._connection
        with self._lock:
            self._queue_grad_resets()
            items = self._protocol.take()
            if not items:
                return
            ack = None if type(items[0]) is m.Chunk else connection.take_ack()  # a chunk goes alone: read into place
            if ack is not None:
                items.insert(0, m.Ack(ack))
            connection.send_lock.acquire()  # taken in the order frames were taken: they leave in order
        try:
            connection.send_locked(self._protocol.encode(items), caller_waits=caller_waits)
        except WorkerConnectionError as e:
            failure = e
        else:
            return
        finally:
            connection.send_lock.release()
        self._shutdown(failure)  # takes the state lock: never while holding the send lock
        raise failure

    def _send_batch(self) -> None:
        """The pump's flush: an argument the wire cannot carry fails its batch, reported at the next
        synchronisation like any failed asynchronous op."""
        try:
            self._flush()
        except codec.EncodeError as e:
            self._deferred.append(m.Failure(None, None, m.ErrorInfo("TypeError", str(e))))

    def _has_queued(self) -> bool:
        return bool(self._protocol.pending_commands or self._protocol.pending_releases or self._grads_to_reset)

    def _on_message(self, message: Any) -> None:
        for item in self._protocol.receive_data(message):
            if type(item) is m.Ack:
                self._connection.acknowledged(item.count)
            else:
                self._deliver(item)

    def _deliver(self, item: Any) -> None:
        key = item.req_id if item.req_id is not None else getattr(item, "op_id", None)
        future = self._pending.pop(key, None) if key is not None else None
        if isinstance(item, m.Reply):
            if future is not None:
                future.set_result(item.value)
        elif future is not None:
            future.set_exception(from_info(item.error, self.id))
        else:
            self._deferred.append(item)

    def _shutdown(self, error: WorkerConnectionError) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = error
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(WorkerConnectionError(str(self._closed)))


class ReleaseHandle:
    """A request to release a tensor's value (`x.request(reason)`): `.id`, and `.status` as the
    worker says now ("pending", "approved", "denied", "released"; "open" for data that needs none)."""

    def __init__(self, worker: Session, info: m.ReleaseInfo) -> None:
        self._worker = worker
        self.id = info.id
        self._info = info

    @property
    def status(self) -> str:
        if self._info.status in ("pending", "approved"):
            self._info = self._worker._request(m.ReleaseStatus, self.id)
        return self._info.status

    def __repr__(self) -> str:
        return f"ReleaseHandle(id={self.id}, object={self._info.object}, lineage={self._info.lineage!r}, status={self.status!r})"


_INTERNAL = ("torch", "torchremote")


def _call_site() -> Any:
    """The frame of the code that called the torch op being queued: the first outside torch and
    torchremote (reached from Session._call through dispatch and the tensor's __torch_function__;
    for a layer of torch.nn's, the user's line that called the layer)."""
    try:
        frame = sys._getframe(5)
    except ValueError:
        frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _INTERNAL:
        frame = frame.f_back
    return frame


def send_to_worker(url: str, token: str | None, name: str, tensor: torch.Tensor, ticket: str) -> None:
    """A worker's half of a move: connect to the destination as a client, send `tensor` and hand it
    over to the slot `ticket` names there (`worker.execution.SendToWorker`)."""
    with Session(url, token=token, name=name) as destination:
        _, ref = destination._put(tensor)
        destination._request(m.Handover, ref, ticket)
