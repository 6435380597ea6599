"""``sandbox.commands.start(...)``: a command that runs while the program does other things.

A handle holds its own connection to the sandbox's supervisor: the command lives as long as
that connection (closing the handle, or the program dying, kills it: the supervisor drops a
client's processes with the client), so nothing started this way outlives its owner unseen.
"""

from __future__ import annotations

import signal as signals
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from mvm.core import protocol
from mvm.errors import SandboxStopped, VmError
from mvm.runtime.client import AgentError, VmClient

if TYPE_CHECKING:
    from mvm.sdk.sandbox import CommandResult

OutputSink = Callable[[str], None]


class CommandHandle:
    """A started command: ``pid``, ``send_stdin``/``close_stdin``, ``kill``, ``wait``, and
    iteration over ``(stream, text)`` as its output arrives ("stdout" or "stderr")."""

    def __init__(self, client: VmClient, request_id: int, pid: int, argv: list[str], sandbox: str,
                 on_stdout: OutputSink | None = None, on_stderr: OutputSink | None = None) -> None:
        self._client: VmClient | None = client
        self._id = request_id
        self.pid = pid
        self.argv = argv
        self.sandbox = sandbox
        self._started = time.monotonic()
        self._out, self._err = bytearray(), bytearray()
        self._sinks = {"stdout": on_stdout, "stderr": on_stderr}
        self._result: CommandResult | None = None
        self._stdin_open = True

    @classmethod
    def start(cls, client: VmClient, argv: list[str], sandbox: str, *, env: dict[str, str] | None, cwd: str | None,
              timeout: float | None, on_stdout: OutputSink | None, on_stderr: OutputSink | None) -> CommandHandle:
        header: dict[str, object] = {"type": "exec", "argv": argv, "stdin": True, "pty": False}
        for key, value in (("env", env), ("cwd", cwd), ("timeout", timeout)):
            if value is not None:
                header[key] = value
        request_id = client.send(header)
        try:
            for frame in client.replies(request_id):
                if frame.type == "started":
                    return cls(client, request_id, int(frame.header.get("pid", 0)), argv, sandbox,
                                on_stdout, on_stderr)
        except AgentError as err:
            client.close()
            raise SandboxStopped(f"{argv[0]} did not start in sandbox {sandbox}: {err}") from None
        client.close()
        raise SandboxStopped(f"{argv[0]} ended before it started in sandbox {sandbox}")

    @property
    def exit_code(self) -> int | None:
        """None while it runs."""
        return None if self._result is None else self._result.exit_code

    def send_stdin(self, data: str | bytes) -> None:
        raw = data.encode() if isinstance(data, str) else data
        client = self._live_client("send_stdin")
        if not self._stdin_open:
            raise ValueError("send_stdin after close_stdin")
        for start in range(0, len(raw), protocol.CHUNK):
            client.send({"type": "stdin", "id": self._id}, raw[start : start + protocol.CHUNK])

    def close_stdin(self) -> None:
        if self._stdin_open and self._client is not None:
            self._client.send({"type": "stdin", "id": self._id, "eof": True})
        self._stdin_open = False

    def kill(self, signal: int = signals.SIGKILL) -> None:
        """Send it ``signal`` (SIGKILL by default); ``wait()`` then returns its end."""
        if self._client is not None:
            self._client.send({"type": "signal", "id": self._id, "signal": int(signal)})

    def __iter__(self) -> Iterator[tuple[str, str]]:
        while self._client is not None:
            try:
                frame = next(iter(self._client.replies(self._id)))
            except VmError as err:  # (an AgentError, or the supervisor gone: the sandbox was killed)
                self._finish(None, str(err))
                raise SandboxStopped(f"{self.argv[0]} in sandbox {self.sandbox}: {err}") from None
            if frame.type in ("stdout", "stderr"):
                (self._out if frame.type == "stdout" else self._err).extend(frame.body)
                text = frame.body.decode(errors="replace")
                sink = self._sinks[frame.type]
                if sink is not None:
                    sink(text)
                yield frame.type, text
            elif frame.type == "exit":
                self._finish(frame.header.get("code"), None)

    def wait(self) -> CommandResult:
        """Its result once it has ended (a non-zero exit is a result, as with ``run``)."""
        for _ in self:
            pass
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Let go of it: a command still running is killed."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> CommandHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self._result is None else f"exited {self._result.exit_code}"
        return f"CommandHandle({self.argv[0]!r}, pid={self.pid}, {state})"

    def _live_client(self, what: str) -> VmClient:
        if self._client is None:
            raise SandboxStopped(f"{what}: {self.argv[0]} has ended (or its handle was closed)")
        return self._client

    def _finish(self, code: int | None, error: str | None) -> None:
        from mvm.sdk.sandbox import CommandResult

        self._result = CommandResult(self._out.decode(errors="replace"), self._err.decode(errors="replace"),
                                     -1 if code is None else int(code), time.monotonic() - self._started)
        self.close()
