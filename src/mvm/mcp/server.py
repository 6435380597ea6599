"""``mvmctl mcp``: an MCP server on stdio (the official ``mcp`` SDK, 1.x) whose tools give a
model client throwaway sandboxes, through the same SDK a program uses.

Bounded from the start, each limit from the environment with a default, a bad value refused
in one line before serving: at most MVM_MCP_MAX_INFLIGHT tool calls at once (another is a busy
error at once, not a wait), MVM_MCP_MEM_CEILING_MIB of guest memory across its sandboxes (a
call that would pass it is refused before anything starts), a session idle for
MVM_MCP_SESSION_IDLE seconds is destroyed, and no sandbox lives past MVM_MCP_SESSION_MAX
seconds: that is each sandbox's lifetime, kept by its supervisor, so even a SIGKILL of this
server leaves nothing running for longer. The network modes a model may ask for are the
operator's MVM_MCP_NETWORK (default "deny" only: an allow-list can name the host's own
loopback services), and so are the templates: the built-ins (base, python), plus the template
directories and snapshot tags the operator lists in MVM_MCP_TEMPLATES (a snapshot holds a
guest's memory, a directory's mvm.toml its volumes: a model must not pick either on its own).
A sandbox counts against the memory ceiling with its template's own memory. Only sandboxes
this server made are reachable, and
all of them are destroyed when the client goes away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp.server.fastmcp import FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.types import Resource as MCPResource

from mvm.core.errors import MvmError, UsageError
from mvm.runtime.client import set_surface
from mvm.runtime.lifecycle import NETWORK_MODES
from mvm.sdk.sandbox import Sandbox

OUTPUT_CAP = 64 * 1024  # bytes of stdout (and of stderr) a tool result carries
ENVS = {"shell": "base", "python": "python"}


@dataclass(frozen=True)
class Limits:
    max_inflight: int = 4
    mem_ceiling_mib: int = 4096
    session_idle_s: int = 300
    session_max_s: int = 3600
    overcommit: bool = False  # the operator's call (MVM_MCP_OVERCOMMIT=1), never the model's
    # The network modes the model may ask for: the operator's call too (MVM_MCP_NETWORK=deny,allow-list,open).
    # An allow-list may name the host's own loopback services, so even that is not the default.
    network_modes: tuple[str, ...] = ("deny",)
    # Templates beyond the built-ins (MVM_MCP_TEMPLATES): resolved directory paths and snapshot tags.
    template_dirs: tuple[str, ...] = ()
    template_tags: tuple[str, ...] = ()

    @classmethod
    def from_environment(cls) -> Limits:
        values: dict[str, int | bool | tuple[str, ...]] = {}
        overcommit = os.environ.get("MVM_MCP_OVERCOMMIT")
        if overcommit is not None:
            if overcommit not in ("0", "1"):
                raise UsageError(f"MVM_MCP_OVERCOMMIT={overcommit!r} is not 0 or 1",
                                 "unset it, or MVM_MCP_OVERCOMMIT=1 to let sandboxes ask for more than the host has")
            values["overcommit"] = overcommit == "1"
        modes = os.environ.get("MVM_MCP_NETWORK")
        if modes is not None:
            listed = tuple(m.strip() for m in modes.split(",") if m.strip())
            if not listed or any(m not in NETWORK_MODES for m in listed):
                raise UsageError(f"MVM_MCP_NETWORK={modes!r} is not a list of {', '.join(NETWORK_MODES)}",
                                 "unset it (deny only), or e.g. MVM_MCP_NETWORK=deny,allow-list")
            values["network_modes"] = listed
        templates = os.environ.get("MVM_MCP_TEMPLATES")
        if templates is not None:
            values["template_dirs"], values["template_tags"] = _allowed_templates(templates)
        for name, env in (("max_inflight", "MVM_MCP_MAX_INFLIGHT"), ("mem_ceiling_mib", "MVM_MCP_MEM_CEILING_MIB"),
                          ("session_idle_s", "MVM_MCP_SESSION_IDLE"), ("session_max_s", "MVM_MCP_SESSION_MAX")):
            text = os.environ.get(env)
            if text is None:
                continue
            if not text.isdigit() or int(text) < 1:
                raise UsageError(f"{env}={text!r} is not a whole number of at least 1", f"unset it, or e.g. {env}=4")
            values[name] = int(text)
        return cls(**values)  # type: ignore[arg-type]


def _allowed_templates(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """MVM_MCP_TEMPLATES: each entry a directory holding an mvm.toml, or a snapshot of this MVM_HOME."""
    from mvm.core.state import MvmHome
    from mvm.runtime.snapshot import TAG

    fix = "unset it (the built-ins only), or list directories with an mvm.toml and snapshot tags, comma-separated"
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise UsageError(f"MVM_MCP_TEMPLATES={text!r} lists no template", fix)
    dirs, tags = [], []
    snapshots = MvmHome.default().snapshots
    for entry in entries:
        if (Path(entry) / "mvm.toml").is_file():
            dirs.append(str(Path(entry).resolve()))
        elif TAG.fullmatch(entry) and (snapshots / entry).is_dir():
            tags.append(entry)
        else:
            raise UsageError(f"MVM_MCP_TEMPLATES: {entry!r} is neither a directory with an mvm.toml nor a snapshot "
                             f"tag of {snapshots.parent}", fix)
    return tuple(dirs), tuple(tags)


@dataclass
class Session:
    sandbox: Sandbox
    memory_mib: int
    last_used: float = field(default_factory=time.monotonic)


class SandboxPool:
    """The sandboxes this server made: named sessions, and the limits across them."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.inflight = 0

    def enter_call(self) -> None:
        with self.lock:
            if self.inflight >= self.limits.max_inflight:
                raise ToolError(f"busy: {self.inflight} calls are running (MVM_MCP_MAX_INFLIGHT="
                                f"{self.limits.max_inflight}); try again when one has finished")
            self.inflight += 1

    def leave_call(self) -> None:
        with self.lock:
            self.inflight -= 1

    def template(self, template: str) -> tuple[str, int]:
        """The template as Sandbox.create takes it, and the memory (MiB) its sandbox asks for;
        ToolError unless it is a built-in or the operator listed it."""
        from mvm.core.manifest import load_manifest
        from mvm.core.state import MvmHome
        from mvm.runtime.snapshot import SnapshotStore
        from mvm.sdk.templates import BUILT_IN, template_dir

        home = MvmHome.default()
        if template in BUILT_IN:
            return template, load_manifest(template_dir(home, template)).memory_mib
        if template in self.limits.template_tags and not Path(template).exists():
            return template, SnapshotStore(home).load(template, check_files=False).manifest.memory_mib
        if template and str(Path(template).resolve()) in self.limits.template_dirs:
            directory = str(Path(template).resolve())
            return directory, load_manifest(directory).memory_mib
        raise ToolError(f"refused: template {template[:200]!r} is not open to this server's clients (the built-ins "
                        f"{', '.join(BUILT_IN)}, and what the operator lists in MVM_MCP_TEMPLATES)")

    def create(self, template: str, memory_mib: int | None = None, network: str | None = None,
               allow: list[str] | None = None) -> Session:
        template, own_memory = self.template(template)
        memory = memory_mib or own_memory
        mode = network or ("allow-list" if allow else "deny")
        if mode not in self.limits.network_modes:
            raise ToolError(f"refused: network {mode!r} is not open to this server's clients (MVM_MCP_NETWORK="
                            f"{','.join(self.limits.network_modes)}); the operator decides which modes a model may ask for")
        with self.lock:
            used = sum(s.memory_mib for s in self.sessions.values())
            if used + memory > self.limits.mem_ceiling_mib:
                raise ToolError(f"refused: a {memory} MiB sandbox would bring this server's sandboxes to "
                                f"{used + memory} MiB, over MVM_MCP_MEM_CEILING_MIB={self.limits.mem_ceiling_mib}; "
                                "destroy one first")
            placeholder = Session(sandbox=None, memory_mib=memory)  # type: ignore[arg-type]
            self.sessions[f".reserving-{id(placeholder)}"] = placeholder  # counts while it boots
        try:
            sandbox = Sandbox.create(template, memory=memory_mib, network=network, allow=allow,
                                     timeout=self.limits.session_max_s, overcommit=self.limits.overcommit)
        finally:
            with self.lock:
                self.sessions.pop(f".reserving-{id(placeholder)}", None)
        given = sandbox.network.info().mode  # a template directory may declare its own network
        if given not in self.limits.network_modes:
            sandbox.kill()
            raise ToolError(f"refused: template {template!r} declares network {given!r}, which is not open to this "
                            f"server's clients (MVM_MCP_NETWORK={','.join(self.limits.network_modes)})")
        session = Session(sandbox, memory)
        with self.lock:
            self.sessions[sandbox.name] = session
        return session

    def get(self, name: str) -> Session:
        with self.lock:
            session = self.sessions.get(name)
        if session is None or name.startswith("."):
            raise ToolError(f"no sandbox {name!r} of this server (sandbox_list shows them)")
        session.last_used = time.monotonic()
        return session

    def destroy(self, name: str) -> None:
        with self.lock:
            session = self.sessions.pop(name, None)
        if session is not None:
            session.sandbox.kill()

    def destroy_idle(self) -> None:
        now = time.monotonic()
        with self.lock:
            idle = [n for n, s in self.sessions.items()
                    if not n.startswith(".") and now - s.last_used > self.limits.session_idle_s]
        for name in idle:
            self.destroy(name)

    def destroy_all(self) -> None:
        for name in [n for n in self.sessions if not n.startswith(".")]:
            self.destroy(name)


