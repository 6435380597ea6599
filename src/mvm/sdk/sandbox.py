"""``mvm.Sandbox``: a throwaway microVM for a program, on the lifecycle the CLI uses.

    with mvm.Sandbox.create("python", timeout=600) as sbx:
        result = sbx.commands.run("python3 -c 'print(6 * 7)'")
        sbx.files.write("/tmp/data.txt", "hello")

A sandbox is an ordinary VM (``mvmctl ls`` shows it) with two differences: its supervisor stops
it when its lifetime (``timeout``) ends, whether or not the program that made it is still
alive, and nothing of it is kept once it stops. Leaving the ``with`` block, an exception,
Ctrl-C or the interpreter's exit kill it at once; ``detach()`` lets it live out its lifetime.
"""

from __future__ import annotations

import atexit
import io
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from mvm.build.project import image_for
from mvm.core.bootimage import PortForward, parse_host
from mvm.core.home import check_vm_name
from mvm.core.state import DamagedRecord, MvmHome, VmRecord
from mvm.errors import (
    CommandFailed,
    CommandTimeout,
    SandboxNotFound,
    SandboxStopped,
    Unsupported,
    UsageError,
    VmError,
)
from mvm.runtime import backends, lifecycle, transfer
from mvm.runtime.client import AgentError, VmClient
from mvm.sdk.templates import template_dir

OutputSink = Callable[[str], None]
_LIVE: dict[str, Sandbox] = {}  # made by this process and not detached: killed at exit


def _stderr_progress(phase: str, detail: str) -> None:
    sys.stderr.write(f"mvm: building the sandbox image: {phase} {detail}\n")


@dataclass(frozen=True)
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int
    duration: float  # seconds, as the host saw it


@dataclass(frozen=True)
class SandboxInfo:
    name: str
    state: str
    backend: str
    isolation: str  # "microvm", or "container" (reduced: it shares the host's kernel)
    cpus: int
    memory_mib: int
    uids: dict[str, int]
    sealed: bool
    deadline: float | None  # time.time() when its lifetime ends
    workload_id: str | None


class Commands:
    """``sandbox.commands``: run programs in the guest, as the image's exec uid."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def run(self, cmd: str | list[str], *, timeout: float | None = 60, env: dict[str, str] | None = None,
            cwd: str | None = None, stdin: str | bytes | None = None, on_stdout: OutputSink | None = None,
            on_stderr: OutputSink | None = None, check: bool = False) -> CommandResult:
        """Run ``cmd`` (an argv list, or a string for ``/bin/sh -c``) to its end.

        A non-zero exit is a result, not an exception (``check=True`` makes it CommandFailed).
        Past ``timeout`` seconds the command is killed and CommandTimeout carries what it printed.
        """
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        out, err = bytearray(), bytearray()

        def tee(buffer: bytearray, callback: OutputSink | None) -> Callable[[bytes], None]:
            def sink(chunk: bytes) -> None:
                buffer.extend(chunk)
                if callback is not None:
                    callback(chunk.decode(errors="replace"))
            return sink

        started = time.monotonic()
        with self._sandbox._client() as client:
            result = client.exec(argv, env={**self._sandbox.env, **(env or {})} or None, cwd=cwd, timeout=timeout,
                                 stdin=data, stdout=tee(out, on_stdout), stderr=tee(err, on_stderr))
        duration = time.monotonic() - started
        if result.timed_out:
            raise CommandTimeout(f"{argv[0]} ran past its {timeout:g} s timeout in sandbox {self._sandbox.name} "
                                 "and was killed", bytes(out), bytes(err))
        done = CommandResult(out.decode(errors="replace"), err.decode(errors="replace"), result.exit_status, duration)
        if check and done.exit_code != 0:
            raise CommandFailed(f"{argv[0]} exited {done.exit_code} in sandbox {self._sandbox.name}", done)
        return done


class Files:
    """``sandbox.files``: the guest's files, read and written as the image's exec uid."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def read(self, path: str, *, format: Literal["text", "bytes"] = "text") -> str | bytes:
        buffer = io.BytesIO()
        with self._sandbox._client() as client:
            client.read_file(path, buffer.write)
        return buffer.getvalue().decode() if format == "text" else buffer.getvalue()

    def write(self, path: str, data: str | bytes | BinaryIO, *, mode: int = 0o644) -> int:
        """Write a file (a temporary file renamed into place: never seen half written); returns its size."""
        source = data.encode() if isinstance(data, str) else data
        with self._sandbox._client() as client:
            return client.write_file(path, source, mode=mode)

    def write_many(self, files: dict[str, str | bytes]) -> None:
        for path, data in files.items():
            self.write(path, data)

    def list(self, path: str) -> list[dict[str, Any]]:
        """Entries of a directory: name, type (file, dir, link, other), size, mode, mtime."""
        with self._sandbox._client() as client:
            return list(client.call("list", path=path)["entries"])

    def info(self, path: str) -> dict[str, Any]:
        with self._sandbox._client() as client:
            return dict(client.call("stat", path=path)["stat"])

    def exists(self, path: str) -> bool:
        try:
            self.info(path)
        except AgentError as err:
            if err.errno == "ENOENT":
                return False
            raise
        return True

    def remove(self, path: str, *, recursive: bool = False) -> None:
        with self._sandbox._client() as client:
            client.call("remove", path=path, recursive=recursive)

    def rename(self, src: str, dst: str) -> None:
        with self._sandbox._client() as client:
            client.call("rename", src=src, dst=dst)

    def make_dir(self, path: str) -> None:
        with self._sandbox._client() as client:
            client.call("mkdir", path=path, parents=True)

    def copy_in(self, host_path: str | Path, guest_path: str) -> None:
        with self._sandbox._client() as client:
            transfer.copy_in(client, Path(host_path), guest_path)

    def copy_out(self, guest_path: str, host_path: str | Path) -> list[str]:
        """Copy a guest file or tree to the host, by the hostile-guest rules (README, "Threat
        model"); returns the entries left out, with why."""
        with self._sandbox._client() as client:
            return transfer.copy_out(client, guest_path, Path(host_path))


