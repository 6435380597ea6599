"""mvm: local microVM sandboxes.

Describe a guest in ``mvm.toml``, build it into a kernel + root filesystem, boot it under
QEMU, and work in it: ``mvmctl --help``, or from Python::

    import mvm

    with mvm.Sandbox.create("python") as sbx:
        print(sbx.commands.run("python3 -c 'print(6 * 7)'").stdout)

A workload can also be declared in code, ``@mvm.app(...)`` with ``mvm.packages``,
``mvm.command`` and the other helpers of ``mvm.declare``, and checked with ``mvmctl validate
app.py`` without running the file.

``mvm.Sandbox``, ``mvm.AsyncSandbox``, ``mvm.CommandResult`` and the declaration names load on
first use (``mvmctl exec`` imports this package and must stay light); errors are in
``mvm.errors``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing itself would cost `mvmctl exec` an import)

__version__ = "0.1.0"
_DECLARE = ("app", "command", "local_path", "network", "nix_packages", "packages", "resources", "services", "shell")
__all__ = ["AsyncCommandHandle", "AsyncSandbox", "CommandHandle", "CommandResult", "Sandbox", "SandboxInfo", "__version__", "app",
           "command", "local_path", "network", "nix_packages", "packages", "resources", "services", "shell"]

if TYPE_CHECKING:
    from mvm.declare import (
        app,
        command,
        local_path,
        network,
        nix_packages,
        packages,
        resources,
        services,
        shell,
    )
    from mvm.sdk import AsyncCommandHandle, AsyncSandbox, CommandHandle, CommandResult, Sandbox, SandboxInfo


def __getattr__(name: str) -> object:
    if name in ("AsyncCommandHandle", "AsyncSandbox", "CommandHandle", "CommandResult", "Sandbox", "SandboxInfo"):
        import mvm.sdk

        return getattr(mvm.sdk, name)
    if name in _DECLARE:
        import mvm.declare

        return getattr(mvm.declare, name)
    raise AttributeError(f"module 'mvm' has no attribute {name!r}")
