"""The programs mvm needs on the host, how to find them and how to install them.

One table (:data:`TOOLS`) says which executable comes from which Debian package and what
needs it. ``mvmctl doctor`` reads it to report versions, the builder and the QEMU backend call
:func:`require_tool` so a missing program fails with the package to install, and
``mvmctl bootstrap`` installs exactly the missing packages with apt-get.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from mvm.core.errors import HostToolMissing, MvmError

Need = Literal["builder", "qemu", "aarch64"]  # aarch64: only to run aarch64 guests

# Debian's default PATH for ordinary users has no sbin directories, yet mkfs.ext4, debugfs
# and e2fsck live there. Looking there after PATH keeps an installed tool from being
# reported missing (and re-installed) just because of who runs mvmctl.
SBIN_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/sbin", "/sbin")

APT_LISTS_DIR = "/var/lib/apt/lists"
_VERSION_TIMEOUT_S = 15.0
# What apt-get install says when its package lists are missing or stale.
_NEEDS_UPDATE = re.compile(
    r"Unable to locate package|has no installation candidate|Failed to fetch|"
    r"Some index files failed to download"
)


@dataclass(frozen=True)
class HostTool:
    """One executable mvm runs on the host."""

    name: str
    package: str
    needed_by: tuple[Need, ...]
    purpose: str
    version_args: tuple[str, ...]
    version_regex: str
    static_required: bool = False


TOOLS: tuple[HostTool, ...] = (
    HostTool(
        "qemu-system-x86_64", "qemu-system-x86", ("qemu",), "runs the guest (microvm machine)",
        ("--version",), r"QEMU emulator version (\S+)",
    ),
    HostTool(
        "qemu-img", "qemu-utils", ("qemu",), "creates each VM's qcow2 overlay",
        ("--version",), r"qemu-img version (\S+)",
    ),
    HostTool(
        "qemu-system-aarch64", "qemu-system-arm", ("aarch64",), "runs aarch64 guests (virt machine, emulated)",
        ("--version",), r"QEMU emulator version (\S+)",
    ),
    HostTool(
        "busybox", "busybox-static", ("builder",), "the guest's shell and core utilities",
        ("--help",), r"BusyBox v(\S+)", static_required=True,
    ),
    HostTool(
        "mkfs.ext4", "e2fsprogs", ("builder",), "writes rootfs.ext4 from the staging tree",
        ("-V",), r"mke2fs (\S+)",
    ),
    HostTool(
        "debugfs", "e2fsprogs", ("builder",), "pins inode times for reproducible images",
        ("-V",), r"debugfs (\S+)",
    ),
    HostTool(
        "e2fsck", "e2fsprogs", ("builder",), "checks the finished image",
        ("-V",), r"e2fsck (\S+)",
    ),
    HostTool(
        "lz4", "lz4", ("builder",), "unpacks the kernel's LZ4 payload into vmlinux",
        ("--version",), r"v(\d+\.\d+\.\d+)",
    ),
    HostTool(
        "cpio", "cpio", ("builder",), "packs the module-loading initramfs",
        ("--version",), r"cpio\)? (\d\S*)",
    ),
    HostTool(
        "apt-get", "apt", ("builder",), "resolves and downloads the guest's Debian packages",
        ("--version",), r"apt (\S+)",
    ),
    HostTool(
        "dpkg-deb", "dpkg", ("builder",), "unpacks .deb files into the staging tree",
        ("--version",), r"version (\S+) \(",
    ),
)

_BY_NAME: dict[str, HostTool] = {tool.name: tool for tool in TOOLS}


@dataclass(frozen=True)
class ToolStatus:
    """What was found for one tool. ``ok`` means found, ran, and meets its constraints."""

    name: str
    package: str
    needed_by: tuple[Need, ...]
    purpose: str
    path: str | None
    version: str | None
    ok: bool
    problem: str | None = None


def tool_spec(name: str) -> HostTool:
    """The table entry for ``name``; unknown names are a programming error."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown host tool {name!r}; known: {', '.join(_BY_NAME)}") from None


def os_release() -> dict[str, str]:
    """/etc/os-release as a dict, empty where the host has none (macOS, minimal images)."""
    try:
        return platform.freedesktop_os_release()
    except OSError:
        return {}


def is_debian_like(release: dict[str, str] | None = None) -> bool:
    """Debian, Ubuntu and their derivatives: the hosts whose apt can install our tools."""
    info = os_release() if release is None else release
    ids = {info.get("ID", "")} | set(info.get("ID_LIKE", "").split())
    return bool(ids & {"debian", "ubuntu"})


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def elf_is_dynamic(path: str) -> bool | None:
    """True when the ELF file asks for a program interpreter (PT_INTERP), i.e. it is
    dynamically linked; False for a static binary; None when it is not an ELF file.

    A dynamic busybox copied into a guest without its libc cannot run, so the builder needs
    the static one; reading the program headers is exact and needs no ``file`` command.
    """
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 52 or ident[:4] != b"\x7fELF":
                return None
            elf_class, data = ident[4], ident[5]
            if data not in (1, 2) or elf_class not in (1, 2):
                return None
            end = "<" if data == 1 else ">"
            if elf_class == 2:
                (phoff,) = struct.unpack_from(end + "Q", ident, 0x20)
                phentsize, phnum = struct.unpack_from(end + "HH", ident, 0x36)
            else:
                (phoff,) = struct.unpack_from(end + "I", ident, 0x1C)
                phentsize, phnum = struct.unpack_from(end + "HH", ident, 0x2A)
            for index in range(phnum):
                f.seek(phoff + index * phentsize)
                raw = f.read(4)
                if len(raw) < 4:
                    return None
                if struct.unpack(end + "I", raw)[0] == 3:  # PT_INTERP
                    return True
            return False
    except OSError:
        return None


