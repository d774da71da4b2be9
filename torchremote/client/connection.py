"""The client's side of one connection: opening it, and which thread reads and writes it when.

No thread hands a reply to another on the way to the caller that waits for it:
- a caller waiting for a reply reads the socket itself (the *leader*; other callers waiting at the
  same time get their replies from it, and one of them leads once it is done);
- ops that need no reply are sent in batches by a background *pump* thread, which also reads the
  socket when no caller waits (answering the worker's pings, collecting failures of asynchronous ops)
  and pings a worker that has been quiet too long.

A dropped connection is resumed here (`resume.py` says how): every frame sent is kept until the
worker acknowledges it; the reader that finds the connection gone reconnects with back-off, for up
to the worker's grace period, and sends again what the worker did not run. Callers see a pause
and one warning line. Only readers resume (a sender whose write fails leaves its frame in the log
and wakes one), so the count of frames received is never read while a reader changes it.

No asyncio loop runs anywhere, so this works where one already runs (Jupyter).
"""
from __future__ import annotations

import logging
import ssl as ssl_module
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from ..wire import messages as m
from ..wire.errors import SessionInUseError, TorchRemoteError, WorkerConnectionError
from ..wire.resume import ReplayLog, frozen, payload_bytes
from ..wire.websocket import CloseCode, ConnectionClosed, Placement, WebSocket, close_socket, open_client

log = logging.getLogger("torchremote")

TICK_S = 1.0                 # how long a reader blocks before looking at the keepalive clocks
RELEASE_POLL_S = 0.05        # how often the idle pump looks for released pointers and input
COALESCE_S = 0.0005          # while ops keep coming, the pump sends what gathered this often
IDLE_POLLS = 20              # empty polls after which the pump sleeps until woken
RECONNECT_DELAY_S = (0.05, 1.0)   # back-off between attempts to resume: first, most

# reconnect(received) -> (websocket, frames of ours the worker has run): a new connection that has
# taken up this session (raises what `open_client` and the handshake raise)
Reconnect = Callable[[int], tuple[WebSocket, int]]


def send_chunks(ws: WebSocket, chunks: list) -> None:
    """Send the buffers of one frame as one websocket message."""
    ws.send(chunks)


