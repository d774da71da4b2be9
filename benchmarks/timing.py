"""The one timing rule every benchmark uses; imports nothing but the standard library, so that
peers running in environments of their own (mycelya-torch's) time themselves the same way."""
from __future__ import annotations

import statistics
import time


def per_call(fn, n: int, repeats: int = 5) -> float:
    """Median seconds per call of fn() over `repeats` timed loops of n calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)
