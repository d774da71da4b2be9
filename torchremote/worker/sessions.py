"""The worker's resumable sessions: kept across connections, and for a grace period after a drop.

What the frames and acknowledgements mean is the wire's (`wire/resume.py`); this is the worker's
table of sessions by resume token, and when a dropped one is freed.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..wire.errors import SessionInUseError, WorkerConnectionError
from ..wire.resume import ACK_EVERY_BYTES, ACK_EVERY_FRAMES, ReplayLog, new_token


@dataclass
class ResumableSession:
    """One client's session as the worker keeps it across connections."""
    token: str
    session: Any                     # execution.Session
    replies: ReplayLog = field(default_factory=ReplayLog)
    processed: int = 0               # client frames run
    unacknowledged: int = 0          # ... of which the client has not been told (frames)
    unacknowledged_bytes: int = 0
    live: bool = True                # a connection serves it now
    dropped_at: float = 0.0

    def ack_due(self) -> bool:
        return (self.unacknowledged >= ACK_EVERY_FRAMES or
                (self.unacknowledged > 0 and self.unacknowledged_bytes >= ACK_EVERY_BYTES))


class SessionTable:
    """The worker's resumable sessions, by token; those whose connection dropped wait here for a
    resume, and are freed (`free(session)`) once `grace_s` passes without one."""

    def __init__(self, grace_s: float, free: Callable[[ResumableSession, str], None]) -> None:
        self.grace_s = grace_s
        self._free = free
        self._sessions: dict[str, ResumableSession] = {}
        self._lock = threading.Lock()

    def open(self, session: Any) -> ResumableSession:
        state = ResumableSession(new_token() if self.grace_s > 0 else "", session)
        if state.token:
            with self._lock:
                self._sessions[state.token] = state
        return state

    def attach(self, token: str) -> ResumableSession:
        """The session a resume token names, now served by the caller's connection."""
        with self._lock:
            state = self._find(token)
            if state is None:
                raise WorkerConnectionError(
                    "this session cannot be resumed: the worker no longer has it (its grace period "
                    "passed, or the worker restarted)")
            if state.live:
                raise SessionInUseError("this session's connection is still live; a resume token works "
                                        "only once that connection has dropped")
            state.live = True
            return state

    def sessions(self) -> list[ResumableSession]:
        with self._lock:
            return list(self._sessions.values())

    def _find(self, token: str) -> ResumableSession | None:
        for known, state in self._sessions.items():  # compare_digest: no timing hints about tokens
            if secrets.compare_digest(known.encode(), token.encode()):
                return state
        return None

    def park(self, state: ResumableSession) -> None:
        """Its connection dropped: keep it for `grace_s`."""
        with self._lock:
            state.live = False
            state.dropped_at = time.monotonic()

    def end(self, state: ResumableSession) -> None:
        """It ended (closed by the client, or a fault): no resume any more."""
        with self._lock:
            self._sessions.pop(state.token, None)

    def expire(self, now: float | None = None) -> None:
        """Free every parked session whose grace period has passed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [s for s in self._sessions.values() if not s.live and now - s.dropped_at >= self.grace_s]
            for state in expired:
                del self._sessions[state.token]
        for state in expired:
            self._free(state, f"no resume within {self.grace_s:g} s")

    def close(self) -> None:
        """The worker stops: free every parked session."""
        with self._lock:
            parked = [s for s in self._sessions.values() if not s.live]
            self._sessions.clear()
        for state in parked:
            self._free(state, "the worker stopped")
