"""The transport at the frame level: `torchremote.wire.websocket.WebSocket` on socket pairs, against
websockets' own sans-I/O protocol objects writing the other end byte for byte."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

import torchremote as tr
from torchremote.wire import codec as wire, messages as m
from torchremote.wire.websocket import ConnectionClosed, Placed, WebSocket, unmask_in_place

MiB = 1 << 20


def ws_pair(**options) -> tuple[WebSocket, WebSocket]:
    """A client and a server WebSocket, already open, joined by a socket pair."""
    a, b = socket.socketpair()
    client = WebSocket(a, ClientProtocol(parse_uri("ws://peer"), state=State.OPEN, max_size=None), **options)
    server = WebSocket(b, ServerProtocol(state=State.OPEN, max_size=None), **options)
    return client, server


def server_and_raw_client(max_size: int | None = None) -> tuple[WebSocket, socket.socket, ClientProtocol]:
    """A server WebSocket, the socket of its peer, and websockets' own client protocol object to
    write that peer's frames exactly as RFC 6455 says."""
    a, b = socket.socketpair()
    server = WebSocket(b, ServerProtocol(state=State.OPEN, max_size=max_size))
    return server, a, ClientProtocol(parse_uri("ws://peer"), state=State.OPEN, max_size=None)


def write_raw(sock: socket.socket, proto, step: int | None = None) -> None:
    """Send what a websockets protocol object queued; `step` bytes per write (TCP splits frames)."""
    data = b"".join(proto.data_to_send())
    if step is None:
        sock.sendall(data)
    else:
        for i in range(0, len(data), step):
            sock.sendall(data[i:i + step])


def test_fragmented_messages_with_a_ping_between_fragments():
    server, a, peer = server_and_raw_client()
    peer.send_binary(b"ab", fin=False)
    peer.send_continuation(b"cd", fin=False)
    peer.send_ping(b"are you there")
    peer.send_continuation(b"ef", fin=True)
    peer.send_binary(b"next")
    write_raw(a, peer)
    assert server.receive(5) == b"abcdef"
    assert server.receive(5) == b"next"
    a.settimeout(5)
    peer.receive_data(a.recv(1024))
    (pong,) = peer.events_received()
    assert pong.opcode is Opcode.PONG and pong.data == b"are you there"


def test_frames_split_across_reads_and_both_paths_interleaved():
    client, server = ws_pair()
    big = os.urandom(3 * MiB + 5)           # the direct path: one frame, read straight in
    messages = [b"small", big, b"", b"x" * 70_000, big[:300_000]]
    sender = threading.Thread(target=lambda: [client.send([memoryview(msg)]) for msg in messages])
    sender.start()
    got = [bytes(server.receive(5)) for _ in messages]
    sender.join()
    assert got == messages
    # and one byte per TCP write, through the sans-I/O path (a fragmented message) and ours
    receiver, a, peer = server_and_raw_client()
    peer.send_binary(b"1234", fin=False)
    peer.send_continuation(b"5678", fin=True)
    peer.send_binary(b"whole")
    threading.Thread(target=write_raw, args=(a, peer, 1)).start()
    assert receiver.receive(5) == b"12345678" and receiver.receive(5) == b"whole"


def test_a_large_message_is_read_into_the_destination_the_placement_picks():
    client, server = ws_pair()
    tensor = torch.randint(0, 255, (5 * MiB,), dtype=torch.uint8)
    frame = wire.encode([m.Chunk(7, 0, tensor)])
    destination = torch.zeros(5 * MiB, dtype=torch.uint8)

    class Into:
        head_length = staticmethod(wire.head_length)

        def destination(self, head, remaining):
            chunk = wire.chunk_in(head, remaining)
            assert (chunk.id, chunk.offset, remaining) == (7, 0, 5 * MiB)
            return destination, chunk

    threading.Thread(target=client.send, args=(frame,)).start()
    placed = server.receive(5, Into())
    assert isinstance(placed, Placed) and placed.tensor is destination and placed.message.id == 7
    assert torch.equal(destination, tensor)  # unmasked in place


def test_a_close_in_mid_message_is_a_clean_error():
    server, a, peer = server_and_raw_client()
    peer.send_binary(os.urandom(2 * MiB))
    data = b"".join(peer.data_to_send())

    def half_then_close():
        a.sendall(data[:MiB])
        a.close()

    threading.Thread(target=half_then_close).start()
    with pytest.raises(ConnectionClosed, match="mid-message"):
        server.receive(5)
    with pytest.raises(ConnectionClosed):
        server.send([b"anyone?"])


def test_a_close_frame_ends_the_connection_for_the_reader():
    client, server = ws_pair()
    client.close()
    with pytest.raises(ConnectionClosed, match="code 1000"):
        server.receive(5)


def test_ping_and_pong_while_a_large_transfer_runs():
    client, server = ws_pair()
    payload = os.urandom(32 * MiB)
    sending = threading.Thread(target=client.send, args=([payload],))
    sending.start()
    time.sleep(0.05)
    server.ping()                   # sent while the client's frame is still arriving
    received = server.receive(10)
    sending.join()
    assert bytes(received) == payload
    assert client.receive(5) is None  # the client reads the ping and answers it
    deadline = time.monotonic() + 5
    while server._ping_sent is not None and time.monotonic() < deadline:
        server.receive(0.1)
        server.keepalive(interval=60, timeout=60)
    assert server._ping_sent is None  # the pong arrived: the ping is answered