def _read_version(tool: HostTool, path: str) -> tuple[bool, str | None, str | None]:
    """Run the version command: (ran, version, problem)."""
    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.run(
            [path, *tool.version_args],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env=env,
            timeout=_VERSION_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return False, None, f"`{path} {' '.join(tool.version_args)}` did not finish"
    except OSError as err:
        return False, None, f"cannot run {path}: {err.strerror or err}"
    match = re.search(tool.version_regex, proc.stdout + "\n" + proc.stderr)
    version = match.group(1) if match else None
    if proc.returncode != 0 and version is None:
        return False, None, f"`{path} {' '.join(tool.version_args)}` exited {proc.returncode}"
    return True, version, None


def find_tool(name: str) -> ToolStatus:
    """Look ``name`` up on PATH (then the sbin directories), run it for its version and
    check its constraints (busybox must be static)."""
    tool = tool_spec(name)

    def status(path: str | None, version: str | None, ok: bool, problem: str | None) -> ToolStatus:
        return ToolStatus(
            name=tool.name, package=tool.package, needed_by=tool.needed_by,
            purpose=tool.purpose, path=path, version=version, ok=ok, problem=problem,
        )

    path = _which(tool.name)
    if path is None:
        missing = "not found on PATH"
        if tool.package in ("apt", "dpkg") and not is_debian_like():
            missing = (
                f"not found; the builder resolves guest packages from Debian with {tool.name}, "
                "and this host is not Debian/Ubuntu"
            )
        return status(None, None, False, missing)
    ran, version, failure = _read_version(tool, path)
    if not ran:
        return status(path, None, False, failure)
    if tool.static_required:
        dynamic = elf_is_dynamic(path)
        if dynamic is not False:
            kind = "dynamically linked" if dynamic else "not an ELF binary"
            return status(
                path, version, False,
                f"{path} is {kind}; the guest needs a static one from {tool.package}",
            )
    return status(path, version, True, None)


def host_tools() -> list[ToolStatus]:
    """Every tool in :data:`TOOLS`, checked now."""
    return [find_tool(tool.name) for tool in TOOLS]


def require_tool(name: str) -> str:
    """The path of a usable ``name``, or :class:`HostToolMissing` naming its package."""
    found = find_tool(name)
    if not found.ok or found.path is None:
        raise HostToolMissing(found.name, found.package)
    return found.path


# --- bootstrap ---------------------------------------------------------------------------

BootstrapStatus = Literal["nothing-to-do", "installed", "dry-run", "manual"]


@dataclass(frozen=True)
class PackageHost:
    """The facts that decide how (or whether) mvm can install packages here."""

    debian_like: bool
    apt_get: str | None
    is_root: bool
    sudo_ok: bool
    lists_present: bool
    os_name: str

    @classmethod
    def detect(cls) -> PackageHost:
        release = os_release()
        apt_get = _which("apt-get")
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        return cls(
            debian_like=is_debian_like(release),
            apt_get=apt_get,
            is_root=is_root,
            sudo_ok=(not is_root) and _sudo_works(),
            lists_present=_apt_lists_present(),
            os_name=release.get("PRETTY_NAME") or f"{platform.system()} {platform.release()}",
        )


@dataclass(frozen=True)
class BootstrapResult:
    """What bootstrap found and did. ``commands`` are the ones run (installed), that would
    run (dry-run), or that the user must run (manual)."""

    status: BootstrapStatus
    missing: tuple[str, ...]
    packages: tuple[str, ...]
    commands: tuple[tuple[str, ...], ...] = ()
    message: str = ""
    tools: tuple[ToolStatus, ...] = field(default=(), repr=False)

    @property
    def installed(self) -> bool:
        return self.status == "installed"


def _sudo_works() -> bool:
    sudo = shutil.which("sudo")
    if sudo is None:
        return False
    try:
        proc = subprocess.run(
            [sudo, "-n", "true"],
            check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _apt_lists_present(lists_dir: str = APT_LISTS_DIR) -> bool:
    return bool(glob.glob(os.path.join(lists_dir, "*_Packages*")))


def _apt_commands(apt_get: str, prefix: list[str], packages: tuple[str, ...]) -> list[list[str]]:
    """[update, install] argv for ``packages``, each behind ``prefix``."""
    return [
        [*prefix, apt_get, "update"],
        [*prefix, apt_get, "install", "-y", "--no-install-recommends", *packages],
    ]


_SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def _apt_env() -> dict[str, str]:
    """Non-interactive, and a PATH with the system directories: dpkg refuses to run
    without the sbin ones (ldconfig, start-stop-daemon) on PATH."""
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    parts += [d for d in _SYSTEM_PATH if d not in parts]
    return dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=os.pathsep.join(parts))


def _run_apt(argv: list[str], echo: Callable[[str], None]) -> subprocess.CompletedProcess[str]:
    echo(f"running: {shlex.join(argv)}")
    env = _apt_env()
    return subprocess.run(
        argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        errors="replace", env=env,
    )


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 8) -> str:
    text = (proc.stderr or "").strip() or (proc.stdout or "").strip()
    return " | ".join(text.splitlines()[-lines:])


