"""How a manifest mistake is worded, and the checks of one TOML value that word most of them.

Every mistake is one :class:`~mvm.core.errors.ManifestError` on one line: the dotted field
(``entrypoint.services.web.command``), what is wrong ("must be a table, not an integer",
"unknown key") and the fix, with the closest known word for a typo. Every section's reader
builds on :class:`ManifestChecks`, so they all say things the same way.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from mvm.core.errors import ManifestError

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

Locate = Callable[[tuple[str | int, ...]], tuple[str, str | None]]
"""A field's ``(where, field name)`` for messages, when the document did not come from TOML."""


def field_name(*parts: str | int) -> str:
    """Dotted TOML path for messages: ``extra_files."/etc/motd".mode``, ``volumes[0].host``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        key = part if _BARE_KEY.match(part) else quote(part)
        out += f".{key}" if out else key
    return out


def quote(text: str) -> str:
    """A quoted string with newlines and control characters escaped: messages stay one line."""
    return json.dumps(text, ensure_ascii=False)


def kind_of(value: object) -> str:
    """The TOML name of a value's type, for "must be X, not Y" messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def closest(word: str, choices: tuple[str, ...], n: int = 1) -> str | None:
    """The known word(s) a typo most likely meant, e.g. "mem or memory_mib" for "memroy"."""
    return " or ".join(difflib.get_close_matches(word, choices, n=n, cutoff=0.6)) or None


class ManifestChecks:
    """Checks of one TOML value's shape; every check raises one ManifestError for ``self.path``."""

    def __init__(self, path: str, base_dir: Path, locate: Locate | None = None) -> None:
        self.path = path
        self.base_dir = base_dir
        self.locate = locate

    def error(self, field: tuple[str | int, ...], message: str, fix: str) -> ManifestError:
        if self.locate is not None:  # a Python declaration: its file:line and its own spelling
            where, name = self.locate(field)
            return ManifestError(where, name, message, fix)
        return ManifestError(self.path, field_name(*field) or None, message, fix)

    # -- generic shape checks --------------------------------------------------------------

    def keys(
        self, table: dict[str, Any], known: tuple[str, ...], at: tuple[str | int, ...]
    ) -> None:
        for key in table:
            if key in known:
                continue
            near = closest(key, known, n=2)
            fix = (
                f"rename it to {near}"
                if near
                else f"remove it; known keys here: {', '.join(known)}"
            )
            raise self.error((*at, key), "unknown key", fix)

    def table(self, value: object, at: tuple[str | int, ...], fix: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(at, f"must be a table, not {kind_of(value)}", fix)
        return value

    def string(self, value: object, at: tuple[str | int, ...], fix: str) -> str:
        if not isinstance(value, str):
            raise self.error(at, f"must be a string, not {kind_of(value)}", fix)
        if "\0" in value:
            raise self.error(at, "must not contain a NUL character", fix)
        return value

    def boolean(self, value: object, at: tuple[str | int, ...]) -> bool:
        if not isinstance(value, bool):
            raise self.error(
                at, f"must be true or false, not {kind_of(value)}", "write true or false"
            )
        return value

    def integer(self, value: object, at: tuple[str | int, ...], fix: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(at, f"must be an integer, not {kind_of(value)}", fix)
        return value

    def strings(self, value: object, at: tuple[str | int, ...], fix: str) -> list[str]:
        if not isinstance(value, list):
            raise self.error(at, f"must be an array of strings, not {kind_of(value)}", fix)
        return [self.string(item, (*at, i), fix) for i, item in enumerate(value)]

    def choice(self, value: object, choices: tuple[str, ...], at: tuple[str | int, ...]) -> str:
        listed = " | ".join(choices)
        if not isinstance(value, str):
            raise self.error(
                at, f"must be one of {listed}, not {kind_of(value)}", f'write e.g. "{choices[0]}"'
            )
        if value not in choices:
            near = closest(value, choices)
            fix = f'did you mean "{near}"?' if near else f"use one of {listed}"
            raise self.error(at, f"{quote(value)} is not one of {listed}", fix)
        return value

    def guest_path(self, value: str, at: tuple[str | int, ...], example: str) -> str:
        """An absolute path inside the guest; ``..`` is refused so nothing escapes its place."""
        fix = f'use an absolute path such as "{example}"'
        if not value.startswith("/"):
            raise self.error(at, f"{quote(value)} is not an absolute path", fix)
        if ".." in value.split("/"):
            raise self.error(at, f"{quote(value)} contains a '..' component", fix)
        # PurePosixPath keeps exactly two leading slashes (POSIX leaves "//x" to the system);
        # the guest reads it as "/x", so must every check that compares paths.
        normal = "/" + str(PurePosixPath(value)).lstrip("/")
        if normal == "/":
            raise self.error(at, "must name something below /, not / itself", fix)
        return normal
