"""Bytes <-> messages. No I/O.

A frame is one websocket message:

    MAGIC | u32 body_len | u32 table_len | body | table | buffer 0 | buffer 1 | ...

`body` is msgpack: the list of items of a batch (`messages.py`), each a plain array `[type code,
*fields]` (an op's positional arguments as an array too), and torch values inside them carried as
msgpack ext types. Object references, the commonest value, are a fixed 16-byte ext. `table` is msgpack: one `[dtype, shape, perm]` entry per tensor in the body, in order. Each
buffer holds that tensor's elements, raw and little-endian, in memory order: a tensor whose strides
are a permutation of a contiguous layout (a transpose, channels-last) travels as is and keeps its
strides; any other view travels compacted, as `clone()` would lay it out. So a view of a large
storage moves only its own elements. Tensors are never pickled.

`decode` is total: for any input it returns items or raises `ProtocolError`, and it never allocates
more than the input's size for tensor data (a header cannot make it reserve memory it did not send).
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import fields
from typing import Any

import msgpack
import torch

from . import messages as m
from ._memory import empty_bytes
from .errors import ProtocolError

_PREFIX = struct.Struct("<4sII")
_REF = struct.Struct("<qq")  # ClientRef: op id, output index
MAX_DIMS = 64

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float16, torch.float32, torch.float64, torch.bfloat16,
        torch.complex32, torch.complex64, torch.complex128,
        torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool,
        torch.float8_e4m3fn, torch.float8_e5m2,
    )
}
_ALL_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}

# ext type codes: append only
_TENSOR, _CLIENT_REF, _PUB_REF, _TUPLE, _DTYPE, _DEVICE, _SLICE, _ELLIPSIS, _SIZE, _COMPLEX, \
    _MEMORY_FORMAT, _LAYOUT, _RETURN_TYPE, _STRUCT = range(1, 15)

_STRUCTS: tuple[type, ...] = m.MESSAGE_TYPES + m.VALUE_TYPES
_STRUCT_CODE = {cls: i for i, cls in enumerate(_STRUCTS)}
_STRUCT_ARITY = {cls: len(fields(cls)) for cls in _STRUCTS}
_NAMED_ENUMS = {
    _MEMORY_FORMAT: (torch.memory_format, {str(v).removeprefix("torch."): v for v in vars(torch).values()
                                           if isinstance(v, torch.memory_format)}),
    _LAYOUT: (torch.layout, {str(v).removeprefix("torch."): v for v in vars(torch).values()
                             if isinstance(v, torch.layout)}),
}


class EncodeError(TypeError):
    """A value torchremote does not know how to send (a Python object that is not data)."""


# --- tensors <-> raw buffers ---------------------------------------------------------------------

def memory_order(t: torch.Tensor) -> list[int] | None:
    """The dim permutation that makes `t` contiguous, if its elements are dense in memory."""
    if t.is_contiguous():
        return None
    perm = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
    if t.permute(perm).is_contiguous():
        return perm
    return []  # not dense: travels compacted


def strides_after_transfer(t: torch.Tensor) -> tuple[int, ...]:
    """The strides `t` has once it arrives on the other side (those of `t.clone()`)."""
    perm = memory_order(t)
    if perm is None or perm == []:
        return torch.empty(t.shape, device="meta").stride()
    return tuple(t.stride())


def meta_after_transfer(t: torch.Tensor) -> m.TensorMeta:
    """The metadata `t` has once it arrives on the other side (laid out as `t.clone()` would be)."""
    return m.TensorMeta(tuple(t.shape), tuple(strides_after_transfer(t)), 0, t.dtype, t.requires_grad)


def _raw_view(t: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """A contiguous tensor holding `t`'s elements in memory order, and the permutation to undo."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    perm = memory_order(t)
    if perm is None:
        return t, None
    if perm == []:
        return t.contiguous(), None
    return t.permute(perm), perm


