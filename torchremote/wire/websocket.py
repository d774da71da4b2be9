"""RFC 6455 connections on blocking sockets that the caller's own thread drives.

websockets' sans-I/O protocol objects (`websockets.client.ClientProtocol`,
`websockets.server.ServerProtocol`) run the opening handshake, ping/pong, the closing handshake and
any fragmented or text message a foreign peer sends. A binary message in one frame, which is how
torchremote peers send every message, is framed and parsed here instead:

- reading, its payload goes from the socket straight into memory the caller picks (`Placement`: the
  destination tensor of a chunk) and is unmasked there in place. The sans-I/O parser would buffer,
  slice, unmask and hand over each payload: four copies, ~0.7 s per GiB on a 2-core machine;
- writing, the header goes out, then the payload's own buffers, unjoined; a client masks them piece
  by piece (RFC 6455 requires client frames to be masked), one pass through the cache.

Skipping whole unfragmented frames leaves the sans-I/O parser's state valid, so the two paths can
take turns frame by frame, and any websocket peer can still talk to either side.

One thread at a time may call `receive()`; `send()`, `ping()` and `close()` may be called from any
thread. No thread is started here.
"""
from __future__ import annotations

import os
import select
import socket
import ssl as ssl_module
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake
from websockets.frames import CloseCode, Opcode, apply_mask  # the C speedup when built
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from .codec import PREFIX_BYTES, bytes_of

DIRECT_BYTES = 256 << 10     # binary frames this large are read straight to their destination
JOIN_BYTES = 64 << 10        # smaller messages go out as one buffer (one write), larger unjoined
READ_BYTES = 256 << 10       # how much one read asks for when reading small frames
MASK_PIECE_BYTES = 1 << 20   # a client masks large payloads this much at a time (stays in cache)
UNMASK_WORDS = 32768         # torch's grain size: smaller ops never wake its thread pool, whose
                             # spinning threads would take the cores the socket copies need
MAX_HEAD_BYTES = 1 << 20     # the most of a large message read before choosing its destination
MAX_HTTP_BYTES = 64 << 10    # an opening handshake longer than this is refused
PING_INTERVAL_S = 10.0       # a peer quiet this long is pinged...
PING_TIMEOUT_S = 10.0        # ...and declared dead if it then stays quiet this long
STALL_S = 30.0               # a read or write of a started frame that makes no progress this long
CLOSE_CODES_NORMAL = (CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY)


class ConnectionClosed(Exception):
    """The connection ended: closed by either side, torn, timed out, or broken by a protocol error."""


@dataclass
class Placed:
    """A message whose bytes after its head were read straight into `tensor`; `message` is what the
    placement said the whole message means."""
    tensor: torch.Tensor
    message: Any


class Placement(Protocol):
    """Where the payload of a large message goes, decided from its first bytes."""

    def head_length(self, prefix: memoryview) -> int | None:
        """How many bytes of the message to read before choosing (`prefix`: the first PREFIX_BYTES)."""

    def destination(self, head: bytes, remaining: int) -> tuple[torch.Tensor, Any] | None:
        """A uint8 tensor of exactly `remaining` bytes to read the rest into, and what the message
        means once it is there; or None."""


