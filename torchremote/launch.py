"""`start_worker`: a worker in this process, wired to the client it uses to reach other workers.

The worker package imports no client code; a move from one worker to another needs one (the source
connects to the destination as a client), so the two meet here, above both.
"""
from __future__ import annotations

import atexit
import weakref
from typing import Any

from .client.session import close_open_sessions, send_to_worker
from .worker.server import WorkerServer

_started: "weakref.WeakSet[WorkerServer]" = weakref.WeakSet()


def start_worker(id: str = "worker", host: str = "127.0.0.1", port: int = 0, **options: Any) -> WorkerServer:
    """Start a worker serving from a background thread; returns at once. Port 0 picks a free port.

    Options are `WorkerServer`'s: token, owner_token, device, max_memory, max_gpu_memory,
    max_message_bytes, max_client_bytes, max_clients, resume_grace, certfile, keyfile, allow_code,
    checkpoint_dir, insecure, verbose, log_file, and console_port (the owner's console: a web page
    and /metrics; `server.console_url`), console_host, metrics_public."""
    options.setdefault("send_to_worker", send_to_worker)
    server = WorkerServer(id, host, port, **options)
    _started.add(server)
    return server


@atexit.register
def _stop_started_workers() -> None:
    """At exit, close this process's clients, then stop its workers and wait for their threads: a
    worker thread still freeing a client's tensors while the interpreter finalizes aborts it."""
    close_open_sessions()
    for server in list(_started):
        try:
            server.stop()
        except Exception:
            pass
