"""Code that runs inside the guest. Stdlib only; imports nothing of mvm but core.protocol.

This package's own functions run on the host: they hand the guest's files to the builder.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent
# The agent is a package, shipped as agent/NAME.py; sorted so the build stamp is stable.
AGENT_FILES = tuple(f"agent/{p.name}" for p in sorted((_HERE / "agent").glob("*.py")))
GUEST_FILES = ("init", "initramfs-init", *AGENT_FILES)


def guest_file(name: str) -> bytes:
    """A file shipped here (the /init scripts, an agent module), as it goes into every image."""
    return (_HERE / name).read_bytes()


def protocol_source() -> bytes:
    """core/protocol.py, which the agent imports inside the guest."""
    return (_HERE.parent / "core" / "protocol.py").read_bytes()
