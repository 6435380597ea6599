"""The guest's own sections: ``[entrypoint]``, ``[uids]``, ``packages`` and ``[extra_files]``.

What the guest runs, as whom, and what its image holds; each reader checks its TOML values
and returns the Workload IR's piece.
"""

from __future__ import annotations

import re
from typing import Any

from mvm.core.manifest_wording import ManifestChecks, field_name, kind_of, quote
from mvm.core.workload import (
    AGENT_UID,
    SEALED_ENTRYPOINT_UID,
    Entrypoint,
    EntrypointKind,
    ExtraFile,
    RestartPolicy,
    Service,
    Uids,
    Workload,
    validate_name,
)

MAX_UID = 65534
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
# Written by the builder itself; an extra file there would replace /init or the agent.
_RESERVED_PATHS = ("/init", "/etc/mvm", "/usr/lib/mvm")

_ENTRYPOINT_KEYS = ("shell", "command", "services")
_SERVICE_KEYS = ("command", "restart")
_UID_KEYS = ("agent", "entrypoint")
_EXTRA_FILE_KEYS = ("content", "mode")

_ENTRYPOINT_FIX = (
    'add an [entrypoint] table with one of shell = "/bin/sh", command = ["/path/prog", ...]'
    " or [entrypoint.services.NAME] tables"
)


