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


# -- the header codec is json's own C code, called as json.loads and json.dumps call it ----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


def _outcome(fn, *args):  # (the value, or the exception's type and text)
    try:
        return ("ok", repr(fn(*args)))
    except Exception as err:  # noqa: BLE001
        return ("error", type(err).__name__, str(err))


@settings(max_examples=400)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_headers_encode_exactly_as_json_dumps(header: dict) -> None:
    import json

    assert _outcome(protocol._dumps, header) == _outcome(lambda h: json.dumps(h, separators=(",", ":")), header)


@settings(max_examples=600)
@given(st.one_of(
    st.binary(max_size=64).map(lambda tail: b"{" + tail),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4).map(lambda d: json_dumps_variants(d)),
    st.text(max_size=40).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(max_size=64)))
def test_headers_decode_exactly_as_json_loads(raw: bytes) -> None:
    import json

    assert _outcome(protocol._loads, raw) == _outcome(json.loads, raw)


def json_dumps_variants(value: dict) -> bytes:
    import json

    text = json.dumps(value, ensure_ascii=len(value) % 2 == 0) + " \t\n" * (len(value) % 3)
    return text.encode("utf-8", "surrogatepass")


def test_things_json_cannot_carry_fail_as_with_json() -> None:
    loop: dict = {"type": "x"}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular reference"):
        protocol.encode(loop)
    with pytest.raises(TypeError, match="Object of type bytes is not JSON serializable"):
        protocol.encode({"type": "x", "b": b""})
    assert protocol._loads(b'{"a":NaN,"b":-Infinity}')["b"] == float("-inf")


def test_a_header_nested_too_deep_is_a_protocol_error() -> None:
    """Not a RecursionError out of the reader (a hostile agent could send one to the host)."""
    raw = b'{"type":"x","a":' + b"[" * 30000 + b"]" * 30000 + b"}"
    payload = struct.pack(">I", len(raw)) + raw
    decoder = protocol.Decoder()
    with pytest.raises(protocol.ProtocolError, match="not JSON"):
        decoder.feed(struct.pack(">I", len(payload)) + payload)
    assert decoder.feed(protocol.encode({"type": "ok"}))[0].type == "ok"  # and the reader goes on


def test_the_codec_works_where_json_was_never_imported() -> None:
    """As in the agent, which imports no json: good headers decode, bad ones are ProtocolErrors
    (json's C scanner reports errors through json.decoder, which it does not import itself)."""
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(protocol.__file__).resolve().parents[2])
    code = f"""import sys
sys.path.insert(0, {src!r})
from mvm.core import protocol
assert protocol.Decoder().feed(protocol.encode({{"type": "x", "a": [1.5, None, "\\u00e9"]}}))[0].header["a"][2] == "\\u00e9"
assert "json" not in sys.modules, "the fast path imported json"
frames, errors = protocol.Decoder().feed_all(b"\\0\\0\\0\\x07\\0\\0\\0\\x03{{x]" + protocol.encode({{"type": "ok"}}))
assert [f.type for f in frames] == ["ok"] and "not JSON" in str(errors[0]), (frames, errors)
print("fine")
"""
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout == "fine\n", proc.stderr
