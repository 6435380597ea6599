"""What every request handler shares: argument checks, the Refused error reply, and the
registry the session dispatches from, which each concern's module fills with its handlers."""

from __future__ import annotations

import sys

from mvm.core import protocol

# typing and collections.abc cost their imports at the agent's start (tens of ms under TCG):
# annotations are strings, and Handler is a type for the checker only (a string at runtime).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .session import Session


class Refused(Exception):
    """A request answered with an error reply: bad arguments, or not allowed here."""


MISSING = object()


def arg(frame: protocol.Frame, key: str, kind: type | tuple[type, ...], default: Any = MISSING) -> Any:
    """A header field of the expected JSON type (bool is not a number here), or Refused."""
    value = frame.header.get(key, default)
    if value is MISSING:
        raise Refused(f"{frame.type}: missing {key!r}")
    if value is default:
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise Refused(f"{frame.type}: {key!r} must be {names}")
    return value


def int_arg(frame: protocol.Frame, key: str, default: Any, low: int, high: int) -> Any:
    value = arg(frame, key, int, default)
    if value is not default and not low <= value <= high:
        raise Refused(f"{frame.type}: {key!r} must be in {low}..{high}")
    return value


Handler = "Callable[[Session, protocol.Frame], None]"
HANDLERS: dict[str, Handler] = {}


def handles(kind: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn
    return register


def quietly(fn: Handler) -> Handler:
    """For requests that get no reply (stdin, signal, resize, send): errors are only logged."""
    def wrapper(session: Session, frame: protocol.Frame) -> None:
        try:
            fn(session, frame)
        except Exception as err:  # noqa: BLE001 -- no reply, whatever it was
            print(f"mvm agent: {frame.type} {frame.id}: {err}", file=sys.stderr)
    return wrapper
