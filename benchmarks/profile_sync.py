"""Where one synchronous small op's time goes, on each side: `python -m benchmarks.profile_sync`.

Times `(x + 1).sum().item()` against a worker in its own process, piece by piece: the client's
dispatch and encoding, its send, the wait for the reply, and decoding it; the worker's share of the
wait (reading, decoding, running, encoding, writing), timed inside the worker. Medians over 2,000 ops.
`--resume-grace 0` profiles a worker that keeps no frames for a resume.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch

import torchremote as tr

WORKER = r'''
import json, statistics, sys, time
import torchremote as tr
from torchremote.wire import protocol
from torchremote.worker import connection as worker_connection, execution, server
times = {"decode": [], "run": [], "encode": [], "write": []}
def timed(name, fn):
    def wrapper(*args):
        t0 = time.perf_counter(); out = fn(*args); times[name].append(time.perf_counter() - t0); return out
    return wrapper
protocol.ServerProtocol.receive_data = timed("decode", protocol.ServerProtocol.receive_data)
execution.Session.run = timed("run", execution.Session.run)
server._encode_replies = timed("encode", server._encode_replies)
worker_connection.ServedConnection.send = timed("write", worker_connection.ServedConnection.send)
w = tr.start_worker(id="profiled", resume_grace=float(sys.argv[1]))
print(w.url, flush=True)
sys.stdin.readline()
print(json.dumps({k: statistics.median(v[-2000:]) * 1e6 for k, v in times.items() if v}), flush=True)
'''


def main() -> None:
    grace = sys.argv[sys.argv.index("--resume-grace") + 1] if "--resume-grace" in sys.argv else "60"
    proc = subprocess.Popen([sys.executable, "-c", WORKER, grace], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()
        worker = tr.connect(url)
        ws = worker._connection.ws
        marks: dict[str, float] = {}
        send, receive = ws.send, ws.receive

        def timed_send(chunks):
            marks["send0"] = time.perf_counter()
            send(chunks)
            marks["send1"] = time.perf_counter()

        def timed_receive(timeout=None, placement=None):
            message = receive(timeout, placement)
            marks["read"] = time.perf_counter()
            return message

        ws.send, ws.receive = timed_send, timed_receive
        x = torch.ones(10).send(worker)
        rows = []
        for _ in range(2500):
            t0 = time.perf_counter()
            (x + 1).sum().item()
            t1 = time.perf_counter()
            rows.append((marks["send0"] - t0, marks["send1"] - marks["send0"], marks["read"] - marks["send1"],
                         t1 - marks["read"], t1 - t0))
        worker.close()
        proc.stdin.write("\n")
        proc.stdin.flush()
        inside = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
    rows = rows[500:]
    names = ["client: dispatch of 3 ops, encode", "client: send (one write)", "client: waiting for the reply",
             "client: read, decode, deliver, return", "total"]
    print("| piece of one `(x + 1).sum().item()` | µs (median) |\n| --- | ---: |")
    for i, name in enumerate(names):
        print(f"| {name} | {statistics.median(r[i] for r in rows) * 1e6:.0f} |")
    for name, us in inside.items():
        print(f"| worker, within the wait: {name} | {us:.0f} |")


if __name__ == "__main__":
    main()