class GuestSections(ManifestChecks):
    """Readers of the sections that say what runs in the guest and what its image holds."""

    def entrypoint(self, data: dict[str, Any]) -> Entrypoint:
        if "entrypoint" not in data:
            raise self.error(
                ("entrypoint",), "is missing: nothing says what the guest runs", _ENTRYPOINT_FIX
            )
        at: tuple[str | int, ...] = ("entrypoint",)
        table = self.table(data["entrypoint"], at, _ENTRYPOINT_FIX)
        self.keys(table, _ENTRYPOINT_KEYS, at)
        forms = [k for k in _ENTRYPOINT_KEYS if k in table]
        if not forms:
            raise self.error(
                at, "is empty: give one of shell, command or services", _ENTRYPOINT_FIX
            )
        if len(forms) > 1:
            raise self.error(
                at,
                f"gives {' and '.join(forms)}; an entrypoint is exactly one of them",
                f"keep only one of {', '.join(forms)}",
            )
        form = forms[0]
        if form == "shell":
            fix = 'write shell = "/bin/sh"'
            shell = self.string(table["shell"], (*at, "shell"), fix)
            if not shell.startswith("/"):
                raise self.error((*at, "shell"), f"{quote(shell)} is not an absolute path", fix)
            return Entrypoint(kind=EntrypointKind.SHELL, shell=shell)
        if form == "command":
            argv = self.argv(table["command"], (*at, "command"))
            return Entrypoint(kind=EntrypointKind.COMMAND, command=argv)
        return Entrypoint(kind=EntrypointKind.SERVICES, services=self.services(table["services"]))

    def argv(self, value: object, at: tuple[str | int, ...]) -> tuple[str, ...]:
        """A program and its arguments; no shell parsing ever happens on them."""
        fix = 'write command = ["/usr/bin/prog", "arg", ...]'
        argv = self.strings(value, at, fix)
        if not argv:
            raise self.error(at, "is empty: it needs at least the program to run", fix)
        program = argv[0]
        if not program or (not program.startswith("/") and "/" in program):
            raise self.error(
                at,
                f"program {quote(program)} must be an absolute path or a bare name found on PATH",
                fix,
            )
        return tuple(argv)

    def services(self, value: object) -> tuple[Service, ...]:
        at: tuple[str | int, ...] = ("entrypoint", "services")
        fix = 'add [entrypoint.services.web] with command = ["/usr/bin/prog"]'
        table = self.table(value, at, fix)
        if not table:
            raise self.error(at, "lists no services", fix)
        services = []
        for name, spec in table.items():
            here = (*at, name)
            try:
                validate_name(name)
            except ValueError as err:
                raise self.error(
                    here, f"service name: {err}", 'name it like "web" or "worker-1"'
                ) from None
            spec = self.table(spec, here, f"write [{field_name(*here)}] with a command")
            self.keys(spec, _SERVICE_KEYS, here)
            if "command" not in spec:
                raise self.error(
                    (*here, "command"), "is missing", 'add command = ["/usr/bin/prog", ...]'
                )
            argv = self.argv(spec["command"], (*here, "command"))
            policies = tuple(p.value for p in RestartPolicy)
            restart = RestartPolicy.ON_FAILURE
            if "restart" in spec:
                restart = RestartPolicy(self.choice(spec["restart"], policies, (*here, "restart")))
            services.append(Service(name=name, command=argv, restart=restart))
        return tuple(services)

    def uids(self, data: dict[str, Any], dev: bool) -> Uids:
        """Defaults: agent 990; entrypoint root in a dev image, 1000 in a sealed one."""
        at: tuple[str | int, ...] = ("uids",)
        table = self.table(
            data.get("uids", {}), at, "write [uids] with agent = 990, entrypoint = 1000"
        )
        self.keys(table, _UID_KEYS, at)
        values: dict[str, int] = {}
        for key in _UID_KEYS:
            if key not in table:
                continue
            fix = f"write {key} = a whole number from {1 if key == 'agent' else 0} to {MAX_UID}"
            uid = self.integer(table[key], (*at, key), fix)
            if not 0 <= uid <= MAX_UID:
                raise self.error((*at, key), f"{uid} is not a uid from 0 to {MAX_UID}", fix)
            values[key] = uid
        if values.get("agent") == 0:
            raise self.error(
                (*at, "agent"),
                "is 0, but the agent never runs as root",
                "remove it to use 990, or pick another uid",
            )
        values.setdefault("entrypoint", Workload.default_entrypoint_uid(dev))
        agent = values.get("agent", AGENT_UID)
        if values["entrypoint"] == agent:
            # Same uid would let the workload signal or ptrace the agent and answer for it.
            raise self.error(
                (*at, "entrypoint"),
                f"{agent} is the agent's uid; the workload must not run as the agent",
                f"pick another uid, e.g. {SEALED_ENTRYPOINT_UID}",
            )
        return Uids(**values)

    def packages(self, data: dict[str, Any]) -> tuple[str, ...]:
        if "packages" not in data:
            return ()
        fix = 'write packages = ["python3", ...] with Debian package names'
        names = self.strings(data["packages"], ("packages",), fix)
        for i, name in enumerate(names):
            if not PACKAGE_RE.match(name):
                raise self.error(
                    ("packages", i),
                    f"{quote(name)} is not a Debian package name (two or more lowercase"
                    " letters, digits, '+', '-' or '.', starting with a letter or digit)",
                    "use the name `apt-cache search` shows, e.g. python3",
                )
        return tuple(dict.fromkeys(names))

    def extra_files(self, data: dict[str, Any]) -> tuple[ExtraFile, ...]:
        at: tuple[str | int, ...] = ("extra_files",)
        fix = '[extra_files."/etc/motd"] with content = "..." and mode = "0644"'
        table = self.table(data.get("extra_files", {}), at, f"write {fix}")
        files: dict[str, ExtraFile] = {}
        for key, spec in table.items():
            here = (*at, key)
            path = self.guest_path(key, here, "/etc/motd")
            if key.endswith("/"):
                raise self.error(
                    here,
                    "ends with '/', so it names a directory, not a file",
                    "drop the trailing /",
                )
            for reserved in _RESERVED_PATHS:
                if path == reserved or path.startswith(reserved + "/"):
                    raise self.error(
                        here, f"{reserved} is written by mvm itself", "put the file somewhere else"
                    )
            if path in files:
                raise self.error(
                    here, f"names the same file as {quote(path)} above", "keep one of them"
                )
            spec = self.table(spec, here, f"write {fix}")
            self.keys(spec, _EXTRA_FILE_KEYS, here)
            if "content" not in spec:
                raise self.error((*here, "content"), "is missing", 'add content = "..."')
            content = self.string(spec["content"], (*here, "content"), 'write content = "..."')
            mode = self.mode(spec["mode"], (*here, "mode")) if "mode" in spec else 0o644
            files[path] = ExtraFile(path=path, content=content, mode=mode)
        return tuple(files.values())

    def mode(self, value: object, at: tuple[str | int, ...]) -> int:
        """``"0644"``, ``"755"`` or a TOML integer such as ``0o644`` (taken as the mode itself)."""
        fix = 'write the mode as octal digits in a string, e.g. mode = "0644"'
        if isinstance(value, str):
            if not re.fullmatch(r"[0-7]{1,5}", value):
                raise self.error(at, f"{quote(value)} is not an octal mode", fix)
            mode = int(value, 8)
        elif isinstance(value, int) and not isinstance(value, bool):
            mode = value
            if mode < 0:
                raise self.error(at, f"{mode} is negative", fix)
            if mode <= 0o7777 and mode & 0o1000:
                # The sticky bit means nothing on a file: this is almost always `mode = 644`.
                octal = set(str(mode)) <= set("01234567")
                raise self.error(
                    at,
                    f"the integer {mode} is mode 0o{mode:o} (sticky bit);"
                    " TOML integers are decimal",
                    f'for octal {mode} write mode = "0{mode}" or mode = 0o{mode}' if octal else fix,
                )
        else:
            raise self.error(at, f"must be a string of octal digits, not {kind_of(value)}", fix)
        if mode > 0o7777:
            raise self.error(at, f"0o{mode:o} is larger than 0o7777", fix)
        return mode
