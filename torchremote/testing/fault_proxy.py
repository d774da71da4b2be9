"""A TCP proxy on 127.0.0.1 that breaks connections on cue, to show what a client and a worker do
when the network fails: cut every connection now, cut one after N more bytes in one direction (in
mid-frame), cut new connections during their handshake, refuse them, or stall (forward nothing,
close nothing). The test suite and the bench use it; it only ever listens and connects on loopback.

    proxy = FaultProxy(worker.port)          # clients connect to proxy.url instead of worker.url
    proxy.cut_after(TO_WORKER, 10 << 20)     # the next 10 MiB towards the worker pass, then a cut
    proxy.stop()
"""
from __future__ import annotations

import select
import socket
import threading
import time

TO_WORKER = "to worker"
TO_CLIENT = "to client"
POLL_S = 0.05


class _Link:
    """One client connection and its twin towards the worker."""

    def __init__(self, client: socket.socket, worker: socket.socket, handshake_budget: int | None) -> None:
        self.sockets = {TO_WORKER: (client, worker), TO_CLIENT: (worker, client)}
        self.handshake_budget = handshake_budget  # bytes towards the worker before a cut, if armed
        self.stalled = False
        self.dead = False


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_S)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._budgets: dict[str, int] = {}        # direction -> bytes still to pass before a cut
        self._handshake_cuts: list[int] = []      # for each next connection: bytes before a cut
        self._refusing = False
        self._stopped = threading.Event()
        self.connections = 0                      # accepted so far
        self.cuts = 0                             # connections this proxy cut so far
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True, name="fault-proxy-accept")]
        self._threads[0].start()

    # --- faults ---
    def cut(self) -> None:
        """Cut every live connection now, both ways."""
        with self._lock:
            links = [link for link in self._links if not link.dead]
        for link in links:
            self._cut(link, injected=True)

    def cut_after(self, direction: str, nbytes: int) -> None:
        """Let `nbytes` more bytes pass in `direction` (TO_WORKER or TO_CLIENT), then cut the
        connection carrying them. 0: cut at the next byte, which is dropped."""
        with self._lock:
            self._budgets[direction] = nbytes

    def cut_handshakes(self, count: int, after: int = 0) -> None:
        """Cut each of the next `count` new connections once `after` bytes went to the worker."""
        with self._lock:
            self._handshake_cuts.extend([after] * count)

    def refuse(self, refusing: bool = True) -> None:
        """While set, accept new connections and close them at once (a worker that is unreachable)."""
        self._refusing = refusing

    def stall(self) -> None:
        """Forward nothing more on the live connections, and close nothing: a silent network."""
        with self._lock:
            for link in self._links:
                link.stalled = True

    def armed(self) -> bool:
        """Whether a byte-count cut is still waiting for its bytes."""
        with self._lock:
            return bool(self._budgets) or bool(self._handshake_cuts)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            links = list(self._links)
        for link in links:
            self._cut(link, injected=False)
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- forwarding ---
    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if self._refusing:
                _close(client)
                continue
            try:
                worker = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                budget = self._handshake_cuts.pop(0) if self._handshake_cuts else None
                link = _Link(client, worker, budget)
                self._links = [k for k in self._links if not k.dead] + [link]
                self.connections += 1
            for direction in (TO_WORKER, TO_CLIENT):
                thread = threading.Thread(target=self._forward, args=(link, direction), daemon=True,
                                          name=f"fault-proxy-{direction}")
                thread.start()
                self._threads.append(thread)

    def _forward(self, link: _Link, direction: str) -> None:
        source, destination = link.sockets[direction]
        while not link.dead:
            if link.stalled:
                time.sleep(POLL_S)
                continue
            try:
                if not select.select([source], [], [], POLL_S)[0]:
                    continue
                data = source.recv(1 << 16)
            except (OSError, ValueError):  # closed by a cut meanwhile
                break
            if not data:
                break
            data, cut = self._pass(link, direction, data)
            try:
                if data:
                    destination.sendall(data)
            except OSError:
                break
            if cut:
                self._cut(link, injected=True)
                return
        self._cut(link, injected=False)  # one side closed: so does the other

    def _pass(self, link: _Link, direction: str, data: bytes) -> tuple[bytes, bool]:
        """What of `data` goes through, and whether the connection is cut after it."""
        with self._lock:
            if link.stalled:
                return b"", False
            limits = [self._budgets[direction]] if direction in self._budgets else []
            if direction == TO_WORKER and link.handshake_budget is not None:
                limits.append(link.handshake_budget)
            if not limits:
                return data, False
            limit = min(limits)
            cut = limit == 0 or len(data) > limit
            passed = data[:limit] if cut else data
            if direction == TO_WORKER and link.handshake_budget is not None:
                link.handshake_budget -= len(passed)
            if direction in self._budgets:
                self._budgets[direction] -= len(passed)
                if cut and self._budgets[direction] <= 0:
                    del self._budgets[direction]
            return passed, cut

    def _cut(self, link: _Link, injected: bool) -> None:
        with self._lock:
            if link.dead:
                return
            link.dead = True
            self.cuts += injected
        for sock in link.sockets[TO_WORKER]:
            _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
