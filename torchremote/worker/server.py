"""The worker: runs each client's `Session` against one `ObjectStore`.

Each connection is served on its own thread (`connection.py`), which reads a batch, runs it
and writes the replies; a slow op of one client does not stall the others, and torch kernels
release the GIL while they run.
"""
from __future__ import annotations

import hmac
import ipaddress
import itertools
import logging
import os
import re
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..wire import codec
from ..wire import messages as m
from ..wire._gc import freeze_long_lived
from ..wire.errors import ProtocolError, WorkerConnectionError, WorkerPermissionError, to_info
from ..wire.messages import ObjectTable, object_id
from ..wire.protocol import ChunkPlacement, ServerProtocol
from ..wire.resume import DEFAULT_GRACE_S
from ..wire.websocket import ConnectionClosed, Placed
from . import published_files
from .connection import Listener, ServedConnection
from . import budget
from .budget import MemoryBudget
from .collectives import Groups
from .graphs import CompiledGraphs
from .execution import SendToWorker, Session
from .releases import ReleaseDesk, ReleaseRequest
from .sessions import ResumableSession, SessionTable
from .store import ObjectStore
from .traffic import Traffic, frame_bytes

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# batch items that change no data: replies kept for a replay need no copy before these run
_READ_ONLY = (m.Fetch, m.FetchMock, m.Release, m.Search, m.ListObjects, m.Sync, m.Expect)