def test_a_busy_peer_stays_alive_through_heartbeats_and_a_silent_one_is_dropped():
    client, server = ws_pair()
    client.ping()
    server.heartbeat()              # busy: it cannot read the ping, but says it is alive
    assert client.receive(1) is None
    client.keepalive(interval=60, timeout=0.2)
    time.sleep(0.3)
    client.keepalive(interval=60, timeout=0.2)  # answered by the heartbeat: still alive
    client.keepalive(interval=0, timeout=0.2)   # pings again; the server now stays silent
    time.sleep(0.3)
    with pytest.raises(ConnectionClosed, match="did not answer"):
        client.keepalive(interval=0, timeout=0.2)


def test_a_peer_that_stops_reading_is_dropped_after_the_stall_timeout():
    client, server = ws_pair(stall_s=0.5)
    for s in (client.sock, server.sock):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    t0 = time.monotonic()
    with pytest.raises(ConnectionClosed, match="sending failed"):
        server.send([os.urandom(16 * MiB)])  # the client never reads
    assert time.monotonic() - t0 < 5


def test_protocol_violations_close_the_connection_with_a_reason():
    server, a, _ = server_and_raw_client(max_size=1000)
    a.sendall(bytes([0x82, 0x05]) + b"hello")   # a client frame without a mask
    with pytest.raises(ConnectionClosed, match="protocol error"):
        server.receive(5)
    a.settimeout(5)
    assert a.recv(2)[0] == 0x88                  # a close frame goes back
    server, a, _ = server_and_raw_client(max_size=1000)
    a.sendall(bytes([0x82, 0xFF]) + (1 << 40).to_bytes(8, "big") + os.urandom(4))  # 1 TiB claimed
    with pytest.raises(ConnectionClosed, match="over the limit"):
        server.receive(5)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 4096, 4099])
@pytest.mark.parametrize("start", [0, 1, 2, 3])
def test_unmasking_in_place_matches_websockets(n, start):
    from websockets.frames import apply_mask
    buffer = bytearray(os.urandom(n + 8))
    mask = os.urandom(4)
    view = memoryview(buffer)[start:start + n]
    expected = apply_mask(bytes(view), mask)
    unmask_in_place(view, mask)
    assert bytes(view) == expected


def test_large_gets_and_sends_go_straight_into_their_buffers(server, monkeypatch):
    from torchremote.wire.protocol import ChunkPlacement
    placed = []
    destination = ChunkPlacement.destination

    def spy(self, head, remaining):
        target = destination(self, head, remaining)
        placed.append(target is not None)
        return target

    monkeypatch.setattr(ChunkPlacement, "destination", spy)
    t = torch.randn(3 * 1024 * 1024 + 100_000)  # three full 4 MiB chunks and a 400 kB one
    with tr.connect(server.url) as w:
        back = t.send(w).get()
    assert torch.equal(back, t) and placed.count(True) == 8  # four chunks each way, on both sides


def test_a_standard_websocket_client_can_talk_to_a_worker(server):
    from websockets.sync.client import connect
    from torchremote.wire.protocol import ClientProtocol as TorchremoteClient
    proto = TorchremoteClient("plain-websockets")
    with connect(server.url, proxy=None, compression=None, max_size=None) as ws:
        ws.send(b"".join(proto.hello()))
        proto.receive_welcome(ws.recv(timeout=5))
        ref = proto.put(torch.arange(3.0))
        proto.request(m.Fetch, ref)
        ws.send(b"".join(proto.data_to_send()))
        ack, reply = proto.receive_data(ws.recv(timeout=5))
        assert ack == m.Ack(1) and reply.value.tolist() == [0.0, 1.0, 2.0]


def test_threads_sharing_one_worker_each_get_their_own_replies(server):
    """One thread reads the socket for all; the others are handed their replies and lead in turn."""
    with tr.connect(server.url) as w:
        xs = [torch.full((4,), float(i)).send(w) for i in range(8)]
        errors = []

        def run(i: int) -> None:
            try:
                for k in range(100):
                    assert (xs[i] + k).sum().item() == 4 * (i + k)
                    if k % 25 == 0:
                        assert w.search() is not None  # another kind of request, interleaved
            except Exception as e:  # collected: an assert in a thread would not fail the test
                errors.append((i, repr(e)))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == [] and not any(t.is_alive() for t in threads)


def test_a_long_op_is_not_taken_for_a_dead_worker(monkeypatch):
    """With pings after 0.1 s of quiet and 0.1 s to answer them, one op several times as long on the
    worker still completes: the worker's heartbeats keep its waiting client from declaring it dead."""
    from torchremote.client import connection as client_connection
    from torchremote.wire import websocket
    monkeypatch.setattr(websocket, "PING_INTERVAL_S", 0.1)
    monkeypatch.setattr(websocket, "PING_TIMEOUT_S", 0.1)
    monkeypatch.setattr(client_connection, "TICK_S", 0.02)
    worker = tr.start_worker(id="slow")
    try:
        with tr.connect(worker.url) as w:
            a = torch.randn(1000, 1000).send(w)
            t0 = time.monotonic()
            torch.matrix_power(a, 2**62).sum().item()  # 62 squarings in one op
            assert time.monotonic() - t0 > 0.25  # longer than a silent worker would be given
            assert not w.closed and (torch.ones(2).send(w) * 2).sum().item() == 4.0
    finally:
        worker.stop()
