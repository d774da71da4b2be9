"""What the owner's console costs the worker: the same pipelined chain and synchronous op on three
worker processes in alternating rounds of one run: no console; the console on, no page open; the
console on with a page open in headless Chromium, refreshing itself twice a second (the clients
page, which reads every session's counts). The browser runs on this machine too, so its own CPU
is in the figure, as it would be for an owner watching his worker on the same box."""
from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

import torchremote as tr

from .side_by_side import chain_and_sync, stop

SIDES = ("no console", "console on, no page open", "console open, refreshing")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


def _start(flags: list[str], log: Path) -> tuple[subprocess.Popen, str, str | None]:
    proc = subprocess.Popen([sys.executable, "-m", "torchremote", "worker", "--port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    url = proc.stdout.readline().strip()
    link = None
    if flags:
        deadline = time.monotonic() + 30
        while link is None and time.monotonic() < deadline:
            found = re.search(r"(http://\S+/login\?token=\S+)", log.read_text())
            link = found.group(1) if found else None
            time.sleep(0.05)
    return proc, url, link


def worker_cpu(pointers: dict, procs: dict, rounds: int, chain: int = 2000, repeats: int = 5) -> dict:
    """The worker process's own CPU time per op of the chain (user + system), median of rounds:
    steadier than wall time on a shared 2-core machine, and what the console takes from the worker."""
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for side, x in pointers.items():
            worker = psutil.Process(procs[side].pid)
            before = sum(worker.cpu_times()[:2])
            for _ in range(repeats):
                y = x
                for _ in range(chain):
                    y = y + 1
                y.sum().item()
            samples.setdefault(side, []).append((sum(worker.cpu_times()[:2]) - before) / (repeats * chain) * 1e6)
    return {side: statistics.median(v) for side, v in samples.items()}


def run(rounds: int = 3) -> dict:
    chromium = shutil.which("chromium")
    with tempfile.TemporaryDirectory() as tmp:
        started = [_start(flags, Path(tmp) / f"worker{i}.log")
                   for i, flags in enumerate(([], ["--console-port", "0"], ["--console-port", "0"]))]
        procs = [p for p, _, _ in started]
        try:
            workers = [tr.connect(url) for _, url, _ in started]
            browser = None
            try:
                if chromium:
                    from playwright.sync_api import sync_playwright
                    playwright = sync_playwright().start()
                    browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
                    page = browser.new_page()
                    page.goto(started[2][2])
                    page.goto(page.url.rstrip("/") + "/clients")
                pointers = {side: torch.ones(10).send(w) for side, w in zip(SIDES, workers)}
                if not chromium:
                    del pointers[SIDES[2]]
                results = chain_and_sync(pointers, rounds)
                results["worker_cpu_us_per_op"] = worker_cpu(pointers, dict(zip(SIDES, procs)), rounds)
                results["browser"] = chromium is not None
                return results
            finally:
                if browser is not None:
                    browser.close()
                    playwright.stop()
                for w in workers:
                    w.close()
        finally:
            stop(procs)


def report(results: dict) -> list[str]:
    r = results.get("console")
    if not r:
        return []
    chain, sync, cpu = r["chain_us_per_op"], r["sync_us"], r["worker_cpu_us_per_op"]
    base = SIDES[0]
    lines = ["", "### 4h. The owner's console: the same work with no console, with it on, and with a page open "
             "and refreshing (medians of alternating rounds)", "",
             "| side | pipelined chain, µs/op | vs no console | worker CPU, µs/op | vs no console "
             "| (x + 1).sum().item(), µs | vs no console |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for side in SIDES:
        if side in chain:
            lines.append(f"| {side} | {chain[side]:.1f} | {chain[side] / chain[base]:.2f}x | {cpu[side]:.1f} | "
                         f"{cpu[side] / cpu[base]:.2f}x | {sync[side]:.0f} | {sync[side] / sync[base]:.2f}x |")
    if not r["browser"]:
        lines.append("\n(no chromium on this machine: the open-page row is left out)")
    return lines


if __name__ == "__main__":
    print("\n".join(report({"console": run()})))
