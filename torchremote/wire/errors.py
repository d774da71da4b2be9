"""One exception tree for torchremote.

    TorchRemoteError
    ├── WorkerConnectionError   (also ConnectionError)  worker dead, unreachable, or connection closed
    │   └── SessionInUseError                           a resume while the session's connection is live
    ├── WorkerPermissionError   (also PermissionError)  bad token, refused by the worker's policy
    │   └── ApprovalRequired                            a release of private-derived data, not approved
    ├── ProtocolError           (also ValueError)       bytes that are not a valid torchremote message
    └── RemoteError             (also RuntimeError)     a remote exception with no local equivalent

A failing remote torch op raises the *same* exception type that local torch raises (RuntimeError,
IndexError, ...), carrying the worker's message; a note names the worker and the op. Exceptions cross
the wire as data (`ErrorInfo`: type name, message, remote traceback), never pickled, and are rebuilt
only from the allow-list below.
"""
from __future__ import annotations

import builtins
import re

import torch

from .messages import ErrorInfo


class TorchRemoteError(Exception):
    """Base class of every error torchremote raises itself."""


class WorkerConnectionError(TorchRemoteError, ConnectionError):
    """The worker cannot be reached, or the connection to it was lost."""


class SessionInUseError(WorkerConnectionError):
    """A resume token was offered while its session's connection is still live (try again once the
    worker has seen it drop)."""


class WorkerPermissionError(TorchRemoteError, PermissionError):
    """The worker refused: authentication failed, or its policy forbids the request."""


class ApprovalRequired(WorkerPermissionError):
    """Releasing this value needs its owner's approval; `request_id` names the request filed."""

    @property
    def request_id(self) -> int | None:
        found = re.search(r"request #(\d+)", str(self))
        return int(found.group(1)) if found else None


def published_read_only(name: str, op: str) -> WorkerPermissionError:
    """The refusal of a change to published data (made by the client, and by the worker itself)."""
    return WorkerPermissionError(
        f"{op} would change published tensor {name!r}, which is read-only to clients (its owner "
        f"published it so): compute on a copy of your own instead, e.g. x = x.clone()")


class ProtocolError(TorchRemoteError, ValueError):
    """Bytes that do not decode to a valid torchremote message."""


class RemoteError(TorchRemoteError, RuntimeError):
    """A remote exception whose type has no local equivalent; `remote_type` names it."""

    def __init__(self, message: str, remote_type: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type


_BUILTIN_NAMES = (
    "ArithmeticError", "AssertionError", "AttributeError", "BufferError", "EOFError",
    "FloatingPointError", "IndexError", "KeyError", "LookupError", "MemoryError",
    "NotImplementedError", "OverflowError", "RecursionError", "RuntimeError", "StopIteration",
    "TypeError", "UnicodeError", "ValueError", "ZeroDivisionError", "PermissionError",
    "ConnectionError", "TimeoutError", "FileNotFoundError", "OSError",
)
_REBUILDABLE: dict[str, type[BaseException]] = {
    name: getattr(builtins, name) for name in _BUILTIN_NAMES
}
_REBUILDABLE.update({
    "torch.OutOfMemoryError": torch.OutOfMemoryError,
    "torch._C._LinAlgError": torch.linalg.LinAlgError,
    "torch.linalg.LinAlgError": torch.linalg.LinAlgError,
})
for _cls in (WorkerConnectionError, SessionInUseError, WorkerPermissionError, ApprovalRequired, ProtocolError,
             RemoteError):
    _REBUILDABLE[f"torchremote.{_cls.__name__}"] = _cls


def type_name(exc: BaseException) -> str:
    """The name an exception type travels under: bare for builtins, qualified otherwise."""
    cls = type(exc)
    for name, known in _REBUILDABLE.items():
        if cls is known:
            return name
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module.startswith("torchremote"):
        return f"torchremote.{cls.__qualname__}"
    return f"{module}.{cls.__qualname__}"


def to_info(exc: BaseException, op: str | None = None, tb: str = "") -> ErrorInfo:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return ErrorInfo(type=type_name(exc), message=str(message), op=op, traceback=tb)


def from_info(info: ErrorInfo, worker: str) -> BaseException:
    """Rebuild a local exception of the remote type (or `RemoteError`), noting where it came from."""
    cls = _REBUILDABLE.get(info.type)
    if cls is None:
        exc: BaseException = RemoteError(f"{info.type}: {info.message}", info.type)
    elif cls is RemoteError:
        exc = RemoteError(info.message)
    else:
        try:
            exc = cls(info.message)
        except Exception:  # an exception type with an unusual constructor
            exc = RemoteError(f"{info.type}: {info.message}", info.type)
    where = f"raised on worker {worker!r}"
    if info.op:
        where += f" by {info.op}"
    exc.add_note(where)
    if info.traceback:
        exc.add_note("remote traceback:\n" + info.traceback.rstrip())
    return exc
