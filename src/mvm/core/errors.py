"""Errors a user can act on.

Every failure that reaches the CLI is an :class:`MvmError`: one line that names the thing
that is wrong and how to fix it. The CLI prints ``str(err)`` and exits with ``err.exit_code``;
it never shows a traceback for these.
"""

from __future__ import annotations


class MvmError(Exception):
    """Base class: a one-line message plus an optional fix."""

    exit_code: int = 1

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message} (fix: {self.fix})"
        return self.message


class ManifestError(MvmError):
    """mvm.toml is unreadable or describes an impossible guest."""

    exit_code = 2

    def __init__(self, path: str, field: str | None, message: str, fix: str | None = None) -> None:
        where = f"{path}: {field}" if field else path
        super().__init__(f"{where}: {message}", fix)
        self.path = path
        self.field = field


class UsageError(MvmError):
    """A command-line value is wrong (bad size, unknown VM name, ...)."""

    exit_code = 2


class BuildError(MvmError):
    """A build step failed; ``step`` names the phase (resolve, download, assemble, image)."""

    def __init__(self, step: str, message: str, fix: str | None = None) -> None:
        super().__init__(f"build failed at {step}: {message}", fix)
        self.step = step


class HostToolMissing(MvmError):
    """A program the host needs is not installed."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"{tool} is not installed on this host",
            f"run `mvmctl bootstrap` (or `apt-get install {package}`)",
        )
        self.tool = tool
        self.package = package


class BackendUnavailable(MvmError):
    """The chosen backend cannot run on this host; the message says why."""


class HostTooSmall(MvmError):
    """A VM asks for more CPUs or memory than this host can give it now (see --overcommit)."""


class VmError(MvmError):
    """Booting or talking to a VM failed."""