def bytes_of(t: torch.Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes, keeping the tensor alive."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    array._owner = t  # the memoryview keeps `array` alive, `array` keeps the tensor
    return memoryview(array).cast("B")


def _tensor_from(data: memoryview, dtype: torch.dtype, shape: list[int], perm: list[int] | None) -> torch.Tensor:
    out = torch.empty(len(data), dtype=torch.uint8)
    if len(data):
        bytes_of(out)[:] = data
    return _tensor_from_buffer(out, dtype, shape, perm)


def _tensor_from_buffer(out: torch.Tensor, dtype: torch.dtype, shape: list[int],
                        perm: list[int] | None) -> torch.Tensor:
    phys_shape = [shape[d] for d in perm] if perm else shape
    t = out.view(dtype).view(phys_shape)
    if perm:
        inverse = [0] * len(perm)
        for i, d in enumerate(perm):
            inverse[d] = i
        t = t.permute(inverse)
    return t


# --- encode --------------------------------------------------------------------------------------

class _Encoder:
    def __init__(self) -> None:
        self.table: list[list] = []
        self.buffers: list[memoryview] = []
        self._packers: list[msgpack.Packer] = []  # one per nesting depth of ext values, reused
        self._depth = 0

    def pack(self, obj: Any) -> bytes:
        depth = self._depth
        if depth == len(self._packers):
            self._packers.append(msgpack.Packer(default=self.default, strict_types=True, use_bin_type=True))
        self._depth = depth + 1
        try:
            return self._packers[depth].pack(obj)
        except (OverflowError, ValueError) as e:
            raise EncodeError(f"cannot send {type(obj).__name__}: {e}") from None
        finally:
            self._depth = depth

    def item(self, obj: Any) -> list:
        """A batch item as a plain array: its type code, then its fields."""
        values = [_STRUCT_CODE[type(obj)]]
        for name in _ITEM_FIELDS[type(obj)]:
            v = getattr(obj, name)
            values.append(list(v) if name == "args" else v)
        return values

    def default(self, obj: Any) -> msgpack.ExtType:
        pack = self.pack
        if type(obj) is m.ClientRef:
            return msgpack.ExtType(_CLIENT_REF, _REF.pack(obj.op_id, obj.index))
        if isinstance(obj, torch.Tensor):
            return msgpack.ExtType(_TENSOR, pack(self.add_tensor(obj)))
        if type(obj) is m.PublishedRef:
            return msgpack.ExtType(_PUB_REF, pack(obj.pub_id))
        if type(obj) is tuple:
            return msgpack.ExtType(_TUPLE, pack(list(obj)))
        if isinstance(obj, torch.Size):
            return msgpack.ExtType(_SIZE, pack(list(obj)))
        if isinstance(obj, torch.dtype):
            return msgpack.ExtType(_DTYPE, pack(str(obj).removeprefix("torch.")))
        if isinstance(obj, torch.device):
            return msgpack.ExtType(_DEVICE, pack(str(obj)))
        if type(obj) is slice:
            return msgpack.ExtType(_SLICE, pack([obj.start, obj.stop, obj.step]))
        if obj is Ellipsis:
            return msgpack.ExtType(_ELLIPSIS, b"")
        if type(obj) is complex:
            return msgpack.ExtType(_COMPLEX, pack([obj.real, obj.imag]))
        if isinstance(obj, torch.memory_format):
            return msgpack.ExtType(_MEMORY_FORMAT, pack(str(obj).removeprefix("torch.")))
        if isinstance(obj, torch.layout):
            return msgpack.ExtType(_LAYOUT, pack(str(obj).removeprefix("torch.")))
        if type(obj) in _STRUCT_CODE:
            values = [getattr(obj, f.name) for f in fields(obj)]
            return msgpack.ExtType(_STRUCT, pack([_STRUCT_CODE[type(obj)], *values]))
        if isinstance(obj, tuple) and type(obj).__module__ == "torch.return_types":
            return msgpack.ExtType(_RETURN_TYPE, pack([type(obj).__name__, list(obj)]))
        if isinstance(obj, tuple):  # other named tuples travel as plain tuples
            return msgpack.ExtType(_TUPLE, pack(list(obj)))
        if isinstance(obj, bool):
            return bool(obj)
        if isinstance(obj, int):  # IntEnum and friends
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, str):
            return str(obj)
        if isinstance(obj, list):
            return list(obj)
        raise EncodeError(f"torchremote cannot send a value of type {type(obj).__qualname__}")

    def add_tensor(self, t: torch.Tensor) -> int:
        _check_tensor(t)
        raw, perm = _raw_view(t)
        self.table.append([str(t.dtype).removeprefix("torch."), list(t.shape), perm])
        self.buffers.append(bytes_of(raw))
        return len(self.table) - 1


