"""The exceptions a program using ``mvm`` can catch. Each message is one line that says what
is wrong and what to do; ``str(err)`` includes the fix.

Every one is an :class:`MvmError`; the CLI's errors (bad manifest, a backend that cannot run
here, a failed build) are these same classes.
"""

from __future__ import annotations

from mvm.core.errors import (
    BackendUnavailable,
    BuildError,
    HostTooSmall,
    ManifestError,
    MvmError,
    UsageError,
    VmError,
)

__all__ = ["MvmError", "UsageError", "ManifestError", "BuildError", "BackendUnavailable", "HostTooSmall", "VmError",
           "SandboxNotFound", "SandboxStopped", "CommandTimeout", "CommandFailed", "Unsupported", "ModeError"]


class SandboxNotFound(UsageError):
    """No sandbox (VM) by that name."""


class SandboxStopped(VmError):
    """The sandbox is not running any more (its lifetime ended, it was killed, or its
    entrypoint finished)."""


class Unsupported(UsageError):
    """Not possible in this version or on this backend; the message says why."""


class ModeError(UsageError):
    """A call that record mode cannot make (it needs a live guest), or a mode that is not one."""


class CommandTimeout(VmError):
    """A command ran past its timeout and was killed; ``stdout``/``stderr`` hold what it
    printed until then."""

    def __init__(self, message: str, stdout: bytes, stderr: bytes) -> None:
        super().__init__(message, "give it a longer timeout=, or make it finish sooner")
        self.stdout = stdout
        self.stderr = stderr


class CommandFailed(VmError):
    """``check=True`` and the command exited non-zero; ``result`` is its CommandResult."""

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result
