"""The worker's recent log lines, kept for the console's log page.

The console wants the INFO lines (who connected, what was published), which a worker started
without --verbose does not otherwise log. Turning them on for its logger alone would pass them on to
whatever handlers the process's root logger has (a terminal, say); so while the console is on, the
worker's logger passes on only what it passed on before (WARNING and above) to its parent.
"""
from __future__ import annotations

import logging
import threading
from collections import deque

KEPT_LINES = 500


class RecentLog(logging.Handler):
    def __init__(self, log: logging.Logger, kept: int = KEPT_LINES) -> None:
        super().__init__(logging.INFO)
        self._lines: deque[tuple[float, str, str]] = deque(maxlen=kept)
        self._lines_lock = threading.Lock()
        self._log = log
        self._before = (log.level, log.propagate)
        self._forward: logging.Handler | None = None
        if not log.isEnabledFor(logging.INFO):
            self._forward = _ToParent(log)
            log.addHandler(self._forward)
            log.propagate = False
            log.setLevel(logging.INFO)
        log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record must not break the worker's logging
            text = str(record.msg)
        with self._lines_lock:
            self._lines.append((record.created, record.levelname, text))

    def lines(self) -> list[tuple[float, str, str]]:
        with self._lines_lock:
            return list(self._lines)

    def detach(self) -> None:
        self._log.removeHandler(self)
        if self._forward is not None:
            self._log.removeHandler(self._forward)
            self._log.setLevel(self._before[0])
            self._log.propagate = self._before[1]


class _ToParent(logging.Handler):
    """Hands WARNING and above on to the parent logger's handlers, as propagation did."""

    def __init__(self, log: logging.Logger) -> None:
        super().__init__(logging.WARNING)
        self._parent = log.parent

    def emit(self, record: logging.LogRecord) -> None:
        if self._parent is not None:
            self._parent.handle(record)
