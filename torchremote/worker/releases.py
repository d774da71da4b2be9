"""Requests to release private-derived data, and the owner's decisions on them.

A client that wants the value of something derived from private data (a fetch, `item()`, a move
to another worker, a data-dependent shape) needs a request the owner approved: by hand
(`server.approve(id)`, or `torchremote approve URL ID` with the owner token), or by a rule of his
own in Python (`server.auto_approve(rule)`). An approval releases the object as it is at that
moment, once: a later in-place change needs a new request. Pending and denied requests never block
computation. Every request and decision is logged.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..wire import messages as m
from ..wire.errors import ApprovalRequired, WorkerPermissionError
from ..wire.messages import object_id
from .provenance import Derived

PENDING, APPROVED, DENIED, RELEASED = "pending", "approved", "denied", "released"


@dataclass
class ReleaseRequest:
    """What the owner sees of one request."""
    id: int
    client: str
    object: str
    reason: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int
    lineage: str
    sources: tuple[str, ...]
    steps: int = 0                     # backward passes in its history
    status: str = PENDING
    decided_by: str = ""
    note: str = ""                     # the owner's reason, for a denial
    failure: str = ""                  # an op in its history failed (so): the owner's eyes only
    filed_at: float = field(default_factory=time.time)
    decided_at: float | None = None    # when approved or denied (time.time())
    _tensor: Any = field(default=None, repr=False)       # the object, while it may be released
    _version: int | None = field(default=None, repr=False)  # its version when approved

    def row(self, for_owner: bool = False) -> m.ReleaseInfo:
        """The request as its client sees it, or (`for_owner`) as the owner does, failure included."""
        return m.ReleaseInfo(self.id, self.client, self.object, self.reason, self.shape, self.dtype,
                             self.numel, self.lineage, self.steps, self.status, self.decided_by, self.note,
                             self.failure if for_owner else "")


class ReleasedFailure(Exception):
    """An approved release of a value whose history holds a failed op: the client gets the error."""

    def __init__(self, info: m.ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


Rule = Callable[[ReleaseRequest], bool]


class ReleaseDesk:
    """The worker's requests, newest last, shared by every session."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._requests: dict[int, ReleaseRequest] = {}
        self._open: dict[tuple[str, m.Ref], int] = {}   # (client, object) -> its latest request, until used
        self._ids = itertools.count(1)
        self._rules: list[Rule] = []
        self._lock = threading.RLock()

    # --- the client's side ---
    def file(self, client: str, ref: m.Ref, tensor: torch.Tensor, derived: Derived,
             reason: str = "") -> ReleaseRequest:
        """The request for this object: the client's open one (with `reason` added), or a new one."""
        with self._lock:
            known = self._open.get((client, ref))
            if known is not None and self._requests[known].status != DENIED:  # asking again after a denial: new
                request = self._requests[known]
                if reason and reason not in request.reason:
                    request.reason = f"{request.reason}; {reason}" if request.reason else reason
                    self.log.info("release request #%d: %s says why: %s", request.id, client, reason)
                return request
            error = derived.error
            request = ReleaseRequest(next(self._ids), client, object_id(ref), reason, tuple(tensor.shape),
                                     tensor.dtype, tensor.numel(), derived.lineage, tuple(sorted(derived.sources)),
                                     derived.steps, _tensor=tensor,
                                     failure=f"{error.op}: {error.type}: {error.message}" if error else "")
            self._requests[request.id] = request
            self._open[(client, ref)] = request.id
            rules = list(self._rules)
        for rule in rules:
            if self._applies(rule, request):
                self.approve(request.id, by=f"rule {getattr(rule, '__name__', 'auto_approve')}")
                break
        # a request the owner must answer is a warning: his terminal shows it
        self.log.log(logging.WARNING if request.status == PENDING else logging.INFO,
                     "release request #%d from %s: %s %s %s (%s)%s%s: %s", request.id, client, request.object,
                     list(request.shape), request.dtype, request.lineage, f", because: {reason}" if reason else "",
                     f"; an op in its history failed, the client was not told: {request.failure}"
                     if request.failure else "", request.status)
        return request

    def _applies(self, rule: Rule, request: ReleaseRequest) -> bool:
        try:
            return bool(rule(request))
        except Exception as e:  # the owner's rule failed: the request waits for him
            self.log.warning("release request #%d: auto_approve rule %r failed: %s: %s", request.id,
                             getattr(rule, "__name__", rule), type(e).__name__, e)
            return False

    def release(self, client: str, objects: list[tuple[m.Ref, torch.Tensor, Derived]], what: str) -> None:
        """Allow one release of these objects' values together (using up an approval each), or
        raise `ApprovalRequired` naming a request still needed (filed now if there was none; a
        rule of the owner's may approve it at once). Nothing is used up unless all are approved."""
        with self._lock:
            approved, waiting = [], []
            for ref, tensor, derived in objects:
                known = self._open.get((client, ref))
                request = self._requests[known] if known is not None else None
                if request is None:  # a denied request stands until the client asks again (`request()`)
                    request = self.file(client, ref, tensor, derived)
                (approved if self._approved(request, tensor) else waiting).append(request)
            if not waiting:
                for request in approved:  # each approval is used up by this release
                    request.status = RELEASED
                    self._close(request)
                    self.log.info("release request #%d: %s received %s", request.id, client, request.object)
                for (_, _, derived), request in zip(objects, approved):
                    if derived.error is not None:  # what it would release is the error, not a value
                        raise ReleasedFailure(_as_released(derived.error, request.id))
                return
        request = waiting[0]
        state = "is pending" if request.status == PENDING else f"was {request.status}"
        if request.note:
            state += f" ({request.note})"
        raise ApprovalRequired(
            f"{what} of object {request.object} releases data derived from private data "
            f"({', '.join(request.sources)}: {request.lineage}); it needs the owner's approval: release "
            f"request #{request.id} {state}. Say why with .request(reason=...), wait with .get(timeout=...)")

    def _approved(self, request: ReleaseRequest, tensor: torch.Tensor) -> bool:
        """Approved, for the object as it is now (a change since the approval voids it)."""
        if request.status != APPROVED:
            return False
        if request._version != tensor._version or request._tensor is not tensor:
            request.status, request.note = DENIED, "the object changed after the approval"
            request._tensor = None
            return False
        return True

    def status(self, client: str, request_id: int) -> m.ReleaseInfo:
        with self._lock:
            request = self._requests.get(request_id)
            if request is None or request.client != client:
                raise LookupError(f"no release request #{request_id} of this client")
            return request.row()

    # --- the owner's side ---
    def requests(self) -> list[ReleaseRequest]:
        with self._lock:
            return list(self._requests.values())

    def approve(self, request_id: int, by: str = "owner") -> ReleaseRequest:
        with self._lock:
            request = self._undecided(request_id)
            request.status, request.decided_by, request.decided_at = APPROVED, by, time.time()
            request._version = request._tensor._version
        self.log.log(logging.INFO if by.startswith("rule") else logging.WARNING,
                     "release request #%d approved by %s: %s %s to %s", request_id, by, request.object,
                     request.lineage, request.client)
        return request

    def deny(self, request_id: int, reason: str = "", by: str = "owner") -> ReleaseRequest:
        with self._lock:
            request = self._undecided(request_id)
            request.status, request.decided_by, request.note = DENIED, by, reason
            request.decided_at = time.time()
            request._tensor = None  # it stays the object's answer until the client asks again
        self.log.warning("release request #%d denied by %s: %s %s to %s%s", request_id, by, request.object,
                         request.lineage, request.client, f": {reason}" if reason else "")
        return request

    def auto_approve(self, rule: Rule) -> None:
        """Approve, as they are filed, the requests for which `rule(request)` is true. Pending
        requests are put to the rule at once too."""
        with self._lock:
            self._rules.append(rule)
            pending = [r for r in self._requests.values() if r.status == PENDING]
        for request in pending:
            if self._applies(rule, request):
                self.approve(request.id, by=f"rule {getattr(rule, '__name__', 'auto_approve')}")

    def rules(self) -> list[tuple[str, str]]:
        """The auto_approve rules in force: (name, the first line of its docstring)."""
        with self._lock:
            rules = list(self._rules)
        return [(getattr(r, "__name__", repr(r)), (getattr(r, "__doc__", None) or "").strip().split("\n")[0])
                for r in rules]

    def forget_client(self, client: str) -> None:
        """A session ended: its undecided requests lapse."""
        with self._lock:
            for (who, _), request_id in list(self._open.items()):
                if who == client:
                    request = self._requests[request_id]
                    if request.status in (PENDING, APPROVED):
                        request.status, request.note = DENIED, "the client left"
                    self._close(request)

    def _undecided(self, request_id: int) -> ReleaseRequest:
        request = self._requests.get(request_id)
        if request is None:
            raise LookupError(f"no release request #{request_id}")
        if request.status != PENDING:
            raise WorkerPermissionError(f"release request #{request_id} is already {request.status}")
        return request

    def _close(self, request: ReleaseRequest) -> None:
        request._tensor = None
        for key, request_id in list(self._open.items()):
            if request_id == request.id:
                del self._open[key]


def _as_released(error: m.ErrorInfo, request_id: int) -> m.ErrorInfo:
    return m.ErrorInfo(error.type, f"{error.message} [{error.op} failed on data derived from private data; "
                       f"the error is released with the owner's approval of request #{request_id}]", error.op)