_SENDABLE = (type(None), bool, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
             torch.memory_format, torch.layout, m.ClientRef, m.PublishedRef, type(Ellipsis))


def _check_tensor(t: torch.Tensor) -> None:
    if t.layout != torch.strided:
        raise EncodeError(f"torchremote cannot send {t.layout} tensors yet; only strided tensors")
    if t.device.type == "meta":
        raise EncodeError("torchremote cannot send a meta tensor: it has no data")
    if str(t.dtype).removeprefix("torch.") not in DTYPES:
        raise EncodeError(f"torchremote cannot send tensors of dtype {t.dtype}")


def check_sendable(value: Any) -> None:
    """Raise `EncodeError` now for an argument the wire could not carry when its batch is sent
    (by then, other queued commands would go down with it)."""
    if isinstance(value, torch.Tensor):
        return _check_tensor(value)
    if isinstance(value, _SENDABLE):
        return
    if isinstance(value, int):
        if not -2**63 <= value < 2**64:
            raise EncodeError(f"torchremote cannot send the integer {value}: it does not fit in 64 bits")
        return
    if type(value) is slice:
        for part in (value.start, value.stop, value.step):
            check_sendable(part)
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            check_sendable(v)
        return
    if isinstance(value, dict) and all(type(k) is str for k in value):
        for v in value.values():
            check_sendable(v)
        return
    raise EncodeError(f"torchremote cannot send a value of type {type(value).__qualname__}")


def split_for_transfer(t: torch.Tensor, chunk_bytes: int = m.CHUNK_BYTES
                       ) -> tuple[m.ChunkedTensor, list[tuple[int, torch.Tensor]]]:
    """A large tensor as a header and (offset, uint8 slice) chunks, without copying dense data."""
    raw, perm = _raw_view(t)
    flat = raw.reshape(-1).view(torch.uint8) if raw.numel() else torch.empty(0, dtype=torch.uint8)
    header = m.ChunkedTensor(t.dtype, tuple(t.shape), tuple(perm) if perm else None, flat.numel())
    return header, [(off, flat[off:off + chunk_bytes]) for off in range(0, flat.numel(), chunk_bytes)]


class Assembly:
    """Receives the chunks of one large tensor into a buffer allocated once, up front."""

    def __init__(self, header: m.ChunkedTensor) -> None:
        if header.dtype not in DTYPES.values() or len(header.shape) > MAX_DIMS or min(header.shape, default=0) < 0:
            raise _fail("bad chunked tensor header")
        expected = header.dtype.itemsize
        for s in header.shape:
            expected *= s
        if expected != header.nbytes:
            raise _fail("chunked tensor size does not match its shape")
        if header.perm is not None and sorted(header.perm) != list(range(len(header.shape))):
            raise _fail("bad chunked tensor layout")
        self.header = header
        self.buffer = empty_bytes(header.nbytes)
        self.received = 0

    def slot(self, offset: int, nbytes: int) -> torch.Tensor | None:
        """Where the next chunk's bytes go, if it is the next chunk (to be read straight in)."""
        if offset != self.received or offset + nbytes > self.header.nbytes:
            return None
        return self.buffer[offset:offset + nbytes]

    def add(self, chunk: m.Chunk) -> bool:
        """Take a chunk (copied in, unless it was read into its `slot`); True once complete."""
        end = chunk.offset + chunk.data.numel()
        if chunk.offset != self.received or end > self.header.nbytes:
            raise _fail("chunk out of order or past the end of its tensor")
        if chunk.data.numel() and chunk.data.data_ptr() != self.buffer.data_ptr() + chunk.offset:
            self.buffer[chunk.offset:end].copy_(chunk.data)
        self.received = end
        return self.received == self.header.nbytes

    def tensor(self) -> torch.Tensor:
        h = self.header
        return _tensor_from_buffer(self.buffer, h.dtype, list(h.shape), list(h.perm) if h.perm else None)


