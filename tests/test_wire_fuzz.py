"""Fuzzing the decoder: whatever arrives, only ProtocolError subclasses escape.

A message that does decode must also be usable: it re-encodes, and its raw tensors convert to
torch (or raise CodecError).
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_actors.errors import CodecError, ProtocolError
from sft_actors.wire import Activations, MsgKind, WireLimits, WireTensor, decode, encode
from sft_actors.wire.tensors import TORCH_DTYPES
from tests.test_wire_golden import sample_messages

# Small limits so the size checks are reached too.
LIMITS = WireLimits(max_header_bytes=4096, max_message_bytes=1 << 16, max_tensors=8, max_ndim=4)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

VALID: list[list[bytes]] = [
    [bytes(f) for f in encode(msg, sender="dev0", msg_id=1)] for msg in sample_messages().values()
]

msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.binary(max_size=12),
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def decode_or_protocol_error(frames: list[Any]) -> None:
    """Decode; anything but success or a ProtocolError fails the test (it propagates)."""
    try:
        env = decode(frames, LIMITS)
    except ProtocolError:
        return
    # Re-encoding is a fixed point (compared as bytes, so NaN floats compare too).
    again = [bytes(f) for f in encode(env.msg, sender=env.sender, msg_id=env.msg_id, reply_to=env.reply_to)]
    third = decode(again, LIMITS)
    assert [bytes(f) for f in encode(third.msg, sender="x", msg_id=third.msg_id)][1:] == again[1:]
    assert third.msg.KIND is env.kind
    for value in vars_of(env.msg):
        tensors = value.values() if isinstance(value, dict) else [value]
        for t in tensors:
            if isinstance(t, WireTensor) and t.is_raw:
                with contextlib.suppress(CodecError):
                    t.to_torch()


def vars_of(msg: Any) -> list[Any]:
    return [getattr(msg, name) for name in msg.__dataclass_fields__]


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_frames(frames: list[bytes]) -> None:
    decode_or_protocol_error(frames)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["v", "k", "s", "i", "r", "b", "t", "x"]), msgpack_values),
    st.integers(0, 3),
)
def test_random_headers_with_known_keys(header: dict[str, Any], n_buffers: int) -> None:
    header.setdefault("v", [1, 0])  # get past the version check most of the time
    decode_or_protocol_error([msgpack.packb(header), *([b"\x00" * 4] * n_buffers)])


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location inside a decoded header (map keys and list indices)."""
    out = [prefix]
    if isinstance(obj, dict):
        for key, item in obj.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            out += _paths(item, (*prefix, i))
    return out


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_mutated_valid_headers(frames: list[bytes], data: st.DataObject) -> None:
    header = msgpack.unpackb(frames[0], raw=False)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(header) if p]
        if not paths:
            break
        *parents, last = data.draw(st.sampled_from(paths))
        parent = header
        for step in parents:
            parent = parent[step]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[last]
        else:
            parent[last] = data.draw(msgpack_values)
    decode_or_protocol_error([msgpack.packb(header), *frames[1:]])


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_byte_flips_truncation_and_extra_frames(frames: list[bytes], data: st.DataObject) -> None:
    frames = list(frames)
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    action = data.draw(st.sampled_from(["flip", "truncate", "extend", "extra_frame", "drop_frame"]))
    if action == "flip" and frame:
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(frame) - 1))
            frame[pos] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        del frame[data.draw(st.integers(0, len(frame))) :]
    elif action == "extend":
        frame += data.draw(st.binary(min_size=1, max_size=16))
    frames[index] = bytes(frame)
    if action == "extra_frame":
        frames.append(data.draw(st.binary(max_size=32)))
    elif action == "drop_frame":
        del frames[index]
    decode_or_protocol_error(frames)


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.sampled_from(sorted(TORCH_DTYPES)),
    st.lists(st.integers(0, 5), max_size=4),
    st.integers(0, 2**32 - 1),
)
def test_any_tensor_round_trips_bit_exactly(dtype_name: str, shape: list[int], seed: int) -> None:
    dtype = TORCH_DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    n = 1
    for dim in shape:
        n *= dim
    raw = torch.randint(
        0, 256 if dtype is not torch.bool else 2, (n * dtype.itemsize,), dtype=torch.uint8, generator=g
    )
    t = raw.view(dtype).reshape(shape)
    msg = Activations(
        device="d",
        round=0,
        step=0,
        cut=1,
        activations=WireTensor.from_torch(t),
        labels=WireTensor.from_torch(torch.zeros(0, dtype=torch.int64)),
        n_samples=0,
        sent_at_ns=0,
    )
    env = decode(encode(msg, sender="d", msg_id=1), LIMITS)
    assert env.kind is MsgKind.ACTIVATIONS and isinstance(env.msg, Activations)
    back = env.msg.activations.to_torch()
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.reshape(-1).view(torch.uint8), raw)