def _capped(data: str | bytes, dropped: int = 0) -> str:
    """At most OUTPUT_CAP bytes, and how many more there were (``dropped``: ones never kept)."""
    raw = data.encode() if isinstance(data, str) else data
    dropped += max(0, len(raw) - OUTPUT_CAP)
    text = raw[:OUTPUT_CAP].decode(errors="ignore" if dropped else "replace")
    return text + f"\n[... {dropped} more bytes truncated]" if dropped else text


def _read_capped(stream: Iterator[bytes]) -> str:
    """A file's first OUTPUT_CAP bytes; the read stops there (a guest file may be endless)."""
    kept = bytearray()
    try:
        for chunk in stream:
            kept += chunk
            if len(kept) > OUTPUT_CAP:
                return kept[:OUTPUT_CAP].decode(errors="ignore") + "\n[... truncated at 64 KiB]"
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return kept.decode(errors="replace")


class SandboxServer(FastMCP):
    """FastMCP, with this server's running sandboxes listed as resources (``sandbox://NAME``)."""

    pool: SandboxPool

    async def list_resources(self) -> list[MCPResource]:
        with self.pool.lock:
            names = sorted(n for n in self.pool.sessions if not n.startswith("."))
        return [*await super().list_resources(),
                *(MCPResource(uri=f"sandbox://{name}", name=name, mimeType="application/json",
                              description=f"sandbox {name}: its state, backend, resources and lifetime")
                  for name in names)]


