"""What resumable sessions cost and how long a resume takes, against a worker process.

- The price of keeping frames and acknowledging them: a synchronous small op and a pipelined chain
  on a worker with resuming on (the default) and on one started with --resume-grace 0.
- A resume: the time from a cut (by `FaultProxy`, on loopback) to the value of the next
  synchronous op, against the same op through the proxy without a cut; and a 64 MiB fetch cut in
  the middle, against one that is not.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch

import torchremote as tr
from torchremote.testing.fault_proxy import TO_CLIENT, FaultProxy

from .timing import per_call

MiB = 1 << 20


def _chain_us(w: tr.Worker, chain: int = 2000) -> float:
    def run():
        x = torch.ones(10).send(w)
        for _ in range(chain):
            x = x + 1
        return x.get()
    return per_call(run, 1, 5) / chain * 1e6


def _sync_us(w: tr.Worker) -> float:
    x = torch.ones(10).send(w)
    return per_call(lambda: (x + 1).sum().item(), 300) * 1e6


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(url_on: str, url_off: str, cuts: int = 10) -> dict:
    out: dict = {}
    rows: dict = {"sync_us": {}, "chain_us_per_op": {}}
    with tr.connect(url_on) as on, tr.connect(url_off) as off:
        for round_ in range(4):  # alternate which goes first: drift and order hit both alike
            pair = [("resume on", on), ("resume off", off)]
            for name, w in pair if round_ % 2 else pair[::-1]:
                rows["sync_us"].setdefault(name, []).append(_sync_us(w))
                rows["chain_us_per_op"].setdefault(name, []).append(_chain_us(w))
    for key, by_name in rows.items():
        out[key] = {name: statistics.median(v) for name, v in by_name.items()}
    port = int(url_on.rsplit(":", 1)[1])
    quiet = logging.getLogger("torchremote")
    level, quiet.level = quiet.level, logging.ERROR  # one warning line per cut: not 10 here
    try:
        with FaultProxy(port) as proxy, tr.connect(proxy.url) as w:
            x = torch.ones(10).send(w)
            uncut = [_timed(lambda: (x + 1).sum().item()) for _ in range(50)]
            resumed = []
            for _ in range(cuts):
                w.sync()
                proxy.cut()
                resumed.append(_timed(lambda: (x + 1).sum().item()))
            big = torch.randn(64 * MiB // 4).send(w)
            w.sync()
            fetch = [_timed(big.get) for _ in range(3)]
            fetch_cut = []
            for _ in range(3):
                proxy.cut_after(TO_CLIENT, 32 * MiB)
                fetch_cut.append(_timed(big.get))
    finally:
        quiet.level = level
    out["op_after_cut_ms"] = {"uncut": statistics.median(uncut) * 1e3, "after a cut": statistics.median(resumed) * 1e3,
                              "worst after a cut": max(resumed) * 1e3}
    out["fetch_64mib_s"] = {"uncut": statistics.median(fetch), "cut halfway": statistics.median(fetch_cut)}
    return out


def report(results: dict) -> list[str]:
    r = results.get("resume")
    if not r:
        return []
    lines = ["", "### 4c. Resumable sessions (medians of 4 alternating rounds)", "",
             "| figure | resume on | resume off (--resume-grace 0) | ratio |",
             "| --- | ---: | ---: | ---: |"]
    for name, key, unit in (("(x + 1).sum().item()", "sync_us", "µs"), ("pipelined chain", "chain_us_per_op", "µs/op")):
        on, off = r[key]["resume on"], r[key]["resume off"]
        lines.append(f"| {name}, {unit} | {on:.1f} | {off:.1f} | {on / off:.2f}x |")
    op, fetch = r["op_after_cut_ms"], r["fetch_64mib_s"]
    lines += ["", "| through a fault proxy | figure |", "| --- | ---: |",
              f"| sync op, no cut (median) | {op['uncut']:.2f} ms |",
              f"| sync op right after a cut: reconnect, resume, replay (median / worst of 10) | "
              f"{op['after a cut']:.1f} / {op['worst after a cut']:.1f} ms |",
              f"| 64 MiB get, no cut (median of 3) | {fetch['uncut']:.2f} s |",
              f"| 64 MiB get cut after 32 MiB (median of 3) | {fetch['cut halfway']:.2f} s |"]
    return lines