@dataclass(frozen=True)
class ClientStatus:
    """One client session as the owner sees it (`server.clients()`, the console)."""
    id: str
    peer: str
    connected_at: float       # time.time()
    objects: int
    held_bytes: int
    ops: int
    bytes_in: int
    bytes_out: int
    owner: bool               # it holds the owner token
    parked: bool              # its connection dropped; kept for a resume
    parked_for_s: float


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WorkerServer:
    """A running worker. Create with `torchremote.start_worker(...)`; it serves from a thread.

    `send_to_worker` is how it hands a tensor to another worker in a move (`start_worker` passes
    the client's); without it, moves from this worker are refused."""

    def __init__(self, id: str = "worker", host: str = "127.0.0.1", port: int = 0, *,
                 token: str | None = None, owner_token: str | None = None, device: str | torch.device = "cpu",
                 max_memory: int | str | None = None, max_gpu_memory: int | str | None = None,
                 max_message_bytes: int = m.DEFAULT_MAX_MESSAGE_BYTES,
                 max_client_bytes: int | str | None = None, max_clients: int | None = None,
                 resume_grace: float = DEFAULT_GRACE_S, certfile: str | None = None,
                 keyfile: str | None = None, allow_code: bool = False, checkpoint_dir: str | None = None,
                 insecure: bool = False,
                 verbose: bool = False, log_file: str | None = None,
                 console_port: int | None = None, console_host: str = "127.0.0.1", metrics_public: bool = False,
                 send_to_worker: SendToWorker | None = None) -> None:
        if token is None and not is_loopback(host) and not insecure:
            raise WorkerPermissionError(
                f"refusing to listen on {host} without a token: anyone who can reach it could use "
                f"this machine. Give a token (--token-file or $TORCHREMOTE_TOKEN) or --insecure")
        if allow_code and token is None:
            raise WorkerPermissionError(
                "--allow-code runs code that clients send as this user: it needs a token "
                "(--token-file or $TORCHREMOTE_TOKEN), so that only clients holding it can")
        self.allow_code = allow_code
        if checkpoint_dir is not None:
            os.makedirs(checkpoint_dir, exist_ok=True)
        self.checkpoint_dir = checkpoint_dir
        self._send_to_worker = send_to_worker  # for moves to other workers
        self.id = id
        self.device = torch.device(device)
        self._token = token.encode() if token is not None else None
        self._owner_token = owner_token.encode() if owner_token else None
        if self._owner_token is not None and self._owner_token == self._token:
            raise WorkerPermissionError("the owner token must differ from the clients' token")
        self.max_message_bytes = max_message_bytes
        # sizes: None the default (a share of the memory there is), 0 no limit, "8GiB", "80%"
        self.budget = MemoryBudget(_size(max_memory, budget.physical_memory()), self.device,
                                   _size(max_gpu_memory, budget.device_memory(self.device)))
        self.max_client_bytes = _size(max_client_bytes, self.budget.host.limit or budget.physical_memory(),
                                      budget.DEFAULT_CLIENT_SHARE)
        if max_clients is not None and max_clients < 1:
            raise ValueError("--max-clients must be at least 1")
        self.max_clients = max_clients
        if resume_grace < 0:
            raise ValueError("--resume-grace must be 0 (no resume) or more seconds")
        self.resume_grace = float(resume_grace)
        self._resumable = SessionTable(self.resume_grace, self._free_session)
        self._sessions = 0  # sessions holding objects: connected, or dropped and kept for a resume
        self._sessions_lock = threading.Lock()
        tls = None
        if certfile:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(certfile, keyfile)
        elif keyfile:
            raise ValueError("--keyfile needs --certfile")
        self.tls = tls is not None
        self.store = ObjectStore(owner=id)
        self.log = _make_logger(id, verbose, log_file)
        self.releases = ReleaseDesk(self.log)
        self._client_numbers = itertools.count(1)
        self._clients: dict[str, ResumableSession] = {}  # every session holding objects, parked ones too
        self._ended = Traffic()  # what sessions that ended had counted
        self._stopped = threading.Event()
        self.started_at = time.time()
        self.console = None
        if console_port is not None:  # before the listener: a console that cannot start stops the worker here
            from .console import Console  # needs the `console` extra (aiohttp, prometheus-client)
            self.console = Console(self, console_host, console_port, tls=tls, metrics_public=metrics_public)
        freeze_long_lived()
        try:
            self._listener = Listener(host, port, self._handle, tls=tls, max_size=max_message_bytes, name=id)
        except BaseException:
            if self.console is not None:
                self.console.stop()
            raise
        self.host = host
        self.port: int = self._listener.port
        self.groups = Groups(host)  # the process groups with other workers that clients formed
        self.graphs = CompiledGraphs(self.device, self.log)  # tr.compile's graphs, shared by all clients
        if self.resume_grace > 0:
            threading.Thread(target=self._expire_dropped_sessions, name=f"torchremote-expiry-{id}",
                             daemon=True).start()
        self.log.info("worker %r listening on %s; memory budget %s, each client may hold up to %s", id,
                      self.url, self.describe_budget(), describe_bytes(self.max_client_bytes))
        if self.console is not None:
            print(f"torchremote: the owner's console of worker {id!r}: {self.console.login_link()} "
                  f"(a one-time sign-in link; the owner token signs in too)", file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}"

    def publish(self, tensor: torch.Tensor, tags: Iterable[str] = (), description: str = "",
                allow_get: bool = True, private: bool = False, writable: bool = False,
                mock: torch.Tensor | None = None) -> str:
        """Offer `tensor` to clients, findable by its tags. Returns its object id. `private=True`
        (or `allow_get=False`): clients compute on it, and whatever derives from it leaves only
        through a release request the owner approved (`requests`, `approve`, `auto_approve`).
        Clients never change it (a `PermissionError` says to clone first) unless `writable=True`:
        a tensor clients are meant to update in place, a shared model's weights say.

        `mock`: made-up data of the same shape and dtype that any client may fetch (`x.mock()`,
        `worker.search(..., mock=True)`), to develop its code on before running it on the real data."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"publish() takes a torch.Tensor, not {type(tensor).__qualname__}")
        if isinstance(tags, str):
            tags = (tags,)
        mock = _checked_mock(mock, tensor, tags)
        tensor = tensor.detach().to(self.device)
        pool = self.budget.pool(tensor.untyped_storage())
        new = 0 if self.store.holds_storage(tensor) else tensor.untyped_storage().nbytes()
        self.budget.check(pool, new, f"publishing {tuple(tensor.shape)} {list(tags)}", "published data",
                          self.store.published_bytes)
        ref = self.store.publish(tensor, tuple(tags), description, allow_get and not private, writable, mock)
        self.budget.charge(pool, new)
        self.log.info("published %s %s %s%s%s%s", object_id(ref), tuple(tensor.shape), list(tags),
                      " (private)" if private or not allow_get else "", " (writable)" if writable else "",
                      " with a mock" if mock is not None else "")
        return object_id(ref)

    def publish_file(self, path: str, tags: Iterable[str] = (), description: str | None = None,
                     allow_get: bool = True, private: bool = False, writable: bool = False,
                     mock: str | None = None) -> dict[str, str]:
        """Publish every tensor in a safetensors file under its name (its first tag), with `tags`
        and the file's own metadata tags; returns name -> object id. Nothing is published from a
        file that cannot be read whole (`PublishFileError`, naming it). The file's metadata may
        make it private too (`"private": "true"`). `mock`: a safetensors file of mocks, by name."""
        mocks = published_files.read(mock).tensors if mock is not None else None
        return self.publish_files([published_files.read(path)], tags, description, allow_get, private, writable,
                                  mocks)

    def publish_files(self, files: list[published_files.TensorFile], tags: Iterable[str] = (),
                      description: str | None = None, allow_get: bool = True,
                      private: bool = False, writable: bool = False,
                      mocks: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
        """Publish files already read (`published_files.read`): what `publish_file` does after
        reading. `mocks`: name -> the mock of the tensor of that name (all checked before any is published)."""
        if isinstance(tags, str):
            tags = (tags,)
        mocks = dict(mocks or {})
        tensors = {name: t for f in files for name, t in f.tensors.items()}
        for name, fake in mocks.items():
            if name not in tensors:
                raise ValueError(f"a mock named {name!r} has no tensor of that name to stand in for "
                                 f"(published: {', '.join(sorted(tensors)) or 'none'})")
            _checked_mock(fake, tensors[name], (name,))
        ids = {}
        for f in files:
            for name, tensor in f.tensors.items():
                ids[name] = self.publish(tensor, (name, *tags, *f.tags),
                                         f.description if description is None else description, allow_get,
                                         private or f.private, writable, mocks.get(name))
        return ids

    # --- what leaves: requests to release private-derived data ---
    def requests(self) -> list[ReleaseRequest]:
        """Every release request, newest last: id, client, object, reason, shape, dtype, numel,
        lineage, status (pending, approved, denied, released), decided_by."""
        return self.releases.requests()

    def approve(self, request_id: int) -> ReleaseRequest:
        """Let the client have that object's value once, as it is now."""
        return self.releases.approve(request_id, by="owner (python)")

    def deny(self, request_id: int, reason: str = "") -> ReleaseRequest:
        return self.releases.deny(request_id, reason, by="owner (python)")

    def auto_approve(self, rule: Callable[[ReleaseRequest], bool]) -> None:
        """Approve every request for which `rule(request)` is true, as it is filed (and those
        pending now). The rule is the owner's own Python, run in this process."""
        self.releases.auto_approve(rule)

    def describe_budget(self) -> str:
        """'812.0 MiB of 1.0 GiB in use (memory)', for each pool."""
        return "; ".join(f"{budget.describe(used)} of {budget.describe(limit)} in use ({name})" if limit
                         else f"{budget.describe(used)} in use, no limit ({name})"
                         for name, used, limit in self.budget.rows())

    def objects(self) -> ObjectTable:
        """The whole registry: published data and every connected client's objects."""
        return ObjectTable(self.store.rows())

    def clients(self) -> list["ClientStatus"]:
        """Every session holding objects here: connected, or dropped and kept for a resume (parked)."""
        with self._sessions_lock:
            states = list(self._clients.values())
        now = time.monotonic()
        return [ClientStatus(s.session.client_id, s.session.peer, s.session.connected_at, len(s.session.objects),
                             s.session.held_bytes, s.session.traffic.ops, s.session.traffic.bytes_in,
                             s.session.traffic.bytes_out, s.session.is_owner, not s.live,
                             now - s.dropped_at if not s.live else 0.0)
                for s in states]

    def traffic(self) -> Traffic:
        """What every session so far has counted, ended ones included."""
        total = Traffic()
        with self._sessions_lock:
            total.add(self._ended)
            states = list(self._clients.values())
        for state in states:
            total.add(state.session.traffic)
        return total

    @property
    def console_url(self) -> str | None:
        """The owner's console (`console_port=`), or None when it is off."""
        return self.console.url if self.console is not None else None

    def console_link(self) -> str:
        """A new one-time sign-in link to the owner's console."""
        if self.console is None:
            raise RuntimeError("this worker has no console: start it with console_port=0 (--console-port 0)")
        return self.console.login_link()

    def serve_forever(self) -> None:
        """Block until Ctrl-C, SIGTERM or `stop()`, then shut down cleanly."""
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: self._stopped.set())
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.stop()

    def stop(self) -> None:
        """Stop listening, close every connection, free every client's objects."""
        self._stopped.set()
        if self.console is not None:
            self.console.stop()
        self._listener.stop()
        self._resumable.close()
        self.groups.close()
        self.log.info("worker %r stopped", self.id)

    def __enter__(self) -> "WorkerServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"WorkerServer(id={self.id!r}, url={self.url!r}, device={self.device})"

    # --- one connection ---
    def _handle(self, conn: ServedConnection) -> None:
        peer = conn.peer
        protocol = ServerProtocol()
        try:
            first = conn.receive(m.HANDSHAKE_TIMEOUT_S)
            if first is None:
                raise TimeoutError(f"no Hello within {m.HANDSHAKE_TIMEOUT_S:g} s")
            hello = protocol.receive_hello(first)
            presented = (hello.token or "").encode()
            is_owner = self._owner_token is not None and hmac.compare_digest(presented, self._owner_token)
            if self._token is not None and not is_owner and not hmac.compare_digest(presented, self._token):
                raise WorkerPermissionError("authentication failed: wrong or missing token")
            state = self._resumable.attach(hello.resume) if hello.resume is not None else None
        except (ProtocolError, WorkerPermissionError, WorkerConnectionError, TimeoutError) as e:
            self.log.warning("%s refused: %s", peer, e)
            _try_send(conn, protocol.refuse(e))
            return
        except ConnectionClosed:
            return
        if state is not None:
            self._resume(conn, protocol, state, hello.received)
            return
        if not self._admit():
            error = WorkerPermissionError(
                f"worker {self.id!r} serves at most {self.max_clients} clients at once (--max-clients); "
                f"try again when one has disconnected")
            self.log.warning("%s refused: %s", peer, error)
            _try_send(conn, protocol.refuse(error))
            return
        client_id = f"{_printable(hello.client_name)}#{next(self._client_numbers)}"
        session = Session(self.store, client_id, device=self.device, peer=peer, log=self.log,
                          max_client_bytes=self.max_client_bytes, budget=self.budget, allow_code=self.allow_code,
                          releases=self.releases, is_owner=is_owner, send_to_worker=self._send_to_worker,
                          checkpoint_dir=self.checkpoint_dir, groups=self.groups, graphs=self.graphs,
                          timed=self.console is not None)
        state = self._resumable.open(session)
        with self._sessions_lock:
            self._clients[client_id] = state
        self.log.info("%s connected as %s%s", peer, client_id, " (owner)" if is_owner else "")
        welcome = protocol.welcome(self.id, client_id, self.max_message_bytes, state.token, self.resume_grace,
                                   device=str(self.device))
        self._serve_session(conn, protocol, state, [welcome])

    def _admit(self) -> bool:
        with self._sessions_lock:
            if self.max_clients is not None and self._sessions >= self.max_clients:
                return False
            self._sessions += 1
            return True

    def _resume(self, conn: ServedConnection, protocol: ServerProtocol, state: ResumableSession,
                received: int) -> None:
        """Take a dropped session up again on this connection: tell the client how many of its
        frames ran, and send again the replies it did not receive."""
        session = state.session
        try:
            replays = state.replies.since(received)
        except ProtocolError as e:
            self.log.warning("%s refused a resume of %s: %s", conn.peer, session.client_id, e)
            _try_send(conn, protocol.refuse(e))
            self._resumable.park(state)
            return
        self.log.info("%s %s resumed after %.1f s; %d frame(s) of replies sent again", conn.peer,
                      session.client_id, time.monotonic() - state.dropped_at, len(replays))
        session.peer = conn.peer
        welcome = protocol.welcome(self.id, session.client_id, self.max_message_bytes, state.token,
                                   self.resume_grace, state.processed, str(self.device))
        self._serve_session(conn, protocol, state, [welcome, *replays])

    def _serve_session(self, conn: ServedConnection, protocol: ServerProtocol, state: ResumableSession,
                       first: list) -> None:
        """Send `first`, then run each batch the client sends and write its replies, until the
        connection ends: closed by the client (its objects are freed), or dropped (they are kept
        for the grace period, for a resume)."""
        session = state.session
        traffic = session.traffic
        try:
            for frame in first:
                conn.send(frame)
            for data in conn.messages(ChunkPlacement(session.assembly)):
                arrived = time.perf_counter() if traffic.timed else 0.0
                traffic.bytes_in += data.tensor.nbytes if isinstance(data, Placed) else len(data)
                replies = self._run_batch(protocol, state, data)
                frames = _encode_replies(protocol, replies) if replies else []
                if state.token:
                    for frame in frames:
                        state.replies.add(frame)  # all kept before any is sent: a drop loses none
                for frame in frames:
                    conn.send(frame)
                    traffic.bytes_out += frame_bytes(frame)
                if arrived and replies and len(replies) > (type(replies[0]) is m.Ack):  # the client waits on this batch
                    traffic.sync_seconds.observe(time.perf_counter() - arrived)
        except ConnectionClosed:
            if state.token and not conn.ws.closed_by_peer and not self._stopped.is_set():
                self._resumable.park(state)
                self.log.info("%s %s dropped; its %d object(s) are kept %g s for a resume", conn.peer,
                              session.client_id, len(session.objects), self.resume_grace)
                return
            self._end_session(state, "disconnected")
        except Exception as e:  # a fault of this connection's transport: drop it, keep serving others
            self.log.warning("%s %s: dropped: %s: %s", conn.peer, session.client_id, type(e).__name__, e)
            self._end_session(state, "dropped")

    def _run_batch(self, protocol: ServerProtocol, state: ResumableSession, data: Any) -> list:
        """Run one frame of the client's; the replies start with an acknowledgement of every frame
        run so far, and a frame that needs no reply is acknowledged now and then on its own."""
        try:
            items = protocol.receive_data(data)
        except ProtocolError as e:
            self.log.warning("%s %s: %s", state.session.peer, state.session.client_id, e)
            replies = [m.Failure(None, None, to_info(e))]
        else:
            if items and type(items[0]) is m.Ack:
                state.replies.acknowledge(items[0].count)
                items = items[1:]
            if state.replies.kept and not all(type(i) in _READ_ONLY for i in items):
                state.replies.freeze()  # replies not yet acknowledged must not change under a replay
            replies = state.session.run(items)
        state.processed += 1
        if not state.token:  # resuming is off: nothing is kept, nothing to acknowledge
            return replies
        state.unacknowledged += 1
        state.unacknowledged_bytes += data.tensor.numel() if isinstance(data, Placed) else len(data)
        if not replies and not state.ack_due():
            return []
        state.unacknowledged = state.unacknowledged_bytes = 0
        return [m.Ack(state.processed), *replies]

    def _end_session(self, state: ResumableSession, why: str) -> None:
        self._resumable.end(state)
        self._free_session(state, why)

    def _free_session(self, state: ResumableSession, why: str) -> None:
        session = state.session
        held = session.held_bytes
        freed = session.close()
        with self._sessions_lock:
            self._sessions -= 1
            if self._clients.pop(session.client_id, None) is not None:
                self._ended.add(session.traffic)
        self.log.info("%s %s %s; freed %d object(s), %s; worker memory: %s", session.peer, session.client_id,
                      why, freed, budget.describe(held), self.describe_budget())

    def _expire_dropped_sessions(self) -> None:
        while not self._stopped.wait(min(1.0, self.resume_grace / 4)):
            self._resumable.expire()