def bootstrap(
    *,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    host: PackageHost | None = None,
) -> BootstrapResult:
    """Install the Debian packages of every missing or unusable tool.

    Runs ``apt-get install -y --no-install-recommends`` (without recommends QEMU pulls a GTK
    GUI) non-interactively with no stdin, as root or through ``sudo -n``; ``apt-get update``
    runs first only when the host has no package lists, or once after an install that failed
    for lack of them. Where it cannot install (no root and no password-less sudo, or no apt)
    it prints what to run and installs nothing. Idempotent: with every tool present it does
    nothing. ``host`` overrides the detected install facts.
    """
    statuses = host_tools()
    missing = tuple(s.name for s in statuses if not s.ok)
    packages = tuple(dict.fromkeys(s.package for s in statuses if not s.ok))
    if not missing:
        message = f"all {len(statuses)} host tools are present; nothing to install"
        echo(message)
        return BootstrapResult("nothing-to-do", (), (), (), message, tuple(statuses))

    for s in statuses:
        if not s.ok:
            echo(f"missing: {s.name} ({s.package}): {s.problem}")

    host = host or PackageHost.detect()
    if not host.debian_like or host.apt_get is None:
        why = (
            f"this host ({host.os_name}) is not Debian/Ubuntu"
            if not host.debian_like
            else "apt-get is not available on this host"
        )
        message = (
            f"{why}, so mvm cannot install its tools; install the equivalents of these Debian "
            f"packages with your package manager: {' '.join(packages)}"
        )
        echo(message)
        return BootstrapResult("manual", missing, packages, (), message, tuple(statuses))

    if not host.is_root and not host.sudo_ok:
        update, install = _apt_commands("apt-get", ["sudo"], packages)
        manual = ([update] if not host.lists_present else []) + [install]
        message = (
            "not root and `sudo -n` is not allowed, so nothing was installed; run:\n"
            + "\n".join(f"  {shlex.join(argv)}" for argv in manual)
        )
        echo(message)
        return BootstrapResult(
            "manual", missing, packages, tuple(tuple(a) for a in manual), message, tuple(statuses)
        )

    # sudo resets the environment, so carry DEBIAN_FRONTEND through env(1).
    prefix = [] if host.is_root else ["sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive"]
    update, install = _apt_commands(host.apt_get, prefix, packages)
    planned = ([update] if not host.lists_present else []) + [install]

    if dry_run:
        message = "dry run; would run:\n" + "\n".join(f"  {shlex.join(a)}" for a in planned)
        echo(message)
        return BootstrapResult(
            "dry-run", missing, packages, tuple(tuple(a) for a in planned), message,
            tuple(statuses),
        )

    ran: list[tuple[str, ...]] = []
    if not host.lists_present:
        proc = _run_apt(update, echo)
        ran.append(tuple(update))
        if proc.returncode != 0:
            raise MvmError(f"apt-get update failed: {_tail(proc)}", "check the host's apt sources")
    proc = _run_apt(install, echo)
    ran.append(tuple(install))
    if proc.returncode != 0 and host.lists_present and _NEEDS_UPDATE.search(proc.stderr or ""):
        echo("the package lists look missing or stale; updating them once")
        upd = _run_apt(update, echo)
        ran.append(tuple(update))
        if upd.returncode != 0:
            raise MvmError(f"apt-get update failed: {_tail(upd)}", "check the host's apt sources")
        proc = _run_apt(install, echo)
        ran.append(tuple(install))
    if proc.returncode != 0:
        raise MvmError(
            f"apt-get install {' '.join(packages)} failed: {_tail(proc)}",
            f"run `{shlex.join(install)}` by hand to see the whole output",
        )

    after = host_tools()
    still = [s for s in after if not s.ok]
    if still:
        raise MvmError(
            f"`apt-get install {' '.join(packages)}` succeeded but these tools are still "
            "unusable: "
            + "; ".join(f"{s.name}: {s.problem}" for s in still),
            "run `mvmctl doctor` for details",
        )
    message = f"installed {' '.join(packages)}; all {len(after)} host tools are present"
    echo(message)
    return BootstrapResult("installed", missing, packages, tuple(ran), message, tuple(after))