@dataclass(frozen=True)
class PortInfo:
    host_addr: str
    host_port: int
    guest_port: int


class Ports:
    """``sandbox.ports``: host TCP ports tunnelled to the guest's loopback (no guest NIC needed)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def forward(self, guest_port: int, host_port: int, *, host_addr: str = "127.0.0.1") -> str:
        """Listen on ``host_addr:host_port`` (loopback unless you name another address) and carry
        each connection to ``guest_port`` on the guest's loopback; returns the host address."""
        spec = PortForward.parse(f"[{host_addr}]:{host_port}:{guest_port}")
        with self._sandbox._client() as client:
            lifecycle.add_forward(client, spec)
        return spec.host

    def list(self) -> list[PortInfo]:
        self._sandbox._record(running=True)
        return [PortInfo(f.host_addr, f.host_port, f.guest_port)
                for f in lifecycle.list_forwards(self._sandbox._home, self._sandbox.name)]

    def remove(self, host_port: int, *, host_addr: str | None = None) -> None:
        """Stop forwarding ``host_port`` (on ``host_addr``, or whichever address it is on);
        connections it carries are closed."""
        _, port = parse_host(str(host_port))
        with self._sandbox._client() as client:
            lifecycle.remove_forward(client, port, host_addr)


class Sandbox:
    """A running sandbox. Make one with :meth:`create`, or reach one with :meth:`connect`."""

    def __init__(self, name: str, home: MvmHome, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.env = dict(env or {})
        self._home = home
        self.commands = Commands(self)
        self.files = Files(self)
        self.ports = Ports(self)

    # -- making and finding ----------------------------------------------------------------

    @classmethod
    def create(cls, template: str = "base", *, name: str | None = None, cpus: int | None = None,
               memory: int | None = None, network: str | None = None, env: dict[str, str] | None = None,
               timeout: float = 300, backend: str | None = None, workload_id: str | None = None,
               overcommit: bool = False) -> Sandbox:
        """Boot a sandbox and return once its agent answers.

        ``template``: a built-in ("base": the default image; "python": with Debian's python3 and
        its standard library), or a directory holding an mvm.toml. ``memory`` is in MiB.
        ``timeout``: its lifetime in seconds, enforced by its supervisor even if this program
        dies. ``network``: only "deny" (no network device) in this version. ``workload_id``:
        your label for it, kept in its record and shown by ``info()``. ``overcommit``: boot it even
        if ``cpus`` is more than the host's CPU threads or ``memory`` more than it has available
        less the headroom kept for the host (otherwise HostTooSmall, before booting).
        """
        if network not in (None, "deny"):
            raise Unsupported(f"network={network!r}: this version gives a sandbox no network device at all",
                              'leave network out, or pass "deny"')
        if not 0 < timeout <= 7 * 24 * 3600:
            raise UsageError(f"timeout={timeout!r}: a sandbox's lifetime must be more than 0 and at most 7 days")
        home = MvmHome.default()
        directory = template_dir(home, template)
        image = image_for(directory, home, _stderr_progress)
        vm_name = check_vm_name(name or f"sbx-{secrets.token_hex(4)}")
        lifecycle.up(home, image, name=vm_name, vcpus=cpus, memory_mib=memory, hypervisor=backend,
                     lifetime_s=timeout, ephemeral=True, workload_id=workload_id, overcommit=overcommit)
        sandbox = cls(vm_name, home, env)
        _LIVE[vm_name] = sandbox
        return sandbox

    @classmethod
    def connect(cls, name: str) -> Sandbox:
        """A running sandbox (or any VM) by name."""
        sandbox = cls(name, MvmHome.default())
        sandbox._record(running=True)
        return sandbox

    @staticmethod
    def list() -> list[SandboxInfo]:
        """Every VM this user has, sandboxes and others, with its state."""
        home = MvmHome.default()
        return [_info(r) for r in lifecycle.list_vms(home) if isinstance(r, VmRecord)]

    # -- its life ---------------------------------------------------------------------------

    def info(self) -> SandboxInfo:
        return _info(self._record())

    def is_running(self) -> bool:
        try:
            return self._record().running
        except (SandboxNotFound, SandboxStopped):
            return False

    def set_timeout(self, seconds: float) -> None:
        """Its lifetime from now: its supervisor stops it ``seconds`` from now."""
        if not 0 < seconds <= 7 * 24 * 3600:
            raise UsageError(f"set_timeout({seconds!r}): more than 0 and at most 7 days")
        with self._client() as client:
            client.call("set_deadline", deadline=time.time() + seconds)

    def kill(self) -> None:
        """Stop it now and remove what it kept (no error if it is already gone)."""
        _LIVE.pop(self.name, None)
        try:
            lifecycle.down(self._home, self.name, force=True)
        except UsageError:  # (already gone: removed when it stopped)
            pass

    def detach(self) -> None:
        """Let it outlive this program: it runs until its lifetime ends or someone kills it."""
        _LIVE.pop(self.name, None)

    def logs(self) -> str:
        chunks: list[bytes] = []
        lifecycle.logs(self._home, self.name, chunks.append)
        return b"".join(chunks).decode(errors="replace")

    def forward(self, guest_port: int, host_port: int) -> str:
        """The same as ``ports.forward`` (kept for programs written against it)."""
        return self.ports.forward(guest_port, host_port)

    def pause(self) -> None:
        self._pause_resume("pause")

    def resume(self) -> None:
        self._pause_resume("resume")

    def snapshot(self, tag: str) -> None:
        raise Unsupported(f"snapshot({tag!r}): sandboxes on {self.info().backend} cannot be snapshotted in this version",
                          "start a fresh sandbox from the template instead")

    def fork(self, count: int) -> None:
        raise Unsupported("fork(): needs snapshots, which this version does not make on this backend",
                          "start more sandboxes from the template instead")

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"Sandbox({self.name!r})"

    # -- under the hood ---------------------------------------------------------------------

    def _pause_resume(self, kind: str) -> None:
        record = self._record(running=True)
        backends.get(record.backend).require("pause_resume", self.name)
        with self._client() as client:
            client.call(kind)

    def _record(self, *, running: bool = False) -> VmRecord:
        try:
            _, record = lifecycle.require_vm(self._home, self.name)
        except DamagedRecord:
            raise
        except UsageError:
            raise SandboxNotFound(f"there is no sandbox named {self.name}", "Sandbox.list() shows them") from None
        if running and not record.running:
            raise SandboxStopped(f"sandbox {self.name} is stopped: {record.stop_reason}", "create a new one")
        return record

    def _client(self) -> VmClient:
        try:
            return lifecycle.connect(self._home, self.name)
        except UsageError:
            raise SandboxNotFound(f"there is no sandbox named {self.name} (its lifetime may have ended)",
                                  "create a new one") from None
        except SandboxStopped:
            raise
        except VmError as err:
            raise SandboxStopped(str(err)) from None


def _info(record: VmRecord) -> SandboxInfo:
    return SandboxInfo(name=record.name, state=record.state, backend=record.backend,
                       isolation=backends.get(record.backend).capabilities.isolation, cpus=record.vcpus,
                       memory_mib=record.memory_mib, uids=dict(record.uids), sealed=record.sealed,
                       deadline=record.deadline, workload_id=record.workload_id)


def _kill_leftovers() -> None:
    for sandbox in list(_LIVE.values()):
        try:
            sandbox.kill()
        except Exception:  # noqa: BLE001 - the interpreter is exiting: do what can be done
            pass


atexit.register(_kill_leftovers)