class WebSocket:
    """An open websocket connection: `send()` messages, `receive()` them, `ping()`, `close()`."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol | ServerProtocol,
                 buffered: bytes = b"", *, stall_s: float = STALL_S) -> None:
        self.sock = sock
        self.protocol = protocol
        self.is_client = isinstance(protocol, ClientProtocol)
        # websockets 16+ names it max_message_size; 14-15, max_size
        self.max_size = getattr(protocol, "max_message_size", getattr(protocol, "max_size", None))
        self._buf = bytearray(buffered)   # bytes read but not yet parsed
        self._send_lock = threading.Lock()    # one frame on the socket at a time
        self._state_lock = threading.Lock()   # the sans-I/O object's state
        self._fragments: list[bytes] = []     # a fragmented message, so far
        self._pollers = threading.local()  # a poll object serves one thread at a time
        self._masks = _MaskPool()
        self.last_received = time.monotonic()
        self.last_sent = self.last_received
        self._ping_sent: float | None = None
        self.closed: str | None = None
        self.closed_by_peer = False  # the peer sent a close frame: it ended the connection on purpose
        self.close_code: int | None = None  # ... with this code (1000: a normal end), and reason
        self.close_reason = ""
        sock.settimeout(stall_s)

    # --- sending ---
    def send(self, chunks: list) -> None:
        """Send one binary message made of these buffers, in order, as one frame."""
        total = sum(len(c) for c in chunks)
        mask = self._masks.next() if self.is_client else None
        header = _frame_header(total, mask)
        with self._send_lock:
            self._check_open()
            if total < JOIN_BYTES:  # one write: header and payload together
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._write([header + (apply_mask(data, mask) if mask else bytes(data))])
            elif mask is None:
                self._write([header, *chunks])
            else:
                self._write([header])
                self._write_masked(chunks, mask)
            self.last_sent = time.monotonic()

    def _write_masked(self, chunks: list, mask: bytes) -> None:
        offset = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            for start in range(0, len(view), MASK_PIECE_BYTES):
                piece = view[start:start + MASK_PIECE_BYTES]
                self._write([apply_mask(piece, _rotated(mask, offset))])
                offset += len(piece)

    def _write(self, buffers: list) -> None:
        try:
            for b in buffers:
                if len(b):
                    self.sock.sendall(b)
        except (OSError, ValueError) as e:
            raise self._lost(f"sending failed: {_describe(e)}") from e

    def ping(self) -> None:
        with self._send_lock:
            self._send_control(self.protocol.send_ping)
            self._ping_sent = self.last_sent

    def heartbeat(self) -> None:
        """An unsolicited pong: tells a waiting peer this side is alive while it is busy. Skipped
        while a frame is being sent (that is a sign of life too, and it may be stalled)."""
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            self._send_control(self.protocol.send_pong)
        finally:
            self._send_lock.release()

    def _send_control(self, queue: Callable[[bytes], None]) -> None:
        """Queue a control frame with the sans-I/O protocol and write it (send lock held)."""
        with self._state_lock:
            self._check_open()
            queue(b"")
            writes = self.protocol.data_to_send()
        self._write(writes)
        self.last_sent = time.monotonic()

    def keepalive(self, interval: float | None = None, timeout: float | None = None) -> None:
        """Ping a peer quiet for `interval`; `ConnectionClosed` once a ping is unanswered for `timeout`
        (defaults: PING_INTERVAL_S and PING_TIMEOUT_S, read at each call)."""
        interval = PING_INTERVAL_S if interval is None else interval
        timeout = PING_TIMEOUT_S if timeout is None else timeout
        now = time.monotonic()
        if self._ping_sent is not None:
            if self.last_received >= self._ping_sent:
                self._ping_sent = None
            elif now - self._ping_sent > timeout:
                raise self._lost(f"the peer did not answer for {now - self.last_received:.0f} s")
            else:
                return
        if now - self.last_received >= interval:
            self.ping()

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send a close frame if still open, then close the socket (a reader blocked in it returns)."""
        try:
            if self.closed is None:
                with self._send_lock:
                    with self._state_lock:
                        if self.protocol.state is State.OPEN:
                            self.protocol.send_close(code, reason)
                        writes = self.protocol.data_to_send()
                    self._write([w for w in writes if w])
        except ConnectionClosed:
            pass
        finally:
            self.closed = self.closed or "closed"
            close_socket(self.sock)

    # --- receiving ---
    def readable(self, timeout: float) -> bool:
        """True when a message has started arriving (or the connection ended) within `timeout`."""
        if self._buf or (isinstance(self.sock, ssl_module.SSLSocket) and self.sock.pending()):
            return True
        poller = getattr(self._pollers, "poller", None)
        try:
            if poller is None:
                poller = self._pollers.poller = select.poll()
                poller.register(self.sock.fileno(), select.POLLIN)
            return bool(poller.poll(max(0.0, timeout) * 1000))
        except (OSError, ValueError):
            return True  # closed meanwhile: the read reports it

    def receive(self, timeout: float | None = None, placement: Placement | None = None
                ) -> bytes | bytearray | Placed | None:
        """The next message, or None if none started within `timeout` (None: wait for ever).
        Pings are answered on the way. Raises `ConnectionClosed` when the connection ends."""
        wait = timeout
        while True:
            if not self._buf and wait is not None and not self.readable(wait):
                return None
            message = self._next_frame(placement)
            if message is not None:
                return message
            if self.protocol.current_size is None and wait is not None:
                wait = 0  # a control frame: keep going only on data already here
            else:
                wait = timeout  # a fragment of a message begun: wait for the rest as for its start

    def _next_frame(self, placement: Placement | None) -> bytes | bytearray | Placed | None:
        self._fill(2)
        b0, b1 = self._buf[0], self._buf[1]
        size, header = b1 & 0x7F, 2
        if size == 126:
            self._fill(4)
            size, header = struct.unpack_from("!H", self._buf, 2)[0], 4
        elif size == 127:
            self._fill(10)
            size, header = struct.unpack_from("!Q", self._buf, 2)[0], 10
        masked = bool(b1 & 0x80)
        header += 4 if masked else 0
        if self.max_size is not None and size > self.max_size:
            self._fail(CloseCode.MESSAGE_TOO_BIG, f"a frame of {size} bytes is over the limit of {self.max_size}")
        if (b0 == 0x80 | Opcode.BINARY and masked != self.is_client
                and self.protocol.current_size is None and self.protocol.state is State.OPEN):
            # a whole binary message in one frame, as torchremote peers send them: read here
            if size >= DIRECT_BYTES:
                self._fill(header)
                mask = bytes(self._buf[header - 4:header]) if masked else None
                del self._buf[:header]
                return self._read_large(size, mask, placement)
            self._fill(header + size)
            payload = bytes(self._buf[header:header + size])
            if masked:
                payload = apply_mask(payload, bytes(self._buf[header - 4:header]))
            del self._buf[:header + size]
            return payload
        self._fill(header + size)
        frame = bytes(self._buf[:header + size])
        del self._buf[:header + size]
        return self._feed(frame)

    def _feed(self, frame: bytes) -> bytes | None:
        """Let the sans-I/O protocol parse a frame; answer what it answers; return a message if one
        is complete."""
        with self._state_lock:
            self.protocol.receive_data(frame)
            events = self.protocol.events_received()
            writes = self.protocol.data_to_send()
            error = self.protocol.parser_exc
        closing = any(event.opcode is Opcode.CLOSE for event in events)
        if writes:
            try:
                with self._send_lock:
                    self._write([w for w in writes if w])
            except ConnectionClosed:
                if not closing:  # the echo of a close may find the peer gone: that is its right
                    raise
        if error is not None:
            raise self._lost(f"protocol error: {error}")
        message = None
        for event in events:
            opcode = event.opcode
            if opcode is Opcode.BINARY or opcode is Opcode.TEXT or opcode is Opcode.CONT:
                self._fragments.append(event.data)
                if event.fin:
                    parts, self._fragments = self._fragments, []
                    message = parts[0] if len(parts) == 1 else b"".join(parts)  # text too: as bytes
            elif opcode is Opcode.CLOSE:
                close = self.protocol.close_rcvd
                code = close.code if close is not None else CloseCode.NO_STATUS_RCVD
                why = f" ({close.reason})" if close is not None and close.reason else ""
                self.closed = f"closed by the peer (code {int(code)}{why})"
                self.closed_by_peer, self.close_code = True, int(code)
                self.close_reason = close.reason if close is not None else ""
                close_socket(self.sock)
                raise ConnectionClosed(self.closed)
        return message

    def _read_large(self, size: int, mask: bytes | None, placement: Placement | None
                    ) -> bytearray | Placed:
        """A whole binary message in one large frame, its payload read where the placement says
        (or into a buffer of its own)."""
        if placement is None or size < PREFIX_BYTES:
            return self._read_rest(b"", size, mask)
        head = self._read_rest(b"", PREFIX_BYTES, mask)
        head_len = placement.head_length(memoryview(head))
        if head_len is None or not PREFIX_BYTES <= head_len <= min(size, MAX_HEAD_BYTES):
            return self._read_rest(head, size, mask)
        head = self._read_rest(head, head_len, mask)
        placed = placement.destination(bytes(head), size - head_len)
        if placed is None:
            return self._read_rest(head, size, mask)
        target, message = placed
        self._read_into(bytes_of(target), mask, head_len)
        return Placed(target, message)

    def _read_rest(self, start: bytearray | bytes, size: int, mask: bytes | None) -> bytearray:
        """The first `size` bytes of the payload, of which `start` was read already."""
        out = bytearray(size)
        out[:len(start)] = start
        self._read_into(memoryview(out)[len(start):], mask, len(start))
        return out

    def _read_into(self, view: memoryview, mask: bytes | None, phase: int) -> None:
        """Fill `view` from what is buffered, then from the socket; unmask it in place."""
        got = min(len(self._buf), len(view))
        if got:
            view[:got] = self._buf[:got]
            del self._buf[:got]
        try:
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise self._lost("the peer closed the connection in mid-message")
                got += n
        except (OSError, ValueError) as e:
            raise self._lost(f"reading failed: {_describe(e)}") from e
        self.last_received = time.monotonic()
        if mask is not None:
            unmask_in_place(view, _rotated(mask, phase))

    def _fill(self, n: int) -> None:
        """Read until at least `n` bytes are buffered."""
        try:
            while len(self._buf) < n:
                data = self.sock.recv(max(READ_BYTES, n - len(self._buf)))
                if not data:
                    raise self._lost("the peer closed the connection" +
                                     (" in mid-message" if self._buf or self._fragments else ""))
                self._buf += data
        except (OSError, ValueError) as e:
            raise self._lost(f"reading failed: {_describe(e)}") from e
        self.last_received = time.monotonic()

    # --- failure ---
    def _check_open(self) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        if self.protocol.state is not State.OPEN:
            raise ConnectionClosed("the connection is closing")

    def _fail(self, code: int, reason: str) -> None:
        """A protocol violation by the peer: tell it why (best effort), close, raise."""
        try:
            with self._state_lock:
                self.protocol.fail(code, reason[:120])
                writes = self.protocol.data_to_send()
            with self._send_lock:
                self._write([w for w in writes if w])
        except ConnectionClosed:
            pass
        raise self._lost(reason)

    def _lost(self, why: str) -> ConnectionClosed:
        if self.closed is None:
            self.closed = why
            close_socket(self.sock)
        return ConnectionClosed(self.closed)