def _checked_mock(mock: torch.Tensor | None, real: torch.Tensor, tags: Iterable[str]) -> torch.Tensor | None:
    """A mock as it is kept (on the CPU, detached), once it has the real tensor's shape and dtype."""
    if mock is None:
        return None
    name = next(iter(tags), "the tensor")
    if not isinstance(mock, torch.Tensor):
        raise TypeError(f"the mock of {name!r} must be a torch.Tensor, not {type(mock).__qualname__}")
    if mock.shape != real.shape or mock.dtype != real.dtype:
        raise ValueError(f"the mock of {name!r} must have the real data's shape and dtype, "
                         f"{tuple(real.shape)} {real.dtype}: it has {tuple(mock.shape)} {mock.dtype}")
    return mock.detach().to("cpu", copy=True).contiguous()


def describe_bytes(n: int | None) -> str:
    return "any amount (no limit)" if n is None else budget.describe(n)


def _size(value: int | str | None, total: int | None, default_share: float = budget.DEFAULT_SHARE) -> int | None:
    """A limit as given (bytes, "8GiB", "80%" of `total`; 0: none), or by default a share of `total`."""
    if value is None:
        return int(total * default_share) if total else None
    return budget.parse_size(value, total)


def _encode_replies(protocol: ServerProtocol, replies: list) -> list:
    try:
        return protocol.send(replies)
    except codec.EncodeError:  # one unsendable value must not lose the other replies
        safe = []
        for r in replies:
            try:
                codec.encode([r])
                safe.append(r)
            except codec.EncodeError as e:
                safe.append(m.Failure(r.req_id, None, to_info(TypeError(str(e)))))
        return protocol.send(safe)