def build_server(limits: Limits) -> FastMCP:
    set_surface("mcp")  # every sandbox action of this process is recorded as MCP's
    pool = SandboxPool(limits)

    @asynccontextmanager
    async def lifespan(_: FastMCP) -> AsyncIterator[None]:
        async def reap() -> None:
            while True:
                await asyncio.sleep(min(5.0, limits.session_idle_s / 2))
                await asyncio.to_thread(pool.destroy_idle)

        reaper = asyncio.create_task(reap())
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.to_thread(pool.destroy_all)  # the client went away: nothing of ours stays

    server = SandboxServer("mvm", instructions="Run code in throwaway local microVM sandboxes (no network unless "
                                                  "sandbox_create asks for an allow-list or open network).",
                           lifespan=lifespan)
    server.pool = pool

    @server.resource("sandbox://{name}", mime_type="application/json")
    async def sandbox_resource(name: str) -> str:
        """One of this server's sandboxes: its state, backend, resources and lifetime."""
        def describe() -> str:
            info = pool.get(name).sandbox.info()
            return json.dumps(dataclasses.asdict(info))
        return await call(describe)

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        pool.enter_call()
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except MvmError as err:
            raise ToolError(str(err)) from None
        finally:
            pool.leave_call()

    def exec_in(session: Session, command: str | list[str], timeout_secs: float) -> dict[str, Any]:
        from mvm.errors import CommandTimeout

        if not math.isfinite(timeout_secs):
            raise ToolError(f"timeout_secs={timeout_secs!r} is not a number of seconds (1 to 600)")
        timeout = min(max(timeout_secs, 1), 600)
        try:
            # (kept to the cap as it arrives: a command can print gigabytes)
            result = session.sandbox.commands.run(command, timeout=timeout, max_output=OUTPUT_CAP)
        except CommandTimeout as err:
            return {"exit_code": 137, "timed_out": True, "timeout_secs": timeout,
                    "stdout": _capped(err.stdout), "stderr": _capped(err.stderr), "sandbox": session.sandbox.name}
        return {"exit_code": result.exit_code, "timed_out": False, "timeout_secs": timeout,
                "stdout": _capped(result.stdout, result.stdout_dropped),
                "stderr": _capped(result.stderr, result.stderr_dropped), "sandbox": session.sandbox.name,
                "receipt": result.receipt_id}

    @server.tool()
    async def run(code: str, env: str = "shell", session: str | None = None, close: bool = False,
                  timeout_secs: float = 60) -> dict[str, Any]:
        """Run code in a sandbox: env "shell" (/bin/sh -c) or "python" (python3 -c), or a
        template the operator opened to this server (run as shell). The result names its
        `session`: pass it again to reuse that warm sandbox; `close` destroys it after this
        call (an unused one is destroyed after MVM_MCP_SESSION_IDLE seconds); `receipt` is the id of its audit record (`mvmctl
        receipt show ID`). stdout and stderr are capped at 64 KiB each;
        timeout_secs is clamped to 1-600 (the result says what was used)."""
        def work() -> dict[str, Any]:
            current = pool.get(session) if session is not None else pool.create(ENVS.get(env, env))
            try:
                command: str | list[str] = ["python3", "-c", code] if env == "python" else code
                result = exec_in(current, command, timeout_secs)
            finally:
                if close:
                    pool.destroy(current.sandbox.name)
            result["session"] = None if close else current.sandbox.name
            return result
        return await call(work)

    @server.tool()
    async def sandbox_create(template: str = "base", memory_mib: int | None = None, network: str | None = None,
                             allow: list[str] | None = None) -> dict[str, Any]:
        """Start a sandbox ("base", "python", or a template directory or snapshot tag the operator
        opened to this server, MVM_MCP_TEMPLATES); returns its name.
        `network`: "deny" (default: no network), "allow-list" (only the `allow` destinations,
        host:port, *.domain:port or CIDR:port, checked by the host) or "open" — each only if the
        operator opened it to this server (MVM_MCP_NETWORK; by default only "deny")."""
        session = await call(pool.create, template, memory_mib, network, allow)
        return {"sandbox": session.sandbox.name, "network": network or "deny", "allow": list(allow or [])}

    @server.tool()
    async def sandbox_exec(sandbox: str, command: str, timeout_secs: float = 60) -> dict[str, Any]:
        """Run a shell command in a sandbox of this server."""
        return await call(lambda: exec_in(pool.get(sandbox), command, timeout_secs))

    @server.tool()
    async def sandbox_read_file(sandbox: str, path: str) -> str:
        """A file's text (capped at 64 KiB)."""
        return await call(lambda: _read_capped(pool.get(sandbox).sandbox.files.read(path, format="stream")))

    @server.tool()
    async def sandbox_write_file(sandbox: str, path: str, content: str) -> dict[str, Any]:
        """Write a text file (created or replaced whole)."""
        size = await call(lambda: pool.get(sandbox).sandbox.files.write(path, content))
        return {"path": path, "size": size}

    @server.tool()
    async def sandbox_list_files(sandbox: str, path: str = "/") -> list[dict[str, Any]]:
        """A directory's entries: name, type, size, mode, mtime."""
        return await call(lambda: pool.get(sandbox).sandbox.files.list(path))

    @server.tool()
    async def sandbox_list() -> list[dict[str, Any]]:
        """This server's sandboxes."""
        with pool.lock:
            names = [n for n in pool.sessions if not n.startswith(".")]
        return [{"sandbox": n} for n in names]

    @server.tool()
    async def sandbox_destroy(sandbox: str) -> dict[str, Any]:
        """Destroy a sandbox of this server."""
        await call(lambda: (pool.get(sandbox), pool.destroy(sandbox)))
        return {"destroyed": sandbox}

    return server

