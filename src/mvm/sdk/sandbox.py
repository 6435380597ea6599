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
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mvm.build import stamps
from mvm.build.project import image_for
from mvm.core.bootimage import BootImage
from mvm.core.home import check_vm_name
from mvm.core.state import DamagedRecord, MvmHome, VmRecord
from mvm.errors import (
    CommandFailed,
    CommandTimeout,
    ModeError,
    SandboxNotFound,
    SandboxStopped,
    Unsupported,
    UsageError,
    VmError,
)
from mvm.runtime import allow_list, backends, cloning, lifecycle
from mvm.runtime.client import VmClient, current_surface, set_surface
from mvm.runtime.snapshot import TAG as SNAPSHOT_TAG
from mvm.sdk import record
from mvm.sdk.files import Files
from mvm.sdk.handles import CommandHandle
from mvm.sdk.network import Network, Ports
from mvm.sdk.templates import BUILT_IN, template_dir

if current_surface() == "cli":  # (MCP, on the SDK, says "mcp" itself)
    set_surface("sdk")  # a program that imports the SDK: its audit records say so

OutputSink = Callable[[str], None]
RECEIPTS_KEPT = 1000
_LIVE: dict[str, Sandbox] = {}  # made by this process and not detached: killed at exit


def _stderr_progress(phase: str, detail: str) -> None:
    sys.stderr.write(f"mvm: building the sandbox image: {phase} {detail}\n")


@dataclass(frozen=True)
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int
    duration: float  # seconds, as the host saw it
    receipt_id: str | None = None  # its audit record (`mvmctl receipt show ID`), when one was written
    stdout_dropped: int = 0  # bytes past run(max_output=...) that were counted, not kept
    stderr_dropped: int = 0


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
    snapshot: str | None = None  # the snapshot it was cloned from (None: it booted)


