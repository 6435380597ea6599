"""mvm: local microVM sandboxes.

Describe a guest in ``mvm.toml``, build it into a kernel + root filesystem, boot it under
QEMU, and work in it: ``mvmctl --help``, or from Python::

    import mvm

    with mvm.Sandbox.create("python") as sbx:
        print(sbx.commands.run("python3 -c 'print(6 * 7)'").stdout)

``mvm.Sandbox``, ``mvm.AsyncSandbox`` and ``mvm.CommandResult`` load on first use (``mvmctl
exec`` imports this package and must stay light); errors are in ``mvm.errors``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing itself would cost `mvmctl exec` an import)

__version__ = "0.1.0"
__all__ = ["AsyncSandbox", "CommandHandle", "CommandResult", "Sandbox", "SandboxInfo", "__version__"]

if TYPE_CHECKING:
    from mvm.sdk import AsyncSandbox, CommandHandle, CommandResult, Sandbox, SandboxInfo


def __getattr__(name: str) -> object:
    if name in ("AsyncSandbox", "CommandHandle", "CommandResult", "Sandbox", "SandboxInfo"):
        import mvm.sdk

        return getattr(mvm.sdk, name)
    raise AttributeError(f"module 'mvm' has no attribute {name!r}")
