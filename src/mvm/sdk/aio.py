"""``mvm.AsyncSandbox``: the same sandbox for asyncio programs. One implementation: each call
runs :class:`~mvm.sdk.sandbox.Sandbox`'s own in a worker thread (``asyncio.to_thread``), so the
event loop never blocks on a guest and the two can never drift apart."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from mvm.sdk.sandbox import Sandbox, SandboxInfo


class _InThreads:
    """Every method of ``target``, awaited in a worker thread."""

    def __init__(self, target: object) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)
        if not callable(method):
            return method

        @functools.wraps(method)
        async def in_thread(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)
        return in_thread


class AsyncSandbox(_InThreads):
    """``await AsyncSandbox.create(...)``, ``await sbx.commands.run(...)``, ``async with``: the
    methods and arguments of :class:`Sandbox`, awaited."""

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox)
        self.name = sandbox.name
        self.commands = _InThreads(sandbox.commands)
        self.files = _InThreads(sandbox.files)
        self.ports = _InThreads(sandbox.ports)
        self.network = _InThreads(sandbox.network)

    @classmethod
    async def create(cls, template: str = "base", **options: Any) -> AsyncSandbox:
        return cls(await asyncio.to_thread(Sandbox.create, template, **options))

    @classmethod
    async def connect(cls, name: str) -> AsyncSandbox:
        return cls(await asyncio.to_thread(Sandbox.connect, name))

    @staticmethod
    async def list() -> list[SandboxInfo]:
        return await asyncio.to_thread(Sandbox.list)

    async def fork(self, count: int = 1) -> list[AsyncSandbox]:
        copies = await asyncio.to_thread(self._target.fork, count)  # type: ignore[attr-defined]
        return [AsyncSandbox(copy) for copy in copies]

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.name!r})"