def unmask_in_place(view: memoryview, mask: bytes) -> None:
    """XOR `view` with the repeating 4-byte `mask` in place, 4 bytes at a time through torch."""
    n = len(view)
    if n == 0:
        return
    address = torch.frombuffer(view, dtype=torch.uint8).data_ptr()
    lead = min((-address) % 4, n)
    if lead:
        view[:lead] = apply_mask(view[:lead], mask)
    bulk = (n - lead) // 4 * 4
    if bulk:
        word = int.from_bytes(_rotated(mask, lead), "little", signed=True)
        words = torch.frombuffer(view[lead:lead + bulk], dtype=torch.int32)
        for start in range(0, len(words), UNMASK_WORDS):  # blocks torch runs on this thread alone
            words[start:start + UNMASK_WORDS].bitwise_xor_(word)
    if lead + bulk < n:
        view[lead + bulk:] = apply_mask(view[lead + bulk:], _rotated(mask, lead + bulk))


class _MaskPool:
    """Masking keys from the OS's strong random source (RFC 6455 10.3), fetched 1,024 at a time:
    one `getrandom` call per message cost a small op's send several µs."""

    def __init__(self) -> None:
        self._keys = iter(())
        self._lock = threading.Lock()

    def next(self) -> bytes:
        with self._lock:
            key = next(self._keys, None)
            if key is None:
                block = os.urandom(4096)
                self._keys = (block[i:i + 4] for i in range(4, 4096, 4))
                key = block[:4]
            return key