def encode(items: list) -> list[bytes | memoryview]:
    """Encode a batch as the chunks of one frame (send them as one message, in order)."""
    enc = _Encoder()
    body = enc.pack([enc.item(i) for i in items])
    table = enc.pack(enc.table)
    chunks: list[bytes | memoryview] = [_PREFIX.pack(m.MAGIC, len(body), len(table)) + body + table]
    chunks.extend(b for b in enc.buffers if len(b))
    return chunks


def encode_bytes(items: list) -> bytes:
    return b"".join(encode(items))


# --- decode --------------------------------------------------------------------------------------

def _fail(why: str) -> ProtocolError:
    return ProtocolError(f"malformed torchremote message: {why}")


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


def _is_opt_int(v: Any) -> bool:
    return v is None or type(v) is int


def _is_str_tuple(v: Any) -> bool:
    return type(v) is tuple and all(type(s) is str for s in v)


def _is_shape(v: Any) -> bool:
    return type(v) is tuple and all(type(s) is int for s in v)


def _is_args(v: Any) -> bool:
    return type(v) is tuple


def _is_opt_dtype(v: Any) -> bool:
    return v is None or isinstance(v, torch.dtype)


def _any(v: Any) -> bool:
    return True


def _of(*types: type) -> Any:
    return lambda v: isinstance(v, types)


_FIELD_CHECKS: dict[type, tuple] = {
    m.Hello: (_is_int, _of(str), lambda v: v is None or type(v) is str, lambda v: v is None or type(v) is str,
              _is_count),
    m.Welcome: (_is_int, _of(str), _of(str), _is_int, _of(str), _of(float), _is_count, _of(str)),
    m.Put: (_is_int, _of(torch.Tensor), _of(bool), _of(str)),
    m.Call: (_is_int, _of(str), _is_args, _of(dict), _of(bool), _of(bool), _is_opt_dtype, _is_count),
    m.Fetch: (_is_int, _of(m.ClientRef, m.PublishedRef)),
    m.FetchMock: (_is_int, _of(m.PublishedRef)),
    m.Release: (lambda v: type(v) is tuple and all(type(r) is m.ClientRef for r in v),),
    m.Search: (_is_int, _is_str_tuple),
    m.ListObjects: (_is_int,),
    m.ManualSeed: (_is_int, _is_int),
    m.Sync: (_is_int,),
    m.Reply: (_is_int, _any),
    m.Failure: (_is_opt_int, _is_opt_int, _of(m.ErrorInfo)),
    m.TensorMeta: (_is_shape, _is_shape, _is_int, _of(torch.dtype), _of(bool)),
    m.SameAs: (_of(m.ClientRef, m.PublishedRef),),
    m.ErrorInfo: (_of(str), _of(str), lambda v: v is None or type(v) is str, _of(str)),
    m.PublishedInfo: (_of(m.PublishedRef), _of(m.TensorMeta), _is_str_tuple, _of(str), _of(bool), _of(bool)),
    m.ObjectInfo: (_of(str), _of(str), _is_shape, _of(torch.dtype), _is_int, _is_str_tuple, _of(str)),
    m.ChunkedTensor: (_of(torch.dtype), _is_shape, lambda v: v is None or _is_shape(v), _is_int),
    m.PutBegin: (_is_int, _of(m.ChunkedTensor), _of(bool), _of(str)),
    m.Run: (_is_int, _of(bytes), _is_args, _of(dict), _of(bool), _is_opt_dtype),
    m.Expect: (_is_int,),
    m.Push: (_is_int, _of(m.ClientRef, m.PublishedRef), _of(str), lambda v: v is None or type(v) is str,
             _of(str)),
    m.Handover: (_is_int, _of(m.ClientRef), _of(str)),
    m.Ack: (_is_count,),
    m.RequestRelease: (_is_int, _of(m.ClientRef, m.PublishedRef), _of(str)),
    m.ReleaseStatus: (_is_int, _is_int),
    m.ListReleases: (_is_int,),
    m.MemoryReport: (_is_int,),
    m.SaveCheckpoint: (_is_int, _of(str), _is_str_tuple,
                       lambda v: type(v) is tuple and all(type(r) in (m.ClientRef, m.PublishedRef) for r in v)),
    m.LoadCheckpoint: (_is_int, _of(str)),
    m.CheckpointRegion: (_is_count,),
    m.MemoryInfo: (_is_str_tuple, _is_shape, _is_shape, _is_str_tuple, _is_shape, _is_count, _is_shape),
    m.Decide: (_is_int, _is_int, _of(bool), _of(str)),
    m.ReleaseInfo: (_is_int, _of(str), _of(str), _of(str), _is_shape, _of(torch.dtype), _is_int, _of(str), _is_int,
                    _of(str), _of(str), _of(str), _of(str)),
    m.Chunk: (_is_int, _is_int, lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8
              and v.dim() == 1),
}
assert set(_FIELD_CHECKS) == set(_STRUCTS)
# per type: (field name, check, whether a msgpack array stands for a tuple there), worked out once
_LAYOUTS: dict[type, tuple] = {
    cls: tuple((f.name, check, check in (_is_shape, _is_str_tuple, _is_args) or cls is m.ChunkedTensor)
               for f, check in zip(fields(cls), _FIELD_CHECKS[cls]))
    for cls in _STRUCTS
}
_ITEM_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in _STRUCTS}


