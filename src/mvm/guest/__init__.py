"""Code that runs inside the guest. Stdlib only; imports nothing of mvm but core.protocol.

This package's own functions run on the host: they hand the guest's files to the builder.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent
GUEST_FILES = ("init", "initramfs-init", "agent.py")


def guest_file(name: str) -> bytes:
    """A file shipped here (the /init scripts, the agent), as it goes into every image."""
    return (_HERE / name).read_bytes()


def protocol_source() -> bytes:
    """core/protocol.py, which the agent imports inside the guest."""
    return (_HERE.parent / "core" / "protocol.py").read_bytes()
