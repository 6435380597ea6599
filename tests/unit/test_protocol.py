"""The agent wire format: round trips, chunking, and garbage that must not kill the reader."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvm.core import protocol

headers = st.dictionaries(st.text(max_size=10), st.one_of(st.integers(), st.text(max_size=20), st.booleans()),
                          max_size=5).map(lambda d: {**d, "type": "x"})


@given(st.lists(st.tuples(headers, st.binary(max_size=2000)), max_size=8), st.integers(1, 97))
def test_frames_survive_any_chunking(frames: list, chunk: int) -> None:
    stream = b"".join(protocol.encode(h, b) for h, b in frames)
    decoder = protocol.Decoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += decoder.feed(stream[i : i + chunk])
    assert [(f.header, f.body) for f in got] == frames


@settings(max_examples=300)
@given(st.binary(max_size=4096))
def test_garbage_raises_protocol_error_or_nothing(data: bytes) -> None:
    decoder = protocol.Decoder()
    try:
        frames = decoder.feed(data)
    except protocol.ProtocolError:
        return
    for frame in frames:
        assert isinstance(frame.header, dict) and isinstance(frame.type, str)


def test_reader_recovers_after_a_bad_frame() -> None:
    bad_json = struct.pack(">II", 4 + 3, 3) + b"{x]"
    good = protocol.encode({"type": "ping", "id": 1})
    decoder = protocol.Decoder()
    with pytest.raises(protocol.ProtocolError, match="not JSON"):
        decoder.feed(bad_json)
    assert [f.type for f in decoder.feed(good)] == ["ping"]


def test_oversized_frame_is_refused_and_skipped() -> None:
    decoder = protocol.Decoder()
    big = protocol.MAX_FRAME + 1
    with pytest.raises(protocol.ProtocolError, match="out of range"):
        decoder.feed(struct.pack(">I", big))
    decoder.feed(b"\0" * 1000)  # part of the oversized frame's body: skipped, not parsed


def test_encode_refuses_oversized() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.encode({"type": "x"}, b"\0" * protocol.MAX_FRAME)


def test_header_must_name_a_type() -> None:
    raw = b'{"id": 1}'
    with pytest.raises(protocol.ProtocolError, match="type"):
        protocol.Decoder().feed(struct.pack(">II", 4 + len(raw), len(raw)) + raw)


def test_good_frames_before_a_bad_one_are_kept() -> None:
    good = protocol.encode({"type": "a", "id": 1}) + protocol.encode({"type": "b", "id": 2})
    bad = struct.pack(">II", 8, 4) + b"nope"  # a header that is not JSON
    after = protocol.encode({"type": "c", "id": 3})
    frames, errors = protocol.Decoder().feed_all(good + bad + after)
    assert [f.type for f in frames] == ["a", "b", "c"]
    assert len(errors) == 1 and "JSON" in str(errors[0])
