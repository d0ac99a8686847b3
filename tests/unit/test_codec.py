"""moemesh.wire.codec: bit-exact round trips over the wire, and clear errors for malformed tensors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moemesh.wire import codec
from moemesh.wire.codec import CodecError, from_proto, to_proto
from moemesh.v1 import dispatch_pb2, tensor_pb2

DType = tensor_pb2.DType
DTYPES = list(codec.SUPPORTED_DTYPES)
# Same-size integer views: comparing these compares bit patterns (NaN payloads, -0.0 included).
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
        torch.int64: torch.int64, torch.int32: torch.int32}

# database=None: no .hypothesis/ folder in the checkout.
FAST = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def wire(t: torch.Tensor) -> torch.Tensor:
    """Encode, serialize, parse, decode: what a peer on the other side of gRPC sees."""
    return from_proto(tensor_pb2.Tensor.FromString(to_proto(t).SerializeToString()))


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(got.view(BITS[got.dtype]), want.contiguous().view(BITS[want.dtype]))


@st.composite
def tensors(draw):
    """Any supported dtype, 0-4 dims (0-d scalars and zero-sized dims included), arbitrary bit patterns."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    n = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).view(shape)


# --- round trips -----------------------------------------------------------------------------


@FAST
@given(tensors())
def test_round_trip_is_bit_exact(t):
    msg = to_proto(t)
    assert msg.dtype == codec.dtype_to_proto(t.dtype)
    assert list(msg.shape) == list(t.shape)
    assert len(msg.data) == t.numel() * t.element_size()
    got = wire(t)
    assert_bits_equal(got, t)
    assert got.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_d_and_zero_sized(dtype):
    scalar = torch.tensor(3, dtype=dtype)
    got = wire(scalar)
    assert got.shape == () and got.item() == 3
    for shape in [(0,), (0, 7), (3, 0), (2, 0, 4)]:
        got = wire(torch.empty(shape, dtype=dtype))
        assert got.shape == shape and got.dtype == dtype


def test_bf16_special_values_keep_their_bits():
    patterns = [
        0x7F80, 0xFF80,  # +inf, -inf
        0x7FC0, 0xFFC0, 0x7FC1, 0x7F81, 0xFFFF,  # quiet/negative/payload/signalling NaNs
        0x0000, 0x8000,  # +0.0, -0.0
        0x0001, 0x807F,  # subnormals
        0x7F7F, 0xFF7F,  # +-max finite
        0x3F80, 0x3FC0,  # 1.0, 1.5
    ]
    bits = torch.tensor(patterns, dtype=torch.int32).to(torch.int16)  # wraps 0x8000.. to negative int16
    t = bits.view(torch.bfloat16)
    got = wire(t)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), bits)
    assert torch.isinf(got[:2]).all() and torch.isnan(got[2:7]).all()


