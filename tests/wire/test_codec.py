"""codec.py: tensors round-trip bit-exactly; messages round-trip both ways; decoding is total."""
from __future__ import annotations

import struct
import tracemalloc

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from torchremote.wire import codec as wire, messages as m
from torchremote.wire.errors import ProtocolError
from conftest import bits

DTYPES = [torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.complex64,
          torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]


def roundtrip(t: torch.Tensor) -> torch.Tensor:
    (item,) = wire.decode(wire.encode_bytes([m.Put(1, t)]))
    return item.tensor


@st.composite
def tensors(draw, dtype=None):
    dtype = dtype or draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    n = 1
    for s in shape:
        n *= s
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if n else \
        torch.empty(shape, dtype=dtype)
    if dtype is torch.bool:
        t = t.view(torch.uint8).clamp(max=1).view(torch.bool)
    view = draw(st.sampled_from(["plain", "transpose", "slice", "flip-stride"]))
    if view == "transpose" and t.dim() >= 2:
        t = t.transpose(0, -1)
    elif view == "slice" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[::2]
    elif view == "flip-stride" and t.dim() >= 2:
        t = t.permute(*reversed(range(t.dim())))[..., :1]
    return t


def observable(strides, t):
    return [s for s, n in zip(strides, t.shape) if n > 1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors())
def test_tensor_roundtrip_is_bit_exact(t):
    out = roundtrip(t)
    assert out.dtype == t.dtype and out.shape == t.shape
    assert torch.equal(bits(out), bits(t))
    if t.numel() > 1:  # strides of size-1 dims, or of tensors with <= 1 element, carry no layout
        assert observable(out.stride(), t) == observable(wire.strides_after_transfer(t), t) \
            == observable(t.clone().stride(), t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_including_nan_and_extremes(dtype):
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.tensor([float("nan"), float("inf"), -0.0, 1e-30, 3.5]).to(dtype)
    elif dtype is torch.bool:
        t = torch.tensor([True, False, True])
    else:
        info = torch.iinfo(dtype)
        t = torch.tensor([info.min, info.max, 0, 1], dtype=dtype)
    for variant in (t, t[0], t[1:], t.reshape(1, -1).expand(3, -1), torch.empty(0, 2, dtype=dtype)):
        out = roundtrip(variant)
        assert torch.equal(bits(out), bits(variant)) and out.shape == variant.shape


def test_views_send_only_their_elements():
    big = torch.zeros(1 << 20)
    frame = wire.encode_bytes([m.Put(1, big[5:7])])
    assert len(frame) < 200
    assert torch.equal(roundtrip(big[5:7]), big[5:7])


def test_conj_and_neg_views_materialise():
    z = torch.tensor([1 + 2j, 3 - 1j])
    assert torch.equal(roundtrip(z.conj()), z.conj().resolve_conj())


VALUES = [None, True, 3, -2**63, 2.5, float("inf"), "s", b"b", 1 + 2j, (1, (2, [3])), [1, (2,)],
          {"a": 1}, torch.Size([2, 3]), torch.float16, torch.bfloat16, torch.device("cpu"),
          slice(1, None, 2), Ellipsis, torch.channels_last, torch.strided,
          m.ClientRef(5, 2), m.PublishedRef(3),
          m.TensorMeta((2, 3), (3, 1), 0, torch.float32, True),
          m.ErrorInfo("RuntimeError", "boom", "torch.add", "tb"),
          torch.return_types.max([1, 2])]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_roundtrip_both_directions(value):
    items = [m.Reply(7, value), m.Release((m.ClientRef(1, 0),))]
    frame = wire.encode_bytes(items)
    decoded = wire.decode(frame)
    assert decoded == items
    assert type(decoded[0].value) is type(value)
    assert wire.encode_bytes(decoded) == frame  # decode then encode gives the same bytes


def test_unsendable_values_are_refused():
    with pytest.raises(wire.EncodeError, match="cannot send"):
        wire.encode([m.Reply(1, object())])
    with pytest.raises(wire.EncodeError, match="meta"):
        wire.encode([m.Put(1, torch.empty(2, device="meta"))])


VALID = wire.encode_bytes([m.Call(3, "torch.add", (m.ClientRef(1, 0), torch.ones(3)), {"alpha": 2}, True, True)])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_random_bytes_raises_only_protocol_error(data):
    try:
        wire.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255), st.integers(0, len(VALID)))
def test_decoding_mutated_frames_raises_only_protocol_error(pos, byte, cut):
    data = bytearray(VALID)
    data[pos] = byte
    for candidate in (bytes(data), VALID[:cut]):
        tracemalloc.start()
        try:
            wire.decode(candidate)
        except ProtocolError:
            pass
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 256 * 1024, f"decoding {len(candidate)} bytes allocated {peak} bytes"


def test_header_cannot_claim_memory_it_did_not_send():
    body = msgpack.packb([])
    table = msgpack.packb([["float32", [1 << 40], None]])
    frame = struct.pack("<4sII", m.MAGIC, len(body), len(table)) + body + table
    with pytest.raises(ProtocolError, match="shorter"):
        wire.decode(frame)


def test_messages_of_the_wrong_shape_are_protocol_errors():
    enc = wire._Encoder()
    bad_call = msgpack.ExtType(14, enc.pack([wire._STRUCT_CODE[m.Call], "not-an-int", "op", (), {}, True, True, None, 0]))
    body = msgpack.packb([bad_call])
    table = msgpack.packb([])
    with pytest.raises(ProtocolError, match="Call.op_id"):
        wire.decode(struct.pack("<4sII", m.MAGIC, len(body), len(table)) + body + table)