def _printable(name: str, limit: int = 64) -> str:
    """A client-chosen name, safe to put in logs and tables."""
    return re.sub(r"[^\w.@:+-]", "_", name[:limit]) or "client"


def _try_send(conn: ServedConnection, chunks: list) -> None:
    try:
        conn.send(chunks)
    except ConnectionClosed:
        pass


def _make_logger(worker_id: str, verbose: bool, log_file: str | None) -> logging.Logger:
    """The worker's log: with --verbose or --log-file, its own handlers, and nothing passed on to
    the root logger's (which would print every line a second time)."""
    log = logging.getLogger(f"torchremote.worker.{worker_id}")
    for handler in [h for h in log.handlers if getattr(h, "_torchremote", False)]:
        log.removeHandler(handler)  # a worker of the same name started earlier in this process
        handler.close()
    log.setLevel(logging.NOTSET)
    log.propagate = True
    # each command's line (`execution.Session.command_log`): on with --verbose or --log-file only,
    # even when the console asks the worker's log for its INFO lines
    log.getChild("commands").setLevel(logging.INFO if verbose or log_file else logging.WARNING)
    if verbose or log_file:
        log.setLevel(logging.INFO)
        log.propagate = False
        formatter = logging.Formatter(LOG_FORMAT)
        handlers: list[logging.Handler] = []
        if verbose:
            handlers.append(logging.StreamHandler())
        if log_file:
            handlers.append(logging.FileHandler(log_file))
        for handler in handlers:
            handler.setFormatter(formatter)
            handler._torchremote = True  # type: ignore[attr-defined]
            log.addHandler(handler)
    return log
