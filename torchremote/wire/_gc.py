"""One garbage-collector setting for processes that run torchremote's hot loops.

Importing torch leaves ~170,000 objects that live as long as the process. Every op allocates
messages that outlive a young collection, so Python's full collections keep coming, and each scans
all of those objects: about 40% of the client's time per op and 70% of a worker's decoding time, on
this project's benchmarks. `gc.freeze()` moves the objects alive now out of the collector's sight;
it does not stop collection of anything made later.
"""
from __future__ import annotations

import gc
import threading

_done = False
_lock = threading.Lock()


def freeze_long_lived() -> None:
    """Freeze, once per process, the objects that exist now (torch's modules, the caller's imports)."""
    global _done
    with _lock:
        if not _done:
            _done = True
            gc.collect()
            gc.freeze()