class _Decoder:
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def unpack(self, data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=self.ext_hook, raw=False, strict_map_key=True,
                               use_list=True)

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == _ELLIPSIS:
            return Ellipsis
        if code == _CLIENT_REF:
            if len(data) != _REF.size:
                raise _fail("bad object reference")
            return m.ClientRef(*_REF.unpack(data))
        v = self.unpack(data)
        if code == _TENSOR:
            if not _is_int(v) or not 0 <= v < len(self.tensors):
                raise _fail("tensor index out of range")
            return self.tensors[v]
        if code == _PUB_REF:
            if not _is_int(v):
                raise _fail("bad published reference")
            return m.PublishedRef(v)
        if code in (_TUPLE, _SIZE):
            if type(v) is not list:
                raise _fail("bad tuple")
            if code == _SIZE:
                if not all(_is_int(x) for x in v):
                    raise _fail("bad torch.Size")
                return torch.Size(v)
            return tuple(v)
        if code == _DTYPE:
            if v not in _ALL_DTYPES:
                raise _fail(f"unknown dtype {v!r}")
            return _ALL_DTYPES[v]
        if code == _DEVICE:
            if type(v) is not str:
                raise _fail("bad device")
            try:
                return torch.device(v)
            except Exception:
                raise _fail(f"bad device {v!r}") from None
        if code == _SLICE:
            if not (type(v) is list and len(v) == 3):
                raise _fail("bad slice")
            return slice(*v)
        if code == _COMPLEX:
            if not (type(v) is list and len(v) == 2 and all(type(x) in (int, float) for x in v)):
                raise _fail("bad complex")
            return complex(v[0], v[1])
        if code in _NAMED_ENUMS:
            kind, names = _NAMED_ENUMS[code]
            if v not in names:
                raise _fail(f"unknown {kind.__name__} {v!r}")
            return names[v]
        if code == _RETURN_TYPE:
            if not (type(v) is list and len(v) == 2 and type(v[0]) is str and type(v[1]) is list):
                raise _fail("bad return type")
            cls = getattr(torch.return_types, v[0], None)
            if not (isinstance(cls, type) and issubclass(cls, tuple)):
                raise _fail(f"unknown return type {v[0]!r}")
            try:
                return cls(v[1])
            except Exception:
                raise _fail(f"bad {v[0]} value") from None
        if code == _STRUCT:
            return _struct(v)
        raise _fail(f"unknown ext type {code}")


def _struct(v: Any) -> Any:
    """A message or value type from `[type code, *fields]`, every field checked."""
    if not (type(v) is list and v and _is_int(v[0]) and 0 <= v[0] < len(_STRUCTS)):
        raise _fail("unknown message type")
    cls = _STRUCTS[v[0]]
    values = v[1:]
    layout = _LAYOUTS[cls]
    if len(values) != len(layout):
        raise _fail(f"{cls.__name__} takes {len(layout)} fields, got {len(values)}")
    for i, (name, check, as_tuple) in enumerate(layout):
        x = values[i]
        if as_tuple and type(x) is list:
            x = values[i] = tuple(x)
        if not check(x):
            raise _fail(f"bad {cls.__name__}.{name}")
    return cls(*values)


