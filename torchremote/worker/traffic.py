"""What the worker counts of its sessions: traffic, ops and latencies.

Each session counts into a `Traffic` of its own, written only by the thread serving it, so the hot
path takes no lock and calls no library: a few integer additions a batch (and, while the console
is on, two clock reads an op). `metrics.py` adds them up when `/metrics` is scraped.
"""
from __future__ import annotations

from bisect import bisect_left

# seconds: an op on the CPU runs in tens of microseconds, a large fetch in seconds
BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0)


class Latencies:
    """A histogram as plain counts (one per bucket, the last for larger values) and a sum."""
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def add(self, other: "Latencies") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.sum += other.sum

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus' buckets: (upper bound, observations at or below it), `+Inf` last."""
        out, running = [], 0
        for bound, n in zip((*map(repr, BUCKETS), "+Inf"), self.counts):
            running += n
            out.append((bound, running))
        return out


class Traffic:
    """One session's counts (or the sum of several). `timed`: latencies are measured too."""
    __slots__ = ("ops", "bytes_in", "bytes_out", "op_seconds", "sync_seconds", "timed")

    def __init__(self, timed: bool = False) -> None:
        self.ops = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.op_seconds = Latencies()     # running one op (a Call or Run)
        self.sync_seconds = Latencies()   # a batch that a client waits on: from its arrival to the reply sent
        self.timed = timed

    def add(self, other: "Traffic") -> None:
        self.ops += other.ops
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.op_seconds.add(other.op_seconds)
        self.sync_seconds.add(other.sync_seconds)


def frame_bytes(frame: list) -> int:
    """The size of one outgoing frame (a list of bytes and memoryviews)."""
    return sum(c.nbytes if isinstance(c, memoryview) else len(c) for c in frame)
