"""Sizes are user input in mvm.toml and on the command line; they must be exact."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.core.sizes import MIB, format_size, parse_mib, parse_size

UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        ("0", 0),
        ("512K", 512 * 1024),
        ("512M", 512 * MIB),
        ("2G", 2 * 1024**3),
        ("1T", 1024**4),
        ("1.5G", 1536 * MIB),
        ("0.5K", 512),
        ("512MiB", 512 * MIB),
        ("2gb", 2 * 1024**3),
        (" 8 G ", 8 * 1024**3),
        ("100B", 100),
        (4096, 4096),
        ("9007199254740993", 2**53 + 1),  # beyond float precision: must stay exact
    ],
)
def test_parse_size_accepts(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12Q", "", "G", "-1", "1,5G", "1e3", "0.1", "1.0000001K", "M512"])
def test_parse_size_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("value", [True, False, -5])
def test_parse_size_rejects_non_sizes(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"), [(256, 256), ("1G", 1024), ("1024M", 1024), ("1.5G", 1536), ("64MiB", 64)]
)
def test_parse_mib_accepts(text: str | int, expected: int) -> None:
    assert parse_mib(text) == expected


@pytest.mark.parametrize("text", [0, -1, "0", "0M", "1.5M", "1024", "12Q", True])
def test_parse_mib_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_mib(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "expected"),
    [(0, "0"), (1, "1"), (1023, "1023"), (1024, "1K"), (256 * MIB, "256M"), (1536 * MIB, "1536M"),
     (2 * 1024**3, "2G"), (1024**4, "1T"), (2048 * 1024**4, "2048T")],
)  # fmt: skip
def test_format_size_is_the_shortest_exact_spelling(size: int, expected: str) -> None:
    assert format_size(size) == expected


@given(st.integers(min_value=0))
def test_format_then_parse_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(UNITS)))
def test_parse_then_format_round_trips(number: int, unit: str) -> None:
    size = parse_size(f"{number}{unit}")
    assert size == number * UNITS[unit]
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=1, max_value=2**40))
def test_format_size_picks_the_largest_exact_unit(size: int) -> None:
    text = format_size(size)
    unit = text[-1] if text[-1] in UNITS else ""
    bigger = [u for u, v in UNITS.items() if v > UNITS.get(unit, 1)]
    assert all(size % UNITS[u] for u in bigger)


@given(st.integers(min_value=1, max_value=2**30))
def test_mib_round_trips(mib: int) -> None:
    assert parse_mib(format_size(mib * MIB)) == mib


@given(st.text(max_size=20))
def test_parse_size_only_ever_raises_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert isinstance(size, int) and size >= 0