class Commands:
    """``sandbox.commands``: run programs in the guest, as the image's exec uid."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def run(self, cmd: str | list[str], *, timeout: float | None = 60, env: dict[str, str] | None = None,
            cwd: str | None = None, stdin: str | bytes | None = None, on_stdout: OutputSink | None = None,
            on_stderr: OutputSink | None = None, check: bool = False,
            max_output: int | None = None) -> CommandResult:
        """Run ``cmd`` (an argv list, or a string for ``/bin/sh -c``) to its end.

        A non-zero exit is a result, not an exception (``check=True`` makes it CommandFailed).
        Past ``timeout`` seconds the command is killed and CommandTimeout carries what it printed.
        ``max_output``: keep at most that many bytes of each stream (the guest decides how much
        it prints); the rest is counted in ``stdout_dropped``/``stderr_dropped``.
        """
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        out, err = bytearray(), bytearray()
        dropped = {"out": 0, "err": 0}

        def tee(buffer: bytearray, callback: OutputSink | None, which: str) -> Callable[[bytes], None]:
            def sink(chunk: bytes) -> None:
                room = len(chunk) if max_output is None else max(0, min(len(chunk), max_output - len(buffer)))
                buffer.extend(chunk[:room])
                dropped[which] += len(chunk) - room
                if callback is not None:
                    callback(chunk.decode(errors="replace"))
            return sink

        started = time.monotonic()
        with self._sandbox._client() as client:
            result = client.exec(argv, env={**self._sandbox.env, **(env or {})} or None, cwd=cwd, timeout=timeout,
                                 stdin=data, stdout=tee(out, on_stdout, "out"), stderr=tee(err, on_stderr, "err"))
        duration = time.monotonic() - started
        if result.timed_out:
            raise CommandTimeout(f"{argv[0]} ran past its {timeout:g} s timeout in sandbox {self._sandbox.name} "
                                 "and was killed", bytes(out), bytes(err))
        done = CommandResult(out.decode(errors="replace"), err.decode(errors="replace"), result.exit_status, duration,
                             result.receipt, dropped["out"], dropped["err"])
        if check and done.exit_code != 0:
            raise CommandFailed(f"{argv[0]} exited {done.exit_code} in sandbox {self._sandbox.name}", done)
        return done

    def start(self, cmd: str | list[str], *, timeout: float | None = None, env: dict[str, str] | None = None,
              cwd: str | None = None, on_stdout: OutputSink | None = None,
              on_stderr: OutputSink | None = None) -> CommandHandle:
        """Start ``cmd`` and return at once with a handle: ``pid``, ``send_stdin()``,
        ``close_stdin()``, ``kill()``, ``wait()``, and ``for stream, text in handle`` over its
        output as it arrives. It runs until it ends, ``timeout`` passes, or the handle is
        closed (then it is killed)."""
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if self._sandbox._recording:
            index = record.plan().add("start", self._sandbox.name, argv=argv, env=env, cwd=cwd, timeout=timeout)
            return record.RecordedCommand(index, argv, self._sandbox.name)  # type: ignore[return-value]
        return CommandHandle.start(self._sandbox._client(), argv, self._sandbox.name,
                                   env={**self._sandbox.env, **(env or {})} or None, cwd=cwd, timeout=timeout,
                                   on_stdout=on_stdout, on_stderr=on_stderr)


class Sandbox:
    """A running sandbox. Make one with :meth:`create`, or reach one with :meth:`connect`."""

    def __init__(self, name: str, home: MvmHome, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.env = dict(env or {})
        self._home = home
        self._recording = False  # record mode: calls go into the plan (sdk/record.py)
        self._killed = False  # by kill(): later calls say so (SandboxStopped), not "no such sandbox"
        # ids of the audit records of what this object did, newest last (its clients append here)
        self._receipts: deque[str] = deque(maxlen=RECEIPTS_KEPT)
        self.commands = Commands(self)
        self.files = Files(self)
        self.ports = Ports(self)
        self.network = Network(self)

    # -- making and finding ----------------------------------------------------------------

    @classmethod
    def create(cls, template: str = "base", *, name: str | None = None, cpus: int | None = None,
               memory: int | None = None, network: str | None = None, allow: list[str] | None = None,
               env: dict[str, str] | None = None, timeout: float = 300, backend: str | None = None, workload_id: str | None = None,
               cold: bool = False, mode: str | None = None, overcommit: bool = False) -> Sandbox:
        """Start a sandbox and return once its agent answers.

        ``template``: a built-in ("base": busybox, and the Python 3 the agent runs on, Debian's
        python3-minimal with the standard library, so ``python3`` works in it too; "python":
        adds Debian's full python3 package), a directory holding an mvm.toml, or the tag of a snapshot (then
        the sandbox is a clone of it). A built-in is built on first use and saved as a template
        snapshot, so later sandboxes start from memory instead of booting (``cold=True``
        boots anyway). ``memory`` is in MiB. ``timeout``: its lifetime in seconds, enforced by
        its supervisor even if this program dies. ``network``: "deny" (the default, and the
        template's unless it says otherwise: no network device), "allow-list" (only the ``allow``
        destinations, ``host:port``, ``*.domain:port`` or ``CIDR:port``, checked and connected by
        the host; ``127.0.0.1:PORT`` is the host's own loopback) or "open" (ordinary outbound
        networking); a sandbox with a network other than its template's boots rather than clones.
        ``workload_id``: your label for it, kept in its record and shown by
        ``info()``. ``mode="record"`` (or ``MVM_SDK_MODE=record``) boots nothing: this and the
        calls that change the guest are written into a plan (sdk/record.py). ``overcommit``:
        boot it even if ``cpus`` is more than the host's CPU threads or ``memory`` more than it
        has available less the headroom kept for the host (otherwise HostTooSmall, before
        booting).
        """
        if network is not None and network not in lifecycle.NETWORK_MODES:
            raise UsageError(f"network={network!r} is not a network mode",
                             'pass "deny", "allow-list" (with allow=[...]) or "open"')
        if allow is not None and (isinstance(allow, str) or not isinstance(allow, list | tuple)):
            raise UsageError(f"allow={allow!r} is not a list of entries", 'write allow=["host:port", ...]')
        if network is None and allow:
            network = "allow-list"  # (allow= alone says what it means)
        if not 0 < timeout <= 7 * 24 * 3600:
            raise UsageError(f"timeout={timeout!r}: a sandbox's lifetime must be more than 0 and at most 7 days")
        home = MvmHome.default()
        vm_name = check_vm_name(name or f"sbx-{secrets.token_hex(4)}")
        if record.resolve_mode(mode) == "record":
            if allow:
                allow_list.check_entries(allow)
            if allow and network != "allow-list":
                raise UsageError(f"allow lists destinations, but network={network!r}", 'pass network="allow-list"')
            record.plan().add("create", vm_name, template=template, cpus=cpus, memory=memory, network=network,
                              allow=list(allow) if allow else None, env=env, timeout=timeout, backend=backend, workload_id=workload_id, cold=cold or None)
            recorded = cls(vm_name, home, env)
            recorded._recording = True
            return recorded
        networked = network not in (None, "deny") or bool(allow)  # (a template snapshot has no network)
        tag = None if cold or networked else _template_snapshot(home, template, backend, cpus, memory)
        started: list[str] = []  # the id of the start's audit record
        if tag is not None:
            cloning.clone(home, cloning.CloneRequest(tag, vm_name, cpus, memory, backend, lifetime_s=timeout,
                                                     ephemeral=True, workload_id=workload_id, overcommit=overcommit,
                                                     on_receipt=started.append))
        else:
            image = _built_image(home, template)
            if network is not None or allow:
                image = allow_list.with_network(image, network, allow or ())
            lifecycle.up(home, image, name=vm_name, vcpus=cpus, memory_mib=memory, hypervisor=backend,
                         lifetime_s=timeout, ephemeral=True, workload_id=workload_id, overcommit=overcommit,
                         workload_dir=template_dir(home, template),  # (where its mvm.toml's volumes may point)
                         on_receipt=started.append)
        sandbox = cls(vm_name, home, env)
        sandbox._receipts.extend(started)
        _LIVE[vm_name] = sandbox
        return sandbox

    @classmethod
    def connect(cls, name: str, *, mode: str | None = None) -> Sandbox:
        """A running sandbox (or any VM) by name. Not in record mode: a plan creates the
        sandboxes it uses, and a connected one would be acted on live."""
        if record.resolve_mode(mode) == "record":
            raise ModeError(f"Sandbox.connect({name!r}) reaches a sandbox that is already running, and this is record "
                            "mode (nothing may act live)",
                            "record a Sandbox.create instead, or run the script in live mode")
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
        if self._recording:
            record.plan().add("kill", self.name)
            return
        _LIVE.pop(self.name, None)
        self._killed = True
        try:
            lifecycle.down(self._home, self.name, force=True)
        except UsageError:  # (already gone: removed when it stopped)
            pass

    def detach(self) -> None:
        """Let it outlive this program: it runs until its lifetime ends or someone kills it."""
        _LIVE.pop(self.name, None)

    def logs(self) -> str:
        """Its console so far: the kernel's warnings and what its entrypoint printed."""
        if self._recording:
            raise record.needs_live(self.name, "logs()")
        self._record()  # (SandboxStopped once killed, SandboxNotFound for no such sandbox)
        chunks: list[bytes] = []
        lifecycle.logs(self._home, self.name, chunks.append)
        return b"".join(chunks).decode(errors="replace")

    def forward(self, guest_port: int, host_port: int | None = None) -> str:
        """The same as ``ports.forward`` (kept for programs written against it)."""
        return self.ports.forward(guest_port, host_port)

    def pause(self) -> None:
        self._pause_resume("pause")

    def resume(self) -> None:
        self._pause_resume("resume")

    def snapshot(self, tag: str) -> str:
        """Save it (memory, processes, files) as snapshot ``tag``; it runs on. ``create(tag)``
        then starts clones of it. The files hold the guest's memory (0600)."""
        self._refuse_without_snapshots("snapshot()")
        return cloning.snapshot_vm(self._home, self.name, tag).tag

    def fork(self, count: int = 1) -> list[Sandbox]:
        """``count`` live copies of it, each with its own identity, ending when it would. A copy
        that fails to start raises; those started before it are killed."""
        mine = self._refuse_without_snapshots("fork()")
        lifetime = None if mine.deadline is None else max(1.0, mine.deadline - time.time())
        _, results = cloning.fork_vm(self._home, self.name, count, prefix=f"{self.name}-fork",
                                     lifetime_s=lifetime, ephemeral=True)
        copies = [Sandbox(r.name, self._home, self.env) for r in results if r.error is None]
        failed = [r for r in results if r.error is not None]
        if failed:
            for copy in copies:
                copy.kill()
            raise SandboxStopped(f"fork(): copy {failed[0].name} did not start: {failed[0].error}")
        for copy in copies:
            _LIVE[copy.name] = copy
        return copies

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"Sandbox({self.name!r})"

    # -- under the hood ---------------------------------------------------------------------

    def _refuse_if_killed(self) -> None:
        if self._killed:
            raise SandboxStopped(f"sandbox {self.name} was killed (kill() or the end of its with block)",
                                 "create a new one")

    def _refuse_without_snapshots(self, what: str) -> VmRecord:
        mine = self._record(running=True)
        backend = backends.get(mine.backend)
        if not backend.capabilities.snapshots:
            refusal = backend.refuse("snapshots", self.name)
            raise Unsupported(f"{what}: {refusal.message}", "start another sandbox from the template instead")
        return mine

    def _pause_resume(self, kind: str) -> None:
        mine = self._record(running=True)
        backends.get(mine.backend).require("pause_resume", self.name)
        with self._client() as client:
            client.call(kind)

    def _record(self, *, running: bool = False) -> VmRecord:
        if self._recording:
            raise record.needs_live(self.name, "this call")
        self._refuse_if_killed()
        try:
            _, found = lifecycle.require_vm(self._home, self.name)
        except DamagedRecord:
            raise
        except UsageError:
            raise SandboxNotFound(f"there is no sandbox named {self.name}", "Sandbox.list() shows them") from None
        if running and not found.running:
            raise SandboxStopped(f"sandbox {self.name} is stopped: {found.stop_reason}", "create a new one")
        return found

    @property
    def receipts(self) -> list[str]:
        """The ids of the audit records of what this object did (its start, each command, file
        write and read, ...), oldest first, up to the last 1000: `mvmctl receipt show ID`."""
        return list(self._receipts)

    def _client(self) -> VmClient:
        if self._recording:
            raise record.needs_live(self.name, "this call")
        self._refuse_if_killed()
        try:
            client = lifecycle.connect(self._home, self.name)
            client.receipts = self._receipts  # (appends are atomic: threads may share this object)
            return client
        except UsageError:
            raise SandboxNotFound(f"there is no sandbox named {self.name} (its lifetime may have ended)",
                                  "create a new one") from None
        except SandboxStopped:
            raise
        except VmError as err:
            raise SandboxStopped(str(err)) from None


