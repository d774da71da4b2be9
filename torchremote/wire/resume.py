"""Resumable sessions: a dropped connection is not a lost session.

Each side numbers the data frames it sends in a session (0, 1, 2, ... across every connection the
session uses) and keeps each one in a `ReplayLog` until the other side acknowledges it (`m.Ack`).
When a connection drops, the client reconnects with the session's secret resume token and the count
of the worker's frames it received; the worker answers with the count of the client's frames it has
run. Each side then sends again exactly the frames the other lacks, in order, so every op runs once:
a frame the worker ran before the drop is never sent again, and a reply that was lost is.

Kept frames may point into tensors (zero-copy sends). A frame is *frozen* (copied to bytes) before
its tensors may change under it, so that a replay sends what was first sent.
"""
from __future__ import annotations

import collections
import secrets
import threading

from .errors import ProtocolError

DEFAULT_GRACE_S = 60.0       # how long a worker keeps the objects of a client whose connection dropped
ACK_EVERY_FRAMES = 16        # a worker acknowledges at least this often when it has nothing to reply
ACK_EVERY_BYTES = 1 << 20    # ... and after this much data


def new_token() -> str:
    return secrets.token_urlsafe(32)


def payload_bytes(chunks: list) -> int:
    """Bytes a frame carries beyond its first chunk (the message itself): the tensors it points into."""
    return sum(len(c) for c in chunks[1:])


def frozen(chunks: list) -> list:
    """The frame as one bytes object, no longer pointing into any tensor."""
    return chunks if len(chunks) == 1 and isinstance(chunks[0], bytes) else [b"".join(chunks)]


class ReplayLog:
    """The frames one side sent in a session and the other has not acknowledged yet.

    Callers serialise `add` with their sends (frame numbers must follow the order on the wire);
    `acknowledge` may come from another thread."""

    def __init__(self) -> None:
        self.sent = 0   # frames numbered so far
        self._frames: collections.deque[tuple[int, list]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, chunks: list) -> int:
        """Keep a frame about to be sent; returns its number."""
        with self._lock:
            number = self.sent
            self._frames.append((number, chunks))
            self.sent += 1
            return number

    def acknowledge(self, count: int) -> None:
        """The other side has the first `count` frames: forget them."""
        with self._lock:
            while self._frames and self._frames[0][0] < count:
                self._frames.popleft()

    def since(self, count: int) -> list[list]:
        """The frames from number `count` on, to send again after a reconnect."""
        with self._lock:
            first = self._frames[0][0] if self._frames else self.sent
            if not first <= count <= self.sent:
                raise ProtocolError(f"cannot resume from frame {count}: frames {first} to {self.sent} are kept")
            return [chunks for number, chunks in self._frames if number >= count]

    def freeze(self) -> None:
        """Copy every kept frame that points into tensors (before those tensors may change)."""
        with self._lock:
            if any(payload_bytes(chunks) for _, chunks in self._frames):
                self._frames = collections.deque((n, frozen(c)) for n, c in self._frames)

    @property
    def kept(self) -> int:
        return len(self._frames)
