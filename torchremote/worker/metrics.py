"""The worker's metrics in Prometheus' format, read from its state when `/metrics` is scraped.

The sessions' own counts (`traffic.py`) are added up here, with the totals of sessions that have
ended; nothing on the hot path calls prometheus-client.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from .server import WorkerServer


class WorkerCollector:
    """A prometheus-client collector that reads the worker's state at scrape time."""

    def __init__(self, server: "WorkerServer") -> None:
        self.server = server
        self.failed_sign_ins = 0  # the console counts them

    def collect(self) -> Iterator[Metric]:
        server = self.server
        traffic = server.traffic()
        ops = CounterMetricFamily("torchremote_ops", "Ops run for clients (calls and code runs)")
        ops.add_metric([], traffic.ops)
        yield ops
        moved = CounterMetricFamily("torchremote_bytes", "Bytes over client connections, by direction",
                                    labels=["direction"])
        moved.add_metric(["in"], traffic.bytes_in)
        moved.add_metric(["out"], traffic.bytes_out)
        yield moved
        clients = server.clients()
        connected = GaugeMetricFamily("torchremote_clients", "Client sessions, by state", labels=["state"])
        connected.add_metric(["connected"], sum(not c.parked for c in clients))
        connected.add_metric(["parked"], sum(c.parked for c in clients))
        yield connected
        objects = GaugeMetricFamily("torchremote_objects", "Objects held, by whom", labels=["holder"])
        objects.add_metric(["clients"], sum(c.objects for c in clients))
        objects.add_metric(["published"], len(server.store.published_rows()))
        yield objects
        held = GaugeMetricFamily("torchremote_memory_used_bytes", "Memory counted by the budget, by pool",
                                 labels=["pool"])
        limit = GaugeMetricFamily("torchremote_memory_limit_bytes", "The budget's limit, by pool (0: none)",
                                  labels=["pool"])
        for name, used, most in server.budget.rows():
            held.add_metric([name], used)
            limit.add_metric([name], most or 0)
        yield held
        yield limit
        requests = GaugeMetricFamily("torchremote_release_requests", "Release requests, by status",
                                     labels=["status"])
        by_status: dict[str, int] = {s: 0 for s in ("pending", "approved", "denied", "released")}
        for r in server.requests():
            by_status[r.status] = by_status.get(r.status, 0) + 1
        for status, n in by_status.items():
            requests.add_metric([status], n)
        yield requests
        for name, what, latencies in (
                ("torchremote_op_seconds", "Time to run one op on the worker", traffic.op_seconds),
                ("torchremote_sync_seconds", "Time from a waited-on batch's arrival to its reply",
                 traffic.sync_seconds)):
            h = HistogramMetricFamily(name, what)
            h.add_metric([], latencies.cumulative(), latencies.sum)
            yield h
        failed = CounterMetricFamily("torchremote_console_failed_sign_ins", "Refused sign-ins to the console")
        failed.add_metric([], self.failed_sign_ins)
        yield failed


class WorkerMetrics:
    """The registry `/metrics` serves: this worker's collector alone (not the process-wide default)."""

    def __init__(self, server: "WorkerServer") -> None:
        self.collector = WorkerCollector(server)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