def _frame_header(size: int, mask: bytes | None) -> bytes:
    """The header of a final binary frame of `size` bytes (RFC 6455 5.2), masked when `mask` is given."""
    bit = 0x80 if mask is not None else 0
    if size < 126:
        header = bytes([0x80 | Opcode.BINARY, bit | size])
    elif size < 1 << 16:
        header = bytes([0x80 | Opcode.BINARY, bit | 126]) + struct.pack("!H", size)
    else:
        header = bytes([0x80 | Opcode.BINARY, bit | 127]) + struct.pack("!Q", size)
    return header + mask if mask is not None else header


def _rotated(mask: bytes, offset: int) -> bytes:
    """The mask as it applies from byte `offset` of a payload on."""
    k = offset % 4
    return mask[k:] + mask[:k] if k else mask


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def close_socket(sock: socket.socket) -> None:
    """Shut a socket down and close it, whatever state it is in."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# --- opening handshakes ------------------------------------------------------------------------

def _read_http(sock: socket.socket, protocol: Any, deadline: float) -> tuple[Any, bytes]:
    """Feed the peer's HTTP request or response to `protocol` until it yields it; returns it and the
    bytes read past its end (frames, which the frame reader takes over)."""
    buf, head_done = b"", False
    while True:
        if not head_done:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head_done = True
                protocol.receive_data(buf[:end + 4])
                buf = buf[end + 4:]
                events = protocol.events_received()
                if events:
                    return events[0], buf
                protocol.receive_data(buf)  # a refusal with a body: the parser reads on
                buf = b""
            elif len(buf) > MAX_HTTP_BYTES:
                raise ConnectionClosed("the opening handshake is too long")
        events = protocol.events_received() if head_done else []
        if events:
            return events[0], b""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out during the opening handshake")
        sock.settimeout(remaining)
        data = sock.recv(READ_BYTES)
        if not data:
            protocol.receive_eof()
            events = protocol.events_received()
            if events:
                return events[0], b""
            raise ConnectionClosed("the peer closed the connection during the opening handshake")
        if head_done:
            protocol.receive_data(data)
        else:
            buf += data


def open_client(url: str, *, timeout: float, ssl: ssl_module.SSLContext | None, max_size: int | None,
                stall_s: float = STALL_S) -> WebSocket:
    """Connect to `url` (ws:// or wss://, certificates verified unless `ssl` says otherwise)."""
    uri = parse_uri(url)
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if uri.secure:
            context = ssl if ssl is not None else ssl_module.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=uri.host)
        protocol = ClientProtocol(uri, max_size=max_size)
        protocol.send_request(protocol.connect())
        for data in protocol.data_to_send():
            sock.sendall(data)
        response, rest = _read_http(sock, protocol, deadline)
        if protocol.handshake_exc is not None:
            raise protocol.handshake_exc
        if not isinstance(response, Response) or protocol.state is not State.OPEN:
            raise InvalidHandshake("the server did not accept the websocket upgrade")
        return WebSocket(sock, protocol, rest, stall_s=stall_s)
    except BaseException:
        close_socket(sock)
        raise


def accept_server(sock: socket.socket, *, timeout: float, max_size: int | None,
                  process_request: Callable[[Request], Response | None] | None = None,
                  stall_s: float = STALL_S) -> WebSocket:
    """Run the server side of the opening handshake on an accepted (and, for TLS, wrapped) socket.
    Raises after answering a request that is not a websocket upgrade with an HTTP error."""
    deadline = time.monotonic() + timeout
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    protocol = ServerProtocol(max_size=max_size)
    try:
        if isinstance(sock, ssl_module.SSLSocket):
            sock.settimeout(timeout)
            sock.do_handshake()
        request, rest = _read_http(sock, protocol, deadline)
        if not isinstance(request, Request):
            raise ConnectionClosed("the peer sent no HTTP request")
        response = protocol.accept(request)
        protocol.send_response(response)
        for data in protocol.data_to_send():
            if data:
                sock.sendall(data)
        if protocol.handshake_exc is not None:
            raise protocol.handshake_exc
        return WebSocket(sock, protocol, rest, stall_s=stall_s)
    except BaseException:
        close_socket(sock)
        raise
