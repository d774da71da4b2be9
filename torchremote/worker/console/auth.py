"""Who may use the owner's console: one-time sign-in links, the owner token, sessions, CSRF tokens.

As Jupyter does it: the worker prints a link carrying a one-time token; opening it (or typing the
owner token into the sign-in form) starts a session, kept in an HttpOnly, SameSite=Strict cookie.
Every state-changing request must carry that session's CSRF token. A client token never signs in:
it lets a client compute, not decide what leaves. Failed sign-ins are counted per peer address and
refused for a while past a few.
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

LINK_LIFETIME_S = 24 * 3600      # an unused sign-in link
SESSION_LIFETIME_S = 12 * 3600   # a signed-in browser
MAX_FAILURES = 5                 # failed sign-ins per peer within FAILURE_WINDOW_S, then refused for the rest
FAILURE_WINDOW_S = 60.0


class SignInRefused(Exception):
    """Why a sign-in failed: said to the browser and written to the worker's log."""

    def __init__(self, why: str, limited: bool = False) -> None:
        super().__init__(why)
        self.limited = limited  # refused for too many failures: HTTP 429


@dataclass
class ConsoleSession:
    id: str
    csrf: str
    how: str                      # "sign-in link" or "owner token"
    peer: str
    started: float = field(default_factory=time.monotonic)


class ConsoleAuth:
    def __init__(self, owner_token: bytes | None, client_token: bytes | None) -> None:
        self._owner_token = owner_token
        self._client_token = client_token
        self._links: dict[str, float] = {}               # one-time token -> when issued
        self._sessions: dict[str, ConsoleSession] = {}
        self._failures: dict[str, deque] = {}             # peer address -> times of its failed sign-ins
        self._lock = threading.Lock()

    def new_link_token(self) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._links[token] = time.monotonic()
        return token

    def sign_in(self, presented: str, peer: str) -> ConsoleSession:
        """A new session for a valid one-time token (used up) or the owner token; else `SignInRefused`."""
        now = time.monotonic()
        with self._lock:
            failures = self._failures.setdefault(peer, deque())
            while failures and now - failures[0] > FAILURE_WINDOW_S:
                failures.popleft()
            if len(failures) >= MAX_FAILURES:
                wait = FAILURE_WINDOW_S - (now - failures[0])
                raise SignInRefused(f"too many failed sign-ins from {peer}: try again in {wait:.0f} s", limited=True)
            how = self._check(presented.encode(), now)
            if how is None:
                failures.append(now)
                if self._client_token is not None and hmac.compare_digest(presented.encode(), self._client_token):
                    raise SignInRefused("a client token cannot sign in to the owner's console: use the sign-in "
                                        "link the worker printed, or the owner token")
                raise SignInRefused("wrong, used or expired sign-in token")
            session = ConsoleSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32), how, peer)
            self._sessions[session.id] = session
            return session

    def _check(self, presented: bytes, now: float) -> str | None:
        for token, issued in list(self._links.items()):
            if now - issued > LINK_LIFETIME_S:
                del self._links[token]
            elif hmac.compare_digest(presented, token.encode()):
                del self._links[token]  # one-time
                return "sign-in link"
        if self._owner_token is not None and presented and hmac.compare_digest(presented, self._owner_token):
            return "owner token"
        return None

    def failures(self, peer: str) -> int:
        with self._lock:
            return len(self._failures.get(peer, ()))

    def session(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and time.monotonic() - session.started > SESSION_LIFETIME_S:
                del self._sessions[session_id]
                return None
            return session

    def is_owner_token(self, presented: str) -> bool:
        return self._owner_token is not None and bool(presented) and hmac.compare_digest(
            presented.encode(), self._owner_token)

    def sign_out(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)


def csrf_ok(session: ConsoleSession, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(presented.encode(), session.csrf.encode())
