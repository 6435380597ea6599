"""Stage the guest's root tree and its initramfs from .debs and the workload.

The root tree is plain files on the host (no chroot, no loop mount, no maintainer scripts):
each .deb is unpacked with ``dpkg-deb -x``, docs and locales are pruned, busybox's applets
are linked where Debian left a gap, and mvm's own pieces are added: ``/init``, the agent,
``/etc/mvm/*`` (the workload's settings as shell-readable data), users and extra files.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tarfile
from importlib import resources
from pathlib import Path

from mvm.build.kernel import MODULES, Kernel
from mvm.core.errors import BuildError
from mvm.core.workload import EntrypointKind, Workload

PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
         "usr/share/bug", "usr/share/bash-completion", "usr/share/common-licenses")
SETPRIV_FILES = ("./usr/bin/setpriv", "./lib/x86_64-linux-gnu/libcap-ng.so.0", "./lib/x86_64-linux-gnu/libcap-ng.so.0.0.0",
                 "./usr/lib/x86_64-linux-gnu/libcap-ng.so.0", "./usr/lib/x86_64-linux-gnu/libcap-ng.so.0.0.0")
GUEST_DIR = "/usr/lib/mvm"


def guest_file(name: str) -> bytes:
    """A file shipped in mvm.guest (the /init scripts, the agent)."""
    return resources.files("mvm.guest").joinpath(name).read_bytes()


def protocol_source() -> bytes:
    return resources.files("mvm.core").joinpath("protocol.py").read_bytes()


def unpack_debs(debs: list[Path], tree: Path) -> None:
    """``dpkg-deb -x`` every package into ``tree``."""
    def unpack(deb: Path) -> None:
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], capture_output=True, text=True)
        if proc.returncode != 0:
            if "No space left" in proc.stderr:
                raise BuildError("assemble", f"no space left on the device while unpacking {deb.name}",
                                 "free disk space (or point MVM_HOME elsewhere) and build again")
            raise BuildError("assemble", f"cannot unpack {deb.name}: {proc.stderr.strip()}",
                             "delete it from the cache (~/.mvm/cache/debs) and build again")

    # Unpack in a fixed order so files shipped by two packages resolve the same way every time.
    for deb in sorted(debs, key=lambda p: p.name):
        unpack(deb)


def extract_members(deb: Path, members: tuple[str, ...], tree: Path) -> None:
    """Take only ``members`` (and symlinks among them) out of ``deb``."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            if member.name in members:
                tar.extract(member, tree, filter="tar")
    proc.wait()


def prune(tree: Path) -> None:
    for rel in PRUNE:
        shutil.rmtree(tree / rel, ignore_errors=True)


def link_busybox_applets(tree: Path) -> None:
    """Symlink busybox applets where Debian gave no real program of that name on PATH.

    A real program anywhere on PATH wins (util-linux's setpriv, not busybox's weaker one).
    """
    busybox = tree / "bin" / "busybox"
    listing = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout
    real = {entry.name for d in ("bin", "sbin", "usr/bin", "usr/sbin") if (tree / d).is_dir()
            for entry in (tree / d).iterdir()}
    for rel in sorted(listing.split()):
        link = tree / rel
        if link.name in real or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def write_file(tree: Path, path: str, content: bytes | str, mode: int = 0o644) -> None:
    target = tree / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.is_file():
        target.unlink()
    target.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chmod(target, mode)


def _argv_line(argv: tuple[str, ...]) -> str:
    return "set -- " + " ".join(shlex.quote(a) for a in argv) + "\n"


