"""``mvm.AsyncSandbox``: the same sandbox for asyncio programs.

One implementation: every method awaits :class:`~mvm.sdk.sandbox.Sandbox`'s own in a worker
thread (``asyncio.to_thread``), so the event loop never blocks on a guest and the two can
never drift apart. The methods are written out (with their types) so that an IDE shows them;
each is one line that hands its arguments on. A started command's handle and a file read as
a stream are awaited the same way, a chunk at a time.
"""

from __future__ import annotations

import asyncio
import signal as signals
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar, overload

from mvm.sdk.files import Files
from mvm.sdk.handles import CommandHandle
from mvm.sdk.network import Network, NetworkInfo, PortInfo, Ports
from mvm.sdk.sandbox import CommandResult, Commands, OutputSink, Sandbox, SandboxInfo

T = TypeVar("T")
L = TypeVar("L", bound="_Leaving")
_END = object()


async def _off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


class _Pulled(AsyncIterator[T]):
    """An iterator whose ``next`` may wait on the guest, pulled in a worker thread; one pull
    at a time (two threads must never read one connection at once)."""

    def __init__(self, items: Iterator[T], lock: asyncio.Lock | None = None) -> None:
        self._items = items
        self._lock = lock or asyncio.Lock()

    def __aiter__(self) -> _Pulled[T]:
        return self

    async def __anext__(self) -> T:
        async with self._lock:
            item = await asyncio.to_thread(next, self._items, _END)
        if item is _END:
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Stop early: the connection it reads from is closed."""
        close = getattr(self._items, "close", None)
        if close is not None:
            async with self._lock:
                await asyncio.to_thread(close)


class _Leaving:
    """``async with``: leaving the block ends the thing (``_leave``), an exception or not."""

    _leave: Callable[[Any], Awaitable[None]]

    async def __aenter__(self: L) -> L:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._leave()


class AsyncCommandHandle(_Leaving):
    """A started command in an asyncio program: ``pid``, ``await send_stdin()``,
    ``await close_stdin()``, ``await kill()``, ``await wait()``, and ``async for stream, text
    in handle`` over its output as it arrives. Closing it (``async with``) kills what still runs."""

    def __init__(self, handle: CommandHandle) -> None:
        self._handle = handle
        self.pid = handle.pid
        self.argv = handle.argv
        self.sandbox = handle.sandbox
        self._lock = asyncio.Lock()
        self._output = _Pulled(iter(handle), self._lock)

    @property
    def exit_code(self) -> int | None:
        """None while it runs."""
        return self._handle.exit_code

    async def send_stdin(self, data: str | bytes) -> None:
        await _off_loop(self._handle.send_stdin, data)

    async def close_stdin(self) -> None:
        await _off_loop(self._handle.close_stdin)

    async def kill(self, signal: int = signals.SIGKILL) -> None:
        """Send it ``signal`` (SIGKILL by default); ``wait()`` then returns its end."""
        await _off_loop(self._handle.kill, signal)

    def __aiter__(self) -> AsyncIterator[tuple[str, str]]:
        return self._output

    async def wait(self) -> CommandResult:
        """Its result once it has ended (a non-zero exit is a result)."""
        async with self._lock:
            return await _off_loop(self._handle.wait)

    async def close(self) -> None:
        """Let go of it: a command still running is killed."""
        await _off_loop(self._handle.close)

    _leave = close

    def __repr__(self) -> str:
        return f"Async{self._handle!r}"


class AsyncCommands:
    """``sandbox.commands``, awaited (see :class:`~mvm.sdk.sandbox.Commands`)."""

    def __init__(self, commands: Commands) -> None:
        self._sync = commands

    async def run(self, cmd: str | list[str], *, timeout: float | None = 60, env: dict[str, str] | None = None,
                  cwd: str | None = None, stdin: str | bytes | None = None, on_stdout: OutputSink | None = None,
                  on_stderr: OutputSink | None = None, check: bool = False,
                  max_output: int | None = None) -> CommandResult:
        """Run ``cmd`` to its end (``on_stdout``/``on_stderr`` are called in a worker thread)."""
        return await _off_loop(self._sync.run, cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin,
                               on_stdout=on_stdout, on_stderr=on_stderr, check=check, max_output=max_output)

    async def start(self, cmd: str | list[str], *, timeout: float | None = None, env: dict[str, str] | None = None,
                    cwd: str | None = None, on_stdout: OutputSink | None = None,
                    on_stderr: OutputSink | None = None) -> AsyncCommandHandle:
        """Start ``cmd`` and return at once with its handle."""
        started = await _off_loop(self._sync.start, cmd, timeout=timeout, env=env, cwd=cwd, on_stdout=on_stdout,
                                  on_stderr=on_stderr)
        if not isinstance(started, CommandHandle):
            return started  # type: ignore[return-value]  # (record mode's entry: nothing to await)
        return AsyncCommandHandle(started)


class AsyncFiles:
    """``sandbox.files``, awaited (see :class:`~mvm.sdk.files.Files`)."""

    def __init__(self, files: Files) -> None:
        self._sync = files

    @overload
    async def read(self, path: str, *, format: Literal["text"] = "text") -> str: ...
    @overload
    async def read(self, path: str, *, format: Literal["bytes"]) -> bytes: ...
    @overload
    async def read(self, path: str, *, format: Literal["stream"]) -> AsyncIterator[bytes]: ...

    async def read(self, path: str, *, format: Literal["text", "bytes", "stream"] = "text"
                   ) -> str | bytes | AsyncIterator[bytes]:
        """A file's contents: ``"text"``, ``"bytes"``, or ``"stream"``: ``async for chunk in ...``."""
        got = await _off_loop(self._sync.read, path, format=format)
        return _Pulled(got) if format == "stream" else got  # type: ignore[arg-type]

    async def write(self, path: str, data: str | bytes | BinaryIO, *, mode: int = 0o644) -> int:
        return await _off_loop(self._sync.write, path, data, mode=mode)

    async def write_many(self, files: dict[str, str | bytes]) -> None:
        await _off_loop(self._sync.write_many, files)

    async def list(self, path: str, depth: int = 1) -> list[dict[str, Any]]:
        return await _off_loop(self._sync.list, path, depth)

    async def info(self, path: str) -> dict[str, Any]:
        return await _off_loop(self._sync.info, path)

    async def exists(self, path: str) -> bool:
        return await _off_loop(self._sync.exists, path)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await _off_loop(self._sync.remove, path, recursive=recursive)

    async def rename(self, src: str, dst: str) -> None:
        await _off_loop(self._sync.rename, src, dst)

    async def make_dir(self, path: str) -> None:
        await _off_loop(self._sync.make_dir, path)

    async def copy_in(self, host_path: str | Path, guest_path: str) -> None:
        await _off_loop(self._sync.copy_in, host_path, guest_path)

    async def copy_out(self, guest_path: str, host_path: str | Path) -> list[str]:
        return await _off_loop(self._sync.copy_out, guest_path, host_path)