class ClientConnection:
    """Drives one `WebSocket` for a `Worker`. The worker supplies what the I/O needs from it:

    - `on_message(message)`: decode a message and deliver what it holds;
    - `flush()`: send whatever is queued; `has_queued()`: whether anything is;
    - `on_lost(error)`: fail every waiting caller, the connection is gone;
    - `placement`: where the bytes of large replies go (`websocket.Placement`).
    """

    def __init__(self, ws: WebSocket, name: str, url: str, *, reconnect: Reconnect | None = None,
                 grace_s: float = 0.0) -> None:
        self.ws = ws
        self.name = name
        self.url = url
        self._reconnect = reconnect             # None: a drop ends the session
        self._grace_s = grace_s
        self.sent = ReplayLog()                 # our frames the worker has not acknowledged
        self.received = 0                       # the worker's frames received, in this session
        self._ack_sent = 0                      # the count we last told the worker
        self.send_lock = threading.Lock()       # one frame on the socket at a time, in number order
        self._lost_error: WorkerConnectionError | None = None
        self.resuming = False                   # a reader is reconnecting
        self._read_lock = threading.Lock()       # held by whichever thread reads the socket
        self._turn = threading.Condition()       # callers waiting for the reader to finish
        self._waiting = 0                        # callers waiting for a reply
        self._count_lock = threading.Lock()
        self._wake = threading.Event()           # wakes an idle pump
        self.pump_idle = True
        self._stopping = False
        self._pump: threading.Thread | None = None

    def start(self, *, on_message: Callable[[Any], None], flush: Callable[[], None],
              has_queued: Callable[[], bool], on_lost: Callable[[WorkerConnectionError], None],
              placement: Placement) -> None:
        self._on_message, self._flush, self._has_queued = on_message, flush, has_queued
        self._on_lost, self._placement = on_lost, placement
        self._pump = threading.Thread(target=self._pump_loop, name=f"torchremote-pump-{self.name}", daemon=True)
        self._pump.start()

    def wake(self) -> None:
        """A caller queued an op: make sure a sleeping pump sends it soon."""
        if self.pump_idle:
            self._wake.set()

    # --- sending, and what the worker acknowledges ---
    def send_locked(self, chunks: list, *, caller_waits: bool = False) -> None:
        """Send one frame, `send_lock` held. The frame is kept for a replay, copied if it points
        into tensors the caller may change once it returns (unless the caller waits until the
        worker has run it). A failed write is not an error here: the frame is kept, and the reader
        that finds the connection dropped resumes and sends it again. Without resuming, it raises
        `WorkerConnectionError`; the caller fails the waiters after letting the send lock go."""
        if self._lost_error is not None:
            raise WorkerConnectionError(str(self._lost_error))
        if self._reconnect is not None and not caller_waits and payload_bytes(chunks):
            chunks = frozen(chunks)
        if self._reconnect is not None:
            self.sent.add(chunks)
        ws = self.ws
        try:
            ws.send(chunks)
        except ConnectionClosed as e:
            if self._reconnect is None:  # the caller reports it (on_lost) once the send lock is free
                if self._lost_error is None:
                    self._lost_error = WorkerConnectionError(
                        f"lost the connection to worker {self.name!r} at {self.url}: {e}")
                raise WorkerConnectionError(str(self._lost_error)) from e
            close_socket(ws.sock)  # a reader blocked on it returns, and resumes
            self._wake.set()

    def take_ack(self) -> int | None:
        """How many of the worker's frames we have, if the worker has not been told yet."""
        if self._reconnect is None or self.received == self._ack_sent:
            return None
        self._ack_sent = self.received
        return self._ack_sent

    def acknowledged(self, count: int) -> None:
        """The worker has run our first `count` frames."""
        self.sent.acknowledge(count)

    # --- waiting for a reply, reading the socket meanwhile ---
    def wait(self, future: Future) -> Any:
        """The future's result; the calling thread reads the socket until it is set."""
        with self._count_lock:
            self._waiting += 1
        following = False
        try:
            while not future.done():
                if self._read_lock.acquire(blocking=False):
                    try:
                        while not future.done():
                            self._read(TICK_S)
                    finally:
                        self._read_lock.release()
                        with self._turn:
                            self._turn.notify_all()
                else:
                    if not following:  # wake when the reader delivers this reply
                        future.add_done_callback(self._wake_followers)
                        following = True
                    with self._turn:  # ...or stops reading, and this thread may lead
                        while not future.done() and self._read_lock.locked():
                            self._turn.wait(TICK_S)
        finally:
            with self._count_lock:
                self._waiting -= 1
        return future.result()

    def _wake_followers(self, _: Future) -> None:
        with self._turn:
            self._turn.notify_all()

    def _read(self, timeout: float) -> None:
        """Read and handle one message; when none comes within `timeout`, tend the keepalive.
        A dropped connection is resumed here; one that cannot be fails every waiter (through
        `on_lost`), this one included. The read lock is held."""
        ws = self.ws
        try:
            message = ws.receive(timeout, self._placement)
            if message is None:
                ws.keepalive()
                return
        except ConnectionClosed as e:
            if ws.close_code == CloseCode.NORMAL_CLOSURE and ws.close_reason == m.SHUTDOWN_REASON:
                self._lost(f"worker {self.name!r} shut down", shut_down=True)  # nothing left to resume
                return
            self._resume(ws, str(e))
            return
        self.received += 1
        self._on_message(message)

    def _resume(self, dropped: WebSocket, why: str) -> None:
        """Take the session up again on a new connection (read lock held): reconnect with back-off
        until the worker's grace period ends, then send again the frames it has not run."""
        if dropped is not self.ws or self._lost_error is not None:
            return  # resumed already, or given up
        if self._reconnect is None or self._stopping:
            self._lost(why)
            return
        close_socket(dropped.sock)  # a sender blocked on it returns
        started = time.monotonic()
        deadline = started + self._grace_s
        log.warning("torchremote: lost the connection to worker %r (%s); reconnecting for up to %g s",
                    self.name, why, self._grace_s)
        self.resuming = True
        try:
            self._reconnect_and_replay(started, deadline, why)
        finally:
            self.resuming = False

    def _reconnect_and_replay(self, started: float, deadline: float, why: str) -> None:
        """Attempts until one resumes, the session is gone, or `deadline` passes. A failure is
        reported after the send lock is let go: reporting takes the session's lock, which a caller
        flushing a batch holds while it waits for the send lock."""
        with self.send_lock:
            failure = self._attempt_resumes(started, deadline, why)
        if failure is not None:
            self._lost(failure)

    def _attempt_resumes(self, started: float, deadline: float, why: str) -> str | None:
        """None once resumed; otherwise why the session is lost. The send lock is held."""
        delay, most = RECONNECT_DELAY_S
        last = ""
        while not self._stopping:
            try:
                ws, processed = self._reconnect(self.received)
            except SessionInUseError as e:  # the worker has not seen the old connection drop yet
                last = str(e)
            except TorchRemoteError as e:  # the session is gone, or the worker refuses
                return f"{why}; resuming failed: {e}"
            except ConnectionRefusedError:  # the host is there and nothing listens: the worker is gone
                return f"{why}; nothing listens at {self.url} any more"
            except (OSError, TimeoutError, ConnectionClosed) as e:  # not reachable yet
                last = str(e) or type(e).__name__
            else:
                try:
                    self.acknowledged(processed)
                    for frame in self.sent.since(processed):
                        ws.send(frame)
                except ConnectionClosed:
                    close_socket(ws.sock)
                except TorchRemoteError as e:
                    close_socket(ws.sock)
                    return f"{why}; resuming failed: {e}"
                else:
                    self.ws = ws
                    log.info("torchremote: resumed the session with worker %r after %.2f s",
                             self.name, time.monotonic() - started)
                    return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return (f"{why}; no resume within the worker's grace period of {self._grace_s:g} s "
                        f"(last attempt: {last})")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, most)
        return why

    def _lost(self, why: str, shut_down: bool = False) -> None:
        if self._lost_error is None:
            self._lost_error = WorkerConnectionError(
                f"{why} (it closed the connection at {self.url}); reconnect once it is back" if shut_down
                else f"lost the connection to worker {self.name!r} at {self.url}: {why}")
        self._on_lost(self._lost_error)

    # --- the pump: batches out, input in while nobody waits ---
    def _pump_loop(self) -> None:
        """While ops keep coming it polls every COALESCE_S: a burst gathers into one frame, and callers
        never pay to wake this thread. After IDLE_POLLS empty polls it sleeps until a caller sets
        `_wake` (or RELEASE_POLL_S passes: released pointers, input, keepalive)."""
        empty = 0
        while not self._stopping and self._lost_error is None:
            if self.pump_idle:
                self._wake.wait(RELEASE_POLL_S)
                self._wake.clear()
                self.pump_idle = False
            time.sleep(COALESCE_S)
            self._read_if_nobody_waits()
            if not self._has_queued():
                empty += 1
                if empty >= IDLE_POLLS:
                    self.pump_idle = True
                    if not self._has_queued():  # a caller that queued before seeing the flag
                        continue
                    self.pump_idle = False
                else:
                    continue
            empty = 0
            try:
                self._flush()
            except WorkerConnectionError:
                return

    def _read_if_nobody_waits(self) -> None:
        if self._waiting or (not self.ws.readable(0) and not self._keepalive_due()):
            return
        if not self._read_lock.acquire(blocking=False):
            return
        ws = self.ws
        try:
            while not self._waiting and self._lost_error is None and self.ws.readable(0):
                self._read(0)
            ws = self.ws
            if ws.closed is None:
                ws.keepalive()
        except ConnectionClosed as e:
            self._resume(ws, str(e))
        finally:
            self._read_lock.release()
            with self._turn:
                self._turn.notify_all()

    def _keepalive_due(self) -> bool:
        return time.monotonic() - self.ws.last_received > TICK_S

    def close(self) -> None:
        """Close the socket (a reader blocked in it returns) and stop the pump; a resume under way
        gives up."""
        self._stopping = True
        self._wake.set()
        self.ws.close()
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join(timeout=5)


def open_connection(url: str, *, timeout: float, retry_for: float, ssl: ssl_module.SSLContext | None,
                    max_size: int) -> WebSocket:
    """Open the websocket, retrying with back-off while nothing listens yet, for `retry_for` s."""
    from websockets.exceptions import InvalidHandshake, InvalidURI
    deadline = time.monotonic() + retry_for
    delay = 0.1
    while True:
        try:
            return open_client(url, timeout=timeout, ssl=ssl, max_size=max_size)
        except ssl_module.SSLError as e:  # a certificate problem does not go away by waiting
            raise WorkerConnectionError(f"TLS with the worker at {url} failed: {e}") from e
        except InvalidURI as e:
            raise WorkerConnectionError(f"cannot connect to a worker at {url}: {e}") from e
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as e:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waited = f" (retried for {retry_for:g} s)" if retry_for else ""
                raise WorkerConnectionError(f"cannot connect to a worker at {url}{waited}: {e}") from e
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)
        except Exception as e:
            raise WorkerConnectionError(f"cannot connect to a worker at {url}: {e}") from e