def write_mvm_config(tree: Path, workload: Workload, artifact_json: str) -> dict[str, int]:
    """/etc/mvm/*, users, /init and the agent. Returns the owners the image must give paths."""
    uids = workload.uids
    entry = workload.entrypoint
    write_file(tree, "/init", guest_file("init"), 0o755)
    write_file(tree, f"{GUEST_DIR}/agent.py", guest_file("agent.py"), 0o644)
    write_file(tree, f"{GUEST_DIR}/mvm/__init__.py", "", 0o644)
    write_file(tree, f"{GUEST_DIR}/mvm/core/__init__.py", "", 0o644)
    write_file(tree, f"{GUEST_DIR}/mvm/core/protocol.py", protocol_source(), 0o644)
    write_file(tree, "/etc/mvm/name", workload.name + "\n")
    write_file(tree, "/etc/mvm/uids", f"AGENT_UID={uids.agent}\nENTRYPOINT_UID={uids.entrypoint}\n")
    write_file(tree, "/etc/mvm/artifact.json", artifact_json)
    lines = f"ENTRYPOINT_KIND={entry.kind.value}\n"
    if entry.kind is EntrypointKind.COMMAND:
        assert entry.command is not None
        lines += _argv_line(entry.command)
    elif entry.kind is EntrypointKind.SHELL:
        assert entry.shell is not None
        lines += _argv_line((entry.shell,))
    write_file(tree, "/etc/mvm/entrypoint", lines)
    for service in entry.services:
        write_file(tree, f"/etc/mvm/services/{service.name}",
                   f"SERVICE={shlex.quote(service.name)}\nRESTART={service.restart.value}\n" + _argv_line(service.command))

    users = [("root", 0, "/root", "/bin/sh"), ("mvm-agent", uids.agent, "/nonexistent", "/sbin/nologin")]
    if uids.entrypoint not in (0, uids.agent):
        users.append(("app", uids.entrypoint, "/home/app", "/bin/sh"))
    write_file(tree, "/etc/passwd", "".join(f"{n}:x:{u}:{u}:{n}:{h}:{s}\n" for n, u, h, s in users))
    write_file(tree, "/etc/group", "".join(f"{n}:x:{u}:\n" for n, u, _, _ in users) + "tty:x:5:\n")
    write_file(tree, "/etc/shadow", "".join(f"{n}:!:1::::::\n" for n, *_ in users), 0o640)
    write_file(tree, "/etc/hosts", f"127.0.0.1 localhost {workload.name}\n::1 localhost\n")
    for directory in ("proc", "sys", "dev", "tmp", "run", "data", "root", "home/app", "var/tmp"):
        (tree / directory).mkdir(parents=True, exist_ok=True)
    os.chmod(tree / "root", 0o700)
    for extra in workload.extra_files:
        write_file(tree, extra.path, extra.content, extra.mode)
    return {"/home/app": uids.entrypoint}


def stage_root(tree: Path, debs: list[Path], setpriv_debs: list[Path], workload: Workload,
               artifact_json: str) -> dict[str, int]:
    tree.mkdir(parents=True)
    unpack_debs(debs, tree)
    for deb in setpriv_debs:
        extract_members(deb, SETPRIV_FILES, tree)
    if not (tree / "usr/bin/setpriv").is_file():
        raise BuildError("assemble", "util-linux did not provide /usr/bin/setpriv")
    if not (tree / "bin/busybox").is_file():
        raise BuildError("assemble", "busybox-static did not provide /bin/busybox")
    prune(tree)
    link_busybox_applets(tree)
    return write_mvm_config(tree, workload, artifact_json)


def stage_initramfs(tree: Path, busybox: Path, kernel: Kernel) -> None:
    """Stage 1: static busybox, the virtio modules in load order, and a tiny /init."""
    for directory in ("bin", "dev", "proc", "newroot", "modules"):
        (tree / directory).mkdir(parents=True)
    shutil.copy2(busybox, tree / "bin" / "busybox")
    for module in MODULES:
        shutil.copy2(kernel.modules / f"{module}.ko", tree / "modules" / f"{module}.ko")
    write_file(tree, "/modules.order", "\n".join(MODULES) + "\n")
    write_file(tree, "/init", guest_file("initramfs-init"), 0o755)