class AsyncPorts:
    """``sandbox.ports``, awaited (see :class:`~mvm.sdk.network.Ports`)."""

    def __init__(self, ports: Ports) -> None:
        self._sync = ports

    async def forward(self, guest_port: int, host_port: int | None = None, *, host_addr: str = "127.0.0.1") -> str:
        return await _off_loop(self._sync.forward, guest_port, host_port, host_addr=host_addr)

    async def list(self) -> list[PortInfo]:
        return await _off_loop(self._sync.list)

    async def remove(self, host_port: int, *, host_addr: str | None = None) -> None:
        await _off_loop(self._sync.remove, host_port, host_addr=host_addr)


class AsyncNetwork:
    """``sandbox.network``, awaited (see :class:`~mvm.sdk.network.Network`)."""

    def __init__(self, network: Network) -> None:
        self._sync = network

    async def info(self) -> NetworkInfo:
        return await _off_loop(self._sync.info)

    async def allow(self, *entries: str) -> list[str]:
        return await _off_loop(self._sync.allow, *entries)

    async def deny(self, *entries: str) -> list[str]:
        return await _off_loop(self._sync.deny, *entries)


class AsyncSandbox(_Leaving):
    """``await AsyncSandbox.create(...)``, ``await sbx.commands.run(...)``, ``async with``: the
    methods and arguments of :class:`~mvm.sdk.sandbox.Sandbox`, awaited."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sync = sandbox
        self.name = sandbox.name
        self.commands = AsyncCommands(sandbox.commands)
        self.files = AsyncFiles(sandbox.files)
        self.ports = AsyncPorts(sandbox.ports)
        self.network = AsyncNetwork(sandbox.network)

    @classmethod
    async def create(cls, template: str = "base", *, name: str | None = None, cpus: int | None = None,
                     memory: int | None = None, network: str | None = None, allow: list[str] | None = None,
                     env: dict[str, str] | None = None, timeout: float = 300, backend: str | None = None,
                     workload_id: str | None = None, cold: bool = False, mode: str | None = None,
                     overcommit: bool = False) -> AsyncSandbox:
        """Start a sandbox (the arguments of :meth:`Sandbox.create`) and return once its agent answers."""
        options = dict(name=name, cpus=cpus, memory=memory, network=network, allow=allow, env=env, timeout=timeout,
                       backend=backend, workload_id=workload_id, cold=cold, mode=mode, overcommit=overcommit)
        return cls(await _off_loop(Sandbox.create, template, **options))

    @classmethod
    async def connect(cls, name: str, *, mode: str | None = None) -> AsyncSandbox:
        return cls(await _off_loop(Sandbox.connect, name, mode=mode))

    @staticmethod
    async def list() -> list[SandboxInfo]:
        return await _off_loop(Sandbox.list)

    async def info(self) -> SandboxInfo:
        return await _off_loop(self._sync.info)

    @property
    def receipts(self) -> list[str]:
        """As :attr:`Sandbox.receipts`."""
        return self._sync.receipts

    async def is_running(self) -> bool:
        return await _off_loop(self._sync.is_running)

    async def set_timeout(self, seconds: float) -> None:
        await _off_loop(self._sync.set_timeout, seconds)

    async def kill(self) -> None:
        await _off_loop(self._sync.kill)

    def detach(self) -> None:
        """Let it outlive this program (nothing to wait for)."""
        self._sync.detach()

    async def logs(self) -> str:
        return await _off_loop(self._sync.logs)

    async def forward(self, guest_port: int, host_port: int | None = None) -> str:
        """The same as ``ports.forward``."""
        return await self.ports.forward(guest_port, host_port)

    async def pause(self) -> None:
        await _off_loop(self._sync.pause)

    async def resume(self) -> None:
        await _off_loop(self._sync.resume)

    async def snapshot(self, tag: str) -> str:
        return await _off_loop(self._sync.snapshot, tag)

    async def fork(self, count: int = 1) -> list[AsyncSandbox]:
        return [AsyncSandbox(copy) for copy in await _off_loop(self._sync.fork, count)]

    _leave = kill

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.name!r})"
