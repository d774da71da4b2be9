"""The client's side of one connection: opening it, and which thread reads and writes it when.

No thread hands a reply to another on the way to the caller that waits for it:
- a caller waiting for a reply reads the socket itself (the *leader*; other callers waiting at the
  same time get their replies from it, and one of them leads once it is done);
- ops that need no reply are sent in batches by a background *pump* thread, which also reads the
  socket when no caller waits (answering the worker's pings, collecting failures of asynchronous ops)
  and pings a worker that has been quiet too long.

No asyncio loop runs anywhere, so this works where one already runs (Jupyter).
"""
from __future__ import annotations

import ssl as ssl_module
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from .errors import WorkerConnectionError
from .websocket import ConnectionClosed, Placement, WebSocket, open_client

TICK_S = 1.0                 # how long a reader blocks before looking at the keepalive clocks
RELEASE_POLL_S = 0.05        # how often the idle pump looks for released pointers and input
COALESCE_S = 0.0005          # while ops keep coming, the pump sends what gathered this often
IDLE_POLLS = 20              # empty polls after which the pump sleeps until woken


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

    def __init__(self, ws: WebSocket, name: str, url: str) -> None:
        self.ws = ws
        self.name = name
        self.url = url
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
        A lost connection fails every waiter (through `on_lost`), this one included."""
        try:
            message = self.ws.receive(timeout, self._placement)
            if message is None:
                self.ws.keepalive()
                return
        except ConnectionClosed as e:
            self._lost(str(e))
            return
        self._on_message(message)

    def _lost(self, why: str) -> None:
        self._on_lost(WorkerConnectionError(f"lost the connection to worker {self.name!r} at {self.url}: {why}"))

    # --- the pump: batches out, input in while nobody waits ---
    def _pump_loop(self) -> None:
        """While ops keep coming it polls every COALESCE_S: a burst gathers into one frame, and callers
        never pay to wake this thread. After IDLE_POLLS empty polls it sleeps until a caller sets
        `_wake` (or RELEASE_POLL_S passes: released pointers, input, keepalive)."""
        empty = 0
        while not self._stopping and self.ws.closed is None:
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
        try:
            while not self._waiting and self.ws.closed is None and self.ws.readable(0):
                self._read(0)
            if self.ws.closed is None:
                self.ws.keepalive()
        except ConnectionClosed as e:
            self._lost(str(e))
        finally:
            self._read_lock.release()
            with self._turn:
                self._turn.notify_all()

    def _keepalive_due(self) -> bool:
        return time.monotonic() - self.ws.last_received > TICK_S

    def close(self) -> None:
        """Close the socket (a reader blocked in it returns) and stop the pump."""
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
