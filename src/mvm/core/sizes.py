"""Human sizes ("512M", "2G", "1.5GiB") to bytes and MiB.

Suffixes are binary (K = 1024), as in QEMU and Docker; a bare number is bytes.
"""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)

MIB = 1024**2


def parse_size(text: str | int) -> int:
    """Bytes in ``text``; raises ValueError with the accepted forms when it is not a size."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size; use a number with K, M, G or T, e.g. \"512M\"")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text} is negative; sizes must be positive")
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size; use a number with K, M, G or T, e.g. \"512M\"")
    number, unit = match.groups()
    value = Fraction(number) * _UNITS[unit.upper()]  # exact: float loses bytes above 2**53
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_mib(text: str | int) -> int:
    """Whole MiB in ``text``; a bare integer is taken as MiB (``memory_mib = 256``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"{text} must be a positive number of MiB")
        return text
    size = parse_size(text)
    if size % MIB:
        raise ValueError(f"{text!r} is not a whole number of MiB")
    if size <= 0:
        raise ValueError(f"{text!r} must be positive")
    return size // MIB


def format_size(size: int) -> str:
    """Shortest exact spelling: 268435456 -> "256M"."""
    for unit in ("T", "G", "M", "K"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)