def _decode_table(table: Any, data: memoryview) -> list[torch.Tensor]:
    if type(table) is not list:
        raise _fail("tensor table is not a list")
    tensors, offset = [], 0
    for entry in table:
        if not (type(entry) is list and len(entry) == 3):
            raise _fail("bad tensor entry")
        name, shape, perm = entry
        if name not in DTYPES:
            raise _fail(f"unsupported tensor dtype {name!r}")
        if not (type(shape) is list and len(shape) <= MAX_DIMS and all(_is_int(s) and s >= 0 for s in shape)):
            raise _fail("bad tensor shape")
        if perm is not None and not (type(perm) is list and sorted(perm) == list(range(len(shape)))):
            raise _fail("bad tensor layout")
        dtype = DTYPES[name]
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if nbytes > len(data) - offset:
            raise _fail("tensor data shorter than its header claims")
        tensors.append(_tensor_from(data[offset:offset + nbytes], dtype, shape, perm))
        offset += nbytes
    if offset != len(data):
        raise _fail("trailing bytes after tensor data")
    return tensors


PREFIX_BYTES = _PREFIX.size


def head_length(prefix: memoryview) -> int | None:
    """How long a frame's head (prefix, body, table: all but the tensor bytes) is, from its first
    `PREFIX_BYTES`; None when they are not a frame's."""
    magic, body_len, table_len = _PREFIX.unpack_from(prefix)
    return _PREFIX.size + body_len + table_len if magic == m.MAGIC else None


_NO_DATA = torch.empty(0, dtype=torch.uint8)


def chunk_in(head: bytes, remaining: int) -> m.Chunk | None:
    """The `Chunk` a frame carries when the frame is exactly one chunk whose `remaining` bytes
    follow `head` (its `data` left empty: the caller picks where those bytes go); else None."""
    view = memoryview(head)
    _, body_len, table_len = _PREFIX.unpack_from(view)
    start = _PREFIX.size
    try:
        table = msgpack.unpackb(view[start + body_len:start + body_len + table_len], raw=False)
        if table != [["uint8", [remaining], None]]:
            return None
        items = _Decoder([_NO_DATA]).unpack(view[start:start + body_len])
        if not (type(items) is list and len(items) == 1):
            return None
        item = _struct(items[0])
    except Exception:  # not a chunk frame after all: the ordinary decoder will judge it
        return None
    return item if type(item) is m.Chunk and item.data is _NO_DATA else None


def decode(data: bytes | bytearray | memoryview) -> list:
    """Decode one frame into its batch of items; `ProtocolError` for anything else."""
    if isinstance(data, str):
        raise _fail("text frame")
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise _fail("frame too short")
    magic, body_len, table_len = _PREFIX.unpack_from(view)
    if magic != m.MAGIC:
        raise _fail("bad magic (not a torchremote peer, or another protocol version)")
    start = _PREFIX.size
    if body_len + table_len > len(view) - start:
        raise _fail("frame shorter than its header claims")
    body = view[start:start + body_len]
    table_bytes = view[start + body_len:start + body_len + table_len]
    try:
        tensors = _decode_table(msgpack.unpackb(table_bytes, raw=False, use_list=True),
                                view[start + body_len + table_len:])
        items = _Decoder(tensors).unpack(body)
    except ProtocolError:
        raise
    except (RecursionError, MemoryError) as e:
        raise _fail(type(e).__name__) from None
    except Exception as e:  # msgpack's own errors: ExtraData, FormatError, StackError, ValueError...
        raise _fail(f"{type(e).__name__}: {e}") from None
    if type(items) is not list:
        raise _fail("a frame must hold a list of messages")
    items = [_struct(i) for i in items]
    if not all(type(i) in m.MESSAGE_TYPES for i in items):
        raise _fail("a frame must hold a list of messages")
    return items

