"""The peers torchremote is measured against, each run as its own process on 127.0.0.1.

    python -m benchmarks.peers ws          # websockets echo server; prints its URL
    python -m benchmarks.peers tcp         # length-prefixed TCP echo server; prints its port
    python -m benchmarks.peers rpc PORT    # torch.distributed.rpc (TensorPipe) rank 1, named "peer"
"""
from __future__ import annotations

import os
import socket
import struct
import sys
import threading

import torch

RPC_OPTIONS = dict(num_worker_threads=4, _transports=["uv"], _channels=["basic"])


def rpc_env(port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TP_SOCKET_IFNAME="lo",
                      GLOO_SOCKET_IFNAME="lo")


def rpc_init(name: str, rank: int, port: int) -> None:
    import torch.distributed.rpc as rpc
    rpc_env(port)
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", **RPC_OPTIONS)
    rpc.init_rpc(name, rank=rank, world_size=2, rpc_backend_options=options)


# functions the benchmark asks the rpc peer to run (importable on both sides)
def add_sum_item(rref) -> float:
    return (rref.local_value() + 1).sum().item()


def add_one(rref) -> torch.Tensor:
    return rref.local_value() + 1


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def serve_ws() -> None:
    from websockets.sync.server import serve

    def echo(conn) -> None:
        for message in conn:
            conn.send(message)

    with serve(echo, "127.0.0.1", 0, compression=None, max_size=None) as server:
        print(f"ws://127.0.0.1:{server.socket.getsockname()[1]}", flush=True)
        server.serve_forever()


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("closed")
        got += k
    return buf


def serve_tcp() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    print(listener.getsockname()[1], flush=True)

    def echo(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                (n,) = struct.unpack("<Q", recv_exact(conn, 8))
                data = recv_exact(conn, n)
                conn.sendall(struct.pack("<Q", n))
                conn.sendall(data)
        except ConnectionError:
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def serve_rpc(port: int) -> None:
    import torch.distributed.rpc as rpc
    rpc_init("peer", 1, port)
    rpc.shutdown()  # serves until the benchmark (rank 0) shuts down too


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "ws":
        serve_ws()
    elif kind == "tcp":
        serve_tcp()
    elif kind == "rpc":
        serve_rpc(int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown peer {kind!r}")