def _built_image(home: MvmHome, template: str) -> BootImage:
    """The template's image, built now if it is not yet (that build is an audit record, as
    mvmctl's are)."""
    directory = template_dir(home, template)
    started, built = time.monotonic(), stamps.lookup(home, directory) is not None
    image = image_for(directory, home, _stderr_progress)
    if not built:
        lifecycle.audit_action(home, "build", name=None, started=started, paths=[str(directory)],
                               artifact=image.key, detail={"workload": image.name, "sealed": image.sealed})
    return image


def _template_snapshot(home: MvmHome, template: str, backend: str | None, cpus: int | None,
                       memory: int | None) -> str | None:
    """The snapshot to clone for ``template``: the tag itself, or a built-in's template
    (made on first use where the backend can snapshot). None: boot instead."""
    if template not in BUILT_IN and not Path(template).is_dir():
        return template if (home.snapshots / template).is_dir() and SNAPSHOT_TAG.fullmatch(template) else None
    if template not in BUILT_IN:
        return None
    image = _built_image(home, template)
    return cloning.template_to_clone(home, image, hypervisor=backend, vcpus=cpus, memory_mib=memory,
                                     make_as=f"sdk-{template}-{image.key[:12]}",
                                     announce=lambda: _stderr_progress("template", f"saving {template!r} as a template "
                                                                                   "(once): later sandboxes start from it"))


def _info(record: VmRecord) -> SandboxInfo:
    return SandboxInfo(name=record.name, state=record.state, backend=record.backend,
                       isolation=backends.get(record.backend).capabilities.isolation, cpus=record.vcpus,
                       memory_mib=record.memory_mib, uids=dict(record.uids), sealed=record.sealed,
                       deadline=record.deadline, workload_id=record.workload_id, snapshot=record.snapshot)


def _kill_leftovers() -> None:
    for sandbox in list(_LIVE.values()):
        try:
            sandbox.kill()
        except Exception:  # noqa: BLE001 - the interpreter is exiting: do what can be done
            pass


atexit.register(_kill_leftovers)
