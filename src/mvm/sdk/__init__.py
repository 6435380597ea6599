"""The runtime SDK: :class:`Sandbox` and :class:`AsyncSandbox` (see sandbox.py)."""

from mvm.sdk.aio import AsyncCommandHandle, AsyncSandbox
from mvm.sdk.handles import CommandHandle
from mvm.sdk.sandbox import CommandResult, Sandbox, SandboxInfo

__all__ = ["AsyncCommandHandle", "AsyncSandbox", "CommandHandle", "CommandResult", "Sandbox", "SandboxInfo"]
