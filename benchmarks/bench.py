"""torchremote against its peers, every case in one run: `make bench` (or `python -m benchmarks.bench`).

Peers: local PyTorch; torch.distributed.rpc over TensorPipe; raw websockets (its threading API, its
asyncio API, and its sans-I/O protocol on a blocking socket); raw TCP, the physical limit for moving
bytes; and mycelya-torch's mock backend where it builds (no socket at all). Everything runs on
127.0.0.1, each server in its own process.
Prints Markdown tables with figures and ratios, and writes results.json, results.md, transfer.png
and latency.png into benchmarks/results/. Figures are medians; the machine is noisy, so read ratios
from one run, never across runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

import torchremote as tr
from benchmarks import budget, checkpointing, collectives, compiled, console, load, peers, privacy, resume, training
from benchmarks.timing import per_call

RESULTS = Path(__file__).resolve().parent / "results"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# --- helpers ------------------------------------------------------------------------------------------

def start(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, **(env or {})})
    return proc, proc.stdout.readline().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def echo(self, data) -> bytearray:
        self.sock.sendall(struct.pack("<Q", len(data)))
        self.sock.sendall(data)
        (n,) = struct.unpack("<Q", peers.recv_exact(self.sock, 8))
        return peers.recv_exact(self.sock, n)


class RssSampler:
    """Peak RSS of some processes while a block runs, sampled every 5 ms."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {k: psutil.Process(p) for k, p in pids.items()}
        self.peak = {k: 0 for k in pids}
        self.base = {k: p.memory_info().rss for k, p in self.procs.items()}
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, p in self.procs.items():
                self.peak[k] = max(self.peak[k], p.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def extra(self, key: str) -> int:
        return max(self.peak[key] - self.base[key], 0)


# --- the cases ----------------------------------------------------------------------------------------

def asyncio_ping_pong(url: str, payload: bytes, n: int = 500, repeats: int = 5) -> float:
    """Seconds per round trip through websockets' asyncio API, timed inside its event loop."""
    import asyncio
    from websockets.asyncio.client import connect

    async def run() -> float:
        async with connect(url, compression=None, max_size=None, proxy=None) as ws:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(n):
                    await ws.send(payload)
                    await ws.recv()
                times.append((time.perf_counter() - t0) / n)
            return statistics.median(times)

    return asyncio.run(run())


def mycelya(results: dict) -> None:
    """mycelya-torch's figures from its own environment, if `make bench` could build it there."""
    python = Path(__file__).resolve().parent.parent / ".venv-mycelya" / "bin" / "python"
    if not python.exists():
        results["mycelya"] = {"missing": "mycelya-torch did not build here (.venv-mycelya is absent)"}
        return
    done = subprocess.run([str(python), "-m", "benchmarks.mycelya_peer"], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parent.parent)
    lines = done.stdout.strip().splitlines()
    results["mycelya"] = json.loads(lines[-1]) if done.returncode == 0 and lines else {
        "missing": f"mycelya-torch failed: {done.stderr.strip().splitlines()[-1:]}"}


def latency(bob: tr.Worker, ws, sansio, asyncio_url: str, tcp: TcpClient, rpc, results: dict) -> None:
    x_local = torch.ones(10)
    x = x_local.send(bob)
    rref = rpc.remote("peer", torch.ones, args=((10,),))
    small = b"x" * 64
    rows = {
        "local torch: (x + 1).sum().item()": per_call(lambda: (x_local + 1).sum().item(), 2000),
        "torchremote: (x + 1).sum().item()": per_call(lambda: (x + 1).sum().item(), 300),
        "rpc_sync: same, on an RRef-held x": per_call(lambda: rpc.rpc_sync("peer", peers.add_sum_item, args=(rref,)), 300),
        "rpc_sync(torch.add)": per_call(lambda: rpc.rpc_sync("peer", torch.add, args=(x_local, 1)), 300),
        "raw websockets ping-pong (64 B)": per_call(lambda: (ws.send(small), ws.recv()), 500),
        "raw websockets asyncio ping-pong (64 B)": asyncio_ping_pong(asyncio_url, small),
        "raw websockets sans-I/O on a blocking socket (64 B)": per_call(lambda: (sansio.send(small), sansio.recv()), 500),
        "raw TCP ping-pong (64 B)": per_call(lambda: tcp.echo(small), 1000),
    }
    results["latency_us"] = {k: v * 1e6 for k, v in rows.items()}


def pipelined(bob: tr.Worker, rpc, results: dict, chain: int = 2000) -> None:
    def local_chain():
        x = torch.ones(10)
        for _ in range(chain):
            x = x + 1
        return x.sum().item()

    def remote_chain():
        x = torch.ones(10).send(bob)
        for _ in range(chain):
            x = x + 1
        return x.get()

    def rpc_chain():
        rref = rpc.remote("peer", torch.ones, args=((10,),))
        for _ in range(chain):
            rref = rpc.remote("peer", peers.add_one, args=(rref,))
        return rref.to_here()

    def rpc_async_chain():
        x = torch.ones(10)
        futures = [rpc.rpc_async("peer", torch.add, args=(x, 1)) for _ in range(chain)]
        torch.futures.wait_all(futures)

    results["pipelined_us_per_op"] = {
        "local torch": per_call(local_chain, 1, 5) / chain * 1e6,
        "torchremote (chain, one get)": per_call(remote_chain, 1, 5) / chain * 1e6,
        "rpc.remote chain on RRefs": per_call(rpc_chain, 1, 3) / chain * 1e6,
        "rpc_async (independent ops)": per_call(rpc_async_chain, 1, 3) / chain * 1e6,
    }


def many_workers(workers: list[tr.Worker], results: dict, ops_each: int = 1500) -> None:
    """The same work per worker on 1 worker and on 3 at once: do ops to different workers overlap?

    The three workers run single-threaded, so on this 2-core machine perfect overlap gives ~1.5x
    and a client that waited for each worker in turn would give 3x.
    """
    big = torch.randn(256, 256)

    def drive(ws: list[tr.Worker]) -> None:
        xs = [big.send(w) for w in ws]
        for _ in range(ops_each):
            xs = [torch.tanh(x @ x) for x in xs]  # interleaved: one op to each worker in turn
        for x in xs:
            x.sum().item()

    one = per_call(lambda: drive(workers[:1]), 1, 3)
    three = per_call(lambda: drive(workers), 1, 3)
    results["many_workers"] = {"one_worker_s": one, "three_workers_s": three, "ratio": three / one}


def transfer(bob: tr.Worker, ws, tcp: TcpClient, rpc, results: dict, sizes: list[int]) -> None:
    curve: dict[str, dict[int, float]] = {k: {} for k in ("torchremote send+get", "websockets echo (1 message)",
                                                          "rpc echo", "raw TCP echo")}
    for size in sizes:
        t = torch.randint(0, 255, (size,), dtype=torch.uint8)
        data = t.numpy().tobytes()
        n = max(1, min(200, (64 * MiB) // size))
        reps = 2 if size >= GiB else 3 if size > 64 * MiB else 5

        def remote():
            r = t.send(bob)
            r.get()

        for name, fn in (("torchremote send+get", remote),
                         ("websockets echo (1 message)", lambda: (ws.send(data), ws.recv())),
                         ("rpc echo", lambda: rpc.rpc_sync("peer", peers.identity, args=(t,))),
                         ("raw TCP echo", lambda: tcp.echo(data))):
            seconds = per_call(fn, n, reps)
            curve[name][size] = 2 * size / seconds / MiB  # MiB/s, both directions counted
        gc.collect()
    results["transfer_mib_s"] = curve


def memory(bob: tr.Worker, worker_pid: int, results: dict, move_bytes: int, moves: int = 3) -> None:
    """Send then get `move_bytes`, `moves` times: the median time each way; the peak extra RSS of
    the first move, from a fresh state (a worker's freed 1 GiB is not always back with the OS by
    the next move, which would count it twice)."""
    me = psutil.Process()
    big = torch.randint(0, 255, (move_bytes,), dtype=torch.uint8)
    sends, gets = [], []
    for k in range(moves):
        with RssSampler({"client": me.pid, "worker": worker_pid}) as rss:
            t0 = time.perf_counter()
            remote = big.send(bob)
            bob.sync()
            t1 = time.perf_counter()
            back = remote.get()
            t2 = time.perf_counter()
        assert torch.equal(back, big)
        sends.append(t1 - t0)
        gets.append(t2 - t1)
        if k == 0:
            peaks = {"client_peak_extra_bytes": rss.extra("client"), "worker_peak_extra_bytes": rss.extra("worker")}
        del remote, back
        gc.collect()
        bob.sync()
    results["memory"] = {"moved_bytes": move_bytes, "moves": moves, "send_s": statistics.median(sends),
                         "get_s": statistics.median(gets), "send_s_each": sends, "get_s_each": gets, **peaks}
    del big
    gc.collect()


# --- report -------------------------------------------------------------------------------------------

def fmt_size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB else f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def report(results: dict) -> str:
    lat, pipe, tr_curve = results["latency_us"], results["pipelined_us_per_op"], results["transfer_mib_s"]
    ws_pp = lat["raw websockets ping-pong (64 B)"]
    remote_sync = lat["torchremote: (x + 1).sum().item()"]
    rpc_sync = lat["rpc_sync(torch.add)"]
    lines = [f"Machine: {results['machine']}. Loopback, every server in its own process; medians.", ""]
    lines += ["### 1. Small-op latency, synchronous", "", "| call | µs per call | vs raw websockets ping-pong |",
              "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v:.0f} | {v / ws_pp:.2f}x |" for k, v in lat.items()]
    lines += ["", "### 2. Pipelined ops (a chain of 2000 small ops, then one fetch)", "",
              "| how | µs per op | vs rpc_sync(torch.add) |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v:.1f} | {v / rpc_sync:.3f}x |" for k, v in pipe.items()]
    sizes = sorted(next(iter(tr_curve.values())))
    many = results["many_workers"]
    lines += ["", "### 2b. One client driving three single-threaded workers (the same matmul chain on each, "
              "interleaved; ~1.5x is perfect overlap on 2 cores, 3x none)", "",
              "| workers | seconds | vs one worker |", "| --- | ---: | ---: |",
              f"| 1 | {many['one_worker_s']:.2f} | 1.00x |",
              f"| 3 | {many['three_workers_s']:.2f} | {many['ratio']:.2f}x |"]
    lines += ["", "### 3. Transfer: round trip of N bytes, MiB/s (both directions counted)", "",
              "| size | " + " | ".join(tr_curve) + " |", "| --- |" + " ---: |" * len(tr_curve)]
    for s in sizes:
        lines.append(f"| {fmt_size(s)} | " + " | ".join(f"{tr_curve[k][s]:.0f}" for k in tr_curve) + " |")
    myc = results.get("mycelya", {})
    if "missing" in myc:
        lines += ["", f"mycelya-torch: not measured ({myc['missing']})."]
    elif myc:
        lines += ["", f"### 3b. mycelya-torch {myc['version']}, mock backend (in-process: no socket at all)", "",
                  "| figure | mycelya-torch mock | torchremote (real socket) |", "| --- | ---: | ---: |",
                  f"| (x + 1).sum().item(), µs | {myc['sync_small_op_us']:.0f} | {remote_sync:.0f} |",
                  f"| 64 MiB send+get, MiB/s | {myc['send_get_64mib_mib_s']:.0f} | "
                  f"{tr_curve['torchremote send+get'][64 * MiB]:.0f} |"]
    lines += training.report(results)
    ld = results["load"]
    lines += ["", f"### 4b. {ld['clients']} clients at once on one worker, {load.OPS_EACH} synchronous ops each "
              "(all in one client process)", "", "| figure | value |", "| --- | ---: |",
              f"| wrong or missing results | {len(ld['failures'])} of {ld['clients'] * load.OPS_EACH} ({ld['hung']} clients hung) |",
              f"| sync op latency p50 / p99 | {ld['p50_us'] / 1e3:.1f} / {ld['p99_us'] / 1e3:.1f} ms |",
              f"| worker peak extra RSS | {ld['worker_peak_extra_bytes'] / MiB:.0f} MiB |",
              f"| wall time | {ld['wall_s']:.1f} s |"]
    lines += resume.report(results)
    lines += privacy.report(results)
    lines += budget.report(results)
    lines += checkpointing.report(results)
    lines += collectives.report(results)
    lines += console.report(results)
    lines += compiled.report(results)
    mem = results["memory"]
    lines += ["", "### 5. Memory", "", "| what | figure |", "| --- | ---: |",
              f"| client memory per live RemoteTensor | {results['pointer_bytes']:.0f} B |",
              f"| send {fmt_size(mem['moved_bytes'])} (median of {mem['moves']}) | {mem['send_s']:.2f} s |",
              f"| get {fmt_size(mem['moved_bytes'])} (median of {mem['moves']}) | {mem['get_s']:.2f} s |",
              "| each move, send / get | " + ", ".join(f"{a:.2f} / {b:.2f} s" for a, b in
                                                     zip(mem["send_s_each"], mem["get_s_each"])) + " |",
              f"| client peak extra RSS while moving it (first move) | {mem['client_peak_extra_bytes'] / GiB:.2f} GiB |",
              f"| worker peak extra RSS while moving it (first move) | {mem['worker_peak_extra_bytes'] / GiB:.2f} GiB |"]
    big = max(s for s in sizes if s <= 64 * MiB)
    targets = [
        ("pipelined op <= 0.1 x rpc_sync per op", pipe["torchremote (chain, one get)"] / rpc_sync, 0.1),
        ("pipelined op <= 25 µs", pipe["torchremote (chain, one get)"], 25),
        ("synchronous small op <= 1.2 x raw websockets (sync API) ping-pong", remote_sync / ws_pp, 1.2),
        ("synchronous small op <= 0.4 x rpc_sync(torch.add)", remote_sync / rpc_sync, 0.4),
        (f"{fmt_size(big)} send+get >= websockets echo (ratio >= 1)",
         tr_curve["torchremote send+get"][big] / tr_curve["websockets echo (1 message)"][big], -1),
        (f"{fmt_size(big)} send+get >= rpc echo (ratio >= 1)",
         tr_curve["torchremote send+get"][big] / tr_curve["rpc echo"][big], -1),
        ("three workers take < 3 x one worker", many["ratio"], 2.99),
        *training.targets(results),
        *compiled.targets(results),
        (f"send {fmt_size(mem['moved_bytes'])} <= 1.2 s", mem["send_s"], 1.2),
        (f"get {fmt_size(mem['moved_bytes'])} <= 1.2 s", mem["get_s"], 1.2),
        (f"{fmt_size(mem['moved_bytes'])} move: client peak extra RSS <= 1.5 x the bytes moved",
         mem["client_peak_extra_bytes"] / mem["moved_bytes"], 1.5),
        (f"{fmt_size(mem['moved_bytes'])} move: worker peak extra RSS <= 1.5 x the bytes moved",
         mem["worker_peak_extra_bytes"] / mem["moved_bytes"], 1.5),
    ]
    lines += ["", "### Targets", "", "| target | measured | met |", "| --- | ---: | :---: |"]
    for name, value, bound in targets:
        met = value >= 1 if bound == -1 else value <= bound
        lines.append(f"| {name} | {value:.2f} | {'yes' if met else 'no'} |")
    results["targets"] = [{"target": n, "value": v, "met": (v >= 1 if b == -1 else v <= b)} for n, v, b in targets]
    return "\n".join(lines)


def plots(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in results["transfer_mib_s"].items():
        sizes = sorted(curve)
        ax.plot([s / KiB for s in sizes], [curve[s] for s in sizes], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tensor size (KiB)")
    ax.set_ylabel("round-trip throughput (MiB/s)")
    ax.set_title("send + get vs. the peers (loopback)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "transfer.png", dpi=100)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lat = results["latency_us"]
    ax.barh(list(lat), list(lat.values()))
    ax.set_xlabel("µs per call (median)")
    ax.set_title("synchronous small-op latency (loopback)")
    fig.tight_layout()
    fig.savefig(RESULTS / "latency.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps (a smoke run)")
    args = parser.parse_args()
    sizes = [KiB, 16 * KiB, 256 * KiB, 4 * MiB, 64 * MiB] + ([] if args.quick else [256 * MiB, GiB])
    move = 64 * MiB if args.quick else GiB
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                                f"{psutil.virtual_memory().total / GiB:.0f} GiB, torch {torch.__version__}"}
    import torch.distributed.rpc as rpc
    from websockets.sync.client import connect as ws_connect

    port = free_port()
    procs = []
    try:
        worker, url = start(["-m", "torchremote", "worker", "--port", "0"])
        procs.append(worker)
        extra = [start(["-m", "torchremote", "worker", "--port", "0", "--id", f"w{i}"],
                       env={"OMP_NUM_THREADS": "1"}) for i in (1, 2, 3)]
        procs += [p for p, _ in extra]
        no_resume, no_resume_url = start(["-m", "torchremote", "worker", "--port", "0", "--resume-grace", "0"])
        procs.append(no_resume)
        ws_proc, ws_url = start(["-m", "benchmarks.peers", "ws"])
        asyncio_proc, asyncio_url = start(["-m", "benchmarks.peers", "ws-asyncio"])
        sansio_proc, sansio_url = start(["-m", "benchmarks.peers", "ws-sansio"])
        tcp_proc, tcp_port = start(["-m", "benchmarks.peers", "tcp"])
        rpc_proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peers", "rpc", str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs += [ws_proc, asyncio_proc, sansio_proc, tcp_proc, rpc_proc]
        peers.rpc_init("bench", 0, port)
        bob = tr.connect(url)
        others = [tr.connect(u) for _, u in extra]
        ws = ws_connect(ws_url, compression=None, max_size=None, proxy=None).__enter__()
        tcp = TcpClient(int(tcp_port))
        sansio = peers.SansIOClient(sansio_url)
        for name, run in (("latency", lambda: latency(bob, ws, sansio, asyncio_url, tcp, rpc, results)),
                          ("pipelined", lambda: pipelined(bob, rpc, results)),
                          ("many workers", lambda: many_workers(others, results, 100 if args.quick else 300)),
                          ("transfer", lambda: transfer(bob, ws, tcp, rpc, results, sizes)),
                          ("training", lambda: training.run(results, args.quick)),
                          ("mycelya-torch", lambda: mycelya(results)),
                          ("100 clients", lambda: results.__setitem__("load", load.run(url, worker.pid, 100))),
                          ("resume", lambda: results.__setitem__("resume", resume.run(url, no_resume_url))),
                          ("provenance", lambda: results.__setitem__("privacy", privacy.run())),
                          ("memory budget", lambda: results.__setitem__("budget", budget.run())),
                          ("checkpointing", lambda: results.__setitem__("checkpointing", checkpointing.run())),
                          ("collectives", lambda: results.__setitem__("collectives", collectives.run(args.quick))),
                          ("owner's console", lambda: results.__setitem__("console", console.run())),
                          ("compiled steps", lambda: compiled.run(results, args.quick)),
                          ("memory", lambda: memory(bob, worker.pid, results, move))):
            t0 = time.perf_counter()
            print(f"running {name} ...", file=sys.stderr, flush=True)
            run()
            print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for w in (bob, *others):
            w.close()
        ws.close()
        sansio.close()
        rpc.shutdown()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
    table = report(results)
    print(table)
    (RESULTS / "results.md").write_text(table + "\n")
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plots(results)
    print(f"\nwrote {RESULTS}/results.md, results.json, transfer.png, latency.png", file=sys.stderr)


if __name__ == "__main__":
    main()
