"""The worker's side of its connections: listening, TLS, the opening handshake, and one thread per
connection that reads a batch, runs it and writes the replies itself (no hand-off between threads).

While a connection's thread runs a long batch it cannot answer pings, so a `Heartbeat` thread sends
that client unsolicited pongs (RFC 6455 allows them) to show the worker is alive; a quiet client is
pinged, and one that stops answering is dropped.
"""
from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any, Callable, Iterator

from ..wire import messages as m
from ..wire import websocket
from ..wire.websocket import ConnectionClosed, Placement, WebSocket, accept_server, close_socket

ACCEPT_POLL_S = 0.2      # how often the accepting thread looks whether the worker stops


class ServedConnection:
    """One client's connection, as its serving thread sees it."""

    def __init__(self, ws: WebSocket, peer: str) -> None:
        self.ws = ws
        self.peer = peer
        self.busy_since: float | None = None  # set while a batch runs

    def messages(self, placement: Placement | None) -> Iterator[Any]:
        """Each message the client sends, until the connection ends (`ConnectionClosed`). A quiet
        client is pinged meanwhile, and dropped when it stops answering."""
        while True:
            self.busy_since = None
            message = self.ws.receive(websocket.PING_INTERVAL_S / 4, placement)
            if message is None:
                self.ws.keepalive()
                continue
            self.busy_since = time.monotonic()
            yield message

    def receive(self, timeout: float) -> Any:
        return self.ws.receive(timeout)

    def send(self, chunks: list) -> None:
        self.ws.send(chunks)

    def close(self, reason: str = "") -> None:
        self.ws.close(reason=reason)


class Listener:
    """Accepts connections on `host:port` and serves each with `serve(connection)` on its own thread."""

    def __init__(self, host: str, port: int, serve: Callable[[ServedConnection], None], *,
                 tls: ssl.SSLContext | None, max_size: int, name: str) -> None:
        self._serve = serve
        self._tls = tls
        self._max_size = max_size
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=128)
        self.socket.settimeout(ACCEPT_POLL_S)
        self.port: int = self.socket.getsockname()[1]
        self._connections: set[ServedConnection] = set()
        self._threads: set[threading.Thread] = set()  # one per connection, handshake included
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._accepting = threading.Thread(target=self._accept_loop, name=f"torchremote-accept-{name}", daemon=True)
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"torchremote-heartbeat-{name}",
                                           daemon=True)
        self._accepting.start()
        self._heartbeat.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, and wait (up to `timeout`) for their threads to
        free their clients: a process that exits while one of them is still inside torch aborts."""
        deadline = time.monotonic() + timeout
        self._stopped.set()
        self._accepting.join(timeout=timeout)
        self.socket.close()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for conn in connections:
            conn.close(reason=m.SHUTDOWN_REASON)  # a normal close (1000): the client does not try to resume
        for thread in [*threads, self._heartbeat]:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, address = self.socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopped.is_set():
                    return
                time.sleep(ACCEPT_POLL_S)  # out of file descriptors, say: try again shortly
                continue
            peer = f"{address[0]}:{address[1]}"
            thread = threading.Thread(target=self._run, args=(sock, peer), name=f"torchremote-conn-{peer}",
                                      daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _run(self, sock: socket.socket, peer: str) -> None:
        try:
            self._serve_socket(sock, peer)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _serve_socket(self, sock: socket.socket, peer: str) -> None:
        """The handshakes (TLS, HTTP upgrade) on this connection's own thread: a slow or hostile
        peer never holds up the accepting thread."""
        try:
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            sock.settimeout(None)
            ws = accept_server(sock, timeout=m.HANDSHAKE_TIMEOUT_S, max_size=self._max_size)
        except Exception:  # not a websocket client, a TLS failure, a timeout: nothing to serve
            close_socket(sock)
            return
        conn = ServedConnection(ws, peer)
        with self._lock:
            if self._stopped.is_set():
                ws.close()
                return
            self._connections.add(conn)
        try:
            self._serve(conn)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _heartbeat_loop(self) -> None:
        while not self._stopped.wait(min(1.0, heartbeat_s() / 2)):
            now, every = time.monotonic(), heartbeat_s()
            with self._lock:
                busy = [c for c in self._connections
                        if c.busy_since is not None and now - c.busy_since > every
                        and now - c.ws.last_sent > every]
            for conn in busy:
                try:
                    conn.ws.heartbeat()
                except ConnectionClosed:
                    pass


def heartbeat_s() -> float:
    """How often a busy connection tells its client it is alive: twice per ping interval."""
    return websocket.PING_INTERVAL_S / 2