def test_fp32_and_fp16_nan_payloads_keep_their_bits():
    f32 = torch.tensor([0x7FC00000, 0x7F800001, -1, 0x80000000, 0x7F800000], dtype=torch.int64).to(torch.int32)
    assert_bits_equal(wire(f32.view(torch.float32)), f32.view(torch.float32))
    f16 = torch.tensor([0x7E00, 0x7C01, 0xFC00, 0x8000, 0x0001], dtype=torch.int32).to(torch.int16)
    assert_bits_equal(wire(f16.view(torch.float16)), f16.view(torch.float16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    base = torch.arange(60).to(dtype).view(3, 4, 5)
    views = [
        base.transpose(0, 2),  # transposed
        base[:, ::2, 1:],  # strided slice
        base[1].t(),
        torch.arange(5).to(dtype).expand(3, 5),  # stride 0
        base[0, 0, 0],  # 0-d view into a bigger storage
    ]
    for v in views:
        msg = to_proto(v)
        assert len(msg.data) == v.numel() * v.element_size()  # only the viewed elements travel
        got = wire(v)
        assert_bits_equal(got, v)
        assert got.is_contiguous()


def test_requires_grad_input_is_encoded_detached():
    t = torch.randn(4, 8, requires_grad=True)
    got = wire(t)
    assert not got.requires_grad and torch.equal(got, t.detach())


def test_decoding_never_warns():
    msg = to_proto(torch.arange(6, dtype=torch.float32).view(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "buffer is not writable" must never surface
        for _ in range(3):
            from_proto(msg)
            from_proto(tensor_pb2.Tensor.FromString(msg.SerializeToString()))


@pytest.mark.parametrize("aliases", [
    pytest.param(True, marks=pytest.mark.skipif(not codec.ALIASES_DATA, reason="this protobuf backend shares msg.data")),
    False,
])
def test_in_place_writes_leak_into_neither_message_nor_later_decodes(monkeypatch, aliases):
    # The contract is "treat as read-only"; this checks the safety net behind it, on both paths.
    monkeypatch.setattr(codec, "ALIASES_DATA", aliases)
    want = torch.arange(6, dtype=torch.float32).view(2, 3)
    msg = to_proto(want)
    before = msg.SerializeToString()
    got = from_proto(msg)
    assert torch.equal(got, want)
    got.add_(100)
    assert msg.SerializeToString() == before
    assert torch.equal(from_proto(msg), want)


def test_aliasing_is_only_used_when_each_data_read_is_a_fresh_object():
    msg = tensor_pb2.Tensor(data=bytes(range(32)))
    assert codec.ALIASES_DATA == (msg.data is not msg.data)


def test_to_proto_fills_a_submessage_in_place():
    req = dispatch_pb2.DispatchRequest(id=7, layer=3, placement_version=2)
    hidden = torch.randn(5, 16).to(torch.bfloat16)
    idx = torch.tensor([[0, -1], [3, 4], [-1, -1], [1, 2], [5, 0]], dtype=torch.int32)
    w = torch.rand(5, 2)
    assert to_proto(hidden, req.hidden) is not None
    to_proto(idx, req.topk_idx)
    to_proto(w, req.topk_weights)
    back = dispatch_pb2.DispatchRequest.FromString(req.SerializeToString())
    assert (back.id, back.layer, back.placement_version) == (7, 3, 2)
    assert_bits_equal(from_proto(back.hidden, expect_dtypes={torch.bfloat16}, expect_ndim=2), hidden)
    assert torch.equal(from_proto(back.topk_idx, expect_dtypes=(torch.int32, torch.int64), expect_ndim=2), idx)
    assert torch.equal(from_proto(back.topk_weights, expect_dtypes=(torch.float32,), expect_ndim=2), w)


def test_to_proto_overwrites_every_field_of_out():
    out = to_proto(torch.zeros(2, 3, 4, dtype=torch.int64))
    to_proto(torch.ones(5, dtype=torch.float16), out)
    assert out.dtype == DType.FLOAT16 and list(out.shape) == [5] and len(out.data) == 10


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.uint8, torch.int8, torch.bool, torch.int16, torch.complex64])
def test_to_proto_rejects_unsupported_dtypes(dtype):
    with pytest.raises(CodecError, match=str(dtype).replace(".", r"\.")):
        to_proto(torch.zeros(2, dtype=dtype))


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)


def test_unspecified_dtype():
    with pytest.raises(CodecError, match=r"hidden: dtype is DTYPE_UNSPECIFIED"):
        from_proto(tensor_pb2.Tensor(shape=[1], data=b"\0" * 4), name="hidden")
    # An unset submessage field reads as an all-default Tensor: same error, not a crash.
    with pytest.raises(CodecError, match="UNSPECIFIED"):
        from_proto(dispatch_pb2.DispatchRequest().hidden)


def test_unknown_dtype():
    msg = tensor_pb2.Tensor.FromString(tensor_pb2.Tensor(dtype=1, shape=[1], data=b"\0" * 4).SerializeToString().replace(b"\x08\x01", b"\x08\x11", 1))
    assert msg.dtype == 17  # open enum: the unknown value survives parsing
    with pytest.raises(CodecError, match=r"unknown dtype enum value 17"):
        from_proto(msg)


def test_dtype_not_allowed_here():
    msg = to_proto(torch.zeros(2, 3))
    with pytest.raises(CodecError, match=r"topk_idx: dtype FLOAT32 not allowed here; expected INT32, INT64"):
        from_proto(msg, expect_dtypes=(torch.int32, torch.int64), name="topk_idx")


def test_negative_dim():
    msg = tensor_pb2.Tensor(dtype=DType.FLOAT32, shape=[2, -3], data=b"")
    with pytest.raises(CodecError, match=r"negative dim -3 at index 1 of shape \[2, -3\]"):
        from_proto(msg)
    # Two negatives multiply to a positive element count: still rejected.
    msg = tensor_pb2.Tensor(dtype=DType.FLOAT32, shape=[-1, -1], data=b"\0" * 4)
    with pytest.raises(CodecError, match="negative dim"):
        from_proto(msg)


@pytest.mark.parametrize("extra", [-1, 1, -24])
def test_byte_length_mismatch_names_both_numbers(extra):
    msg = tensor_pb2.Tensor(dtype=DType.FLOAT32, shape=[2, 3], data=b"\0" * (24 + extra))
    with pytest.raises(CodecError, match=rf"data has {24 + extra} bytes .* needs 24 "):
        from_proto(msg)


def test_huge_shape_is_a_length_mismatch_not_an_allocation():
    msg = tensor_pb2.Tensor(dtype=DType.INT64, shape=[2**62, 2**62, 2**62], data=b"\0" * 8)
    with pytest.raises(CodecError, match=r"data has 8 bytes"):
        from_proto(msg)
    # Zero elements: any dims are fine and nothing is allocated.
    assert from_proto(tensor_pb2.Tensor(dtype=DType.INT64, shape=[2**63 - 1, 0])).shape == (2**63 - 1, 0)


def test_ndim_mismatch():
    msg = to_proto(torch.zeros(4))
    with pytest.raises(CodecError, match=r"hidden: expected 2 dims, got 1 \(shape \[4\]\)"):
        from_proto(msg, expect_ndim=2, name="hidden")
    scalar = to_proto(torch.tensor(1.0))
    with pytest.raises(CodecError, match=r"expected 1 dims, got 0"):
        from_proto(scalar, expect_ndim=1)
    assert from_proto(scalar, expect_ndim=0).shape == ()


# --- fuzzing: arbitrary bytes never crash the process ----------------------------------------


def _decode_or_codec_error(msg: tensor_pb2.Tensor) -> None:
    try:
        t = from_proto(msg)
    except CodecError:
        return
    # Accepted: the result must agree with what was on the wire.
    assert list(t.shape) == list(msg.shape)
    assert t.numel() * t.element_size() == len(msg.data)


@FAST
@given(st.binary(max_size=64))
def test_fuzzed_tensor_bytes(raw):
    try:
        msg = tensor_pb2.Tensor.FromString(raw)
    except DecodeError:
        return
    _decode_or_codec_error(msg)


_VALID_REQUEST = dispatch_pb2.DispatchRequest(
    id=1, layer=2, placement_version=3,
    hidden=to_proto(torch.randn(2, 4)),
    topk_idx=to_proto(torch.tensor([[0, 1], [-1, 2]], dtype=torch.int32)),
    topk_weights=to_proto(torch.rand(2, 2)),
).SerializeToString()


@st.composite
def mutated_requests(draw):
    """A valid DispatchRequest with a few bytes flipped, inserted, deleted or truncated."""
    buf = bytearray(_VALID_REQUEST)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and buf:
            del buf[pos]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


@FAST
@given(st.one_of(st.binary(max_size=96), mutated_requests()))
def test_fuzzed_dispatch_request_bytes(raw):
    try:
        req = dispatch_pb2.DispatchRequest.FromString(raw)
    except DecodeError:
        return
    for field in (req.hidden, req.topk_idx, req.topk_weights):
        _decode_or_codec_error(field)
