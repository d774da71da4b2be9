"""The peers torchremote is measured against, each run as its own process on 127.0.0.1.

    python -m benchmarks.peers ws          # websockets echo server (threading API); prints its URL
    python -m benchmarks.peers ws-asyncio  # websockets echo server (asyncio API); prints its URL
    python -m benchmarks.peers ws-sansio   # websockets sans-I/O echo over blocking sockets; prints its URL
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


def serve_ws_asyncio() -> None:
    import asyncio
    from websockets.asyncio.server import serve

    async def echo(conn) -> None:
        async for message in conn:
            await conn.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", 0, compression=None, max_size=None) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            print(f"ws://127.0.0.1:{port}", flush=True)
            await server.serve_forever()

    asyncio.run(main())


class SansIOClient:
    """The plainest websockets sans-I/O client over a blocking socket: every byte through the
    protocol object, one thread, no hand-off."""

    def __init__(self, url: str) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri
        uri = parse_uri(url)
        self.sock = socket.create_connection((uri.host, uri.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.proto = ClientProtocol(uri, max_size=None)
        self.proto.send_request(self.proto.connect())
        self._flush()
        while not self.proto.events_received():
            self.proto.receive_data(self.sock.recv(65536))
        self._messages: list = []

    def _flush(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        self.proto.send_binary(data)
        self._flush()

    def recv(self) -> bytes:
        parts: list = []
        while True:
            for frame in self.proto.events_received():
                parts.append(frame.data)
                if frame.fin:
                    return b"".join(parts)
            self.proto.receive_data(self.sock.recv(1 << 20))
            self._flush()

    def close(self) -> None:
        self.sock.close()


def serve_ws_sansio() -> None:
    from websockets.server import ServerProtocol
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"ws://127.0.0.1:{listener.getsockname()[1]}", flush=True)

    def echo(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto = ServerProtocol(max_size=None)
        parts: list = []
        while True:
            data = conn.recv(1 << 20)
            if not data:
                return conn.close()
            proto.receive_data(data)
            for event in proto.events_received():
                if hasattr(event, "opcode"):
                    parts.append(event.data)
                    if event.fin:
                        proto.send_binary(b"".join(parts))
                        parts = []
                else:  # the opening request
                    proto.send_response(proto.accept(event))
            for out in proto.data_to_send():
                if out:
                    conn.sendall(out)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


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
    elif kind == "ws-asyncio":
        serve_ws_asyncio()
    elif kind == "ws-sansio":
        serve_ws_sansio()
    elif kind == "tcp":
        serve_tcp()
    elif kind == "rpc":
        serve_rpc(int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown peer {kind!r}")
