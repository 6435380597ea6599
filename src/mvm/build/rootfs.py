"""Stage the guest's root tree and its initramfs from .debs and the workload.

The root tree is plain files on the host (no chroot, no loop mount, no maintainer scripts):
each .deb is unpacked with ``dpkg-deb -x``, docs and locales are pruned, busybox's applets
are linked where Debian left a gap, and mvm's own pieces are added: ``/init``, the agent,
``/etc/mvm/*`` (the workload's settings as shell-readable data), users and extra files.
Last, the guest's Python is compiled to bytecode by the guest's own interpreter (see
``compile_python``), so no python3 start in the guest compiles the stdlib under emulation.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

from mvm.build.kernel import MODULES, VOLUME_MODULES, Kernel
from mvm.core.arch import DEFAULT_ARCH, guest_arch, is_native
from mvm.core.errors import BuildError
from mvm.core.workload import EntrypointKind, Workload
from mvm.guest import AGENT_FILES, guest_file, protocol_source

UNPACK_TIMEOUT_S = 600  # one package unpacked (and a third of the bytecode compile)

PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
         "usr/share/bug", "usr/share/bash-completion", "usr/share/common-licenses")


def setpriv_files(triplet: str) -> tuple[str, ...]:
    """setpriv and libcap-ng from their .debs, in the guest architecture's library directory."""
    return ("./usr/bin/setpriv", f"./lib/{triplet}/libcap-ng.so.0", f"./lib/{triplet}/libcap-ng.so.0.0.0",
            f"./usr/lib/{triplet}/libcap-ng.so.0", f"./usr/lib/{triplet}/libcap-ng.so.0.0.0")


SETPRIV_FILES = setpriv_files("x86_64-linux-gnu")
GUEST_DIR = "/usr/lib/mvm"
# Test suites are never imported in a guest: not worth their bytecode.
PYC_SKIP_DIRS = frozenset({"__pycache__", "test", "tests", "idle_test"})
# Runs in the guest's interpreter: compile each (source, path the importer sees, guest path)
# to the importer's cache path as an unchecked-hash pyc (no mtime in it, never stat-compared).
_COMPILE_DRIVER = """
import importlib.util, json, py_compile, sys
failed = []
for source, seen, guest in json.load(sys.stdin):
    try:
        py_compile.compile(source, cfile=importlib.util.cache_from_source(seen), dfile=guest, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError:
        failed.append(guest)
json.dump(failed, sys.stdout)
"""


def run_group(argv: list[str]) -> subprocess.CompletedProcess:
    """Run argv in its own process group, and take the whole group down if we are interrupted.

    dpkg-deb -x hands the work to a tar child: killing dpkg-deb alone would leave tar writing
    into the staging tree while the build removes it.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=UNPACK_TIMEOUT_S)
    except BaseException as err:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it had already finished
        proc.wait()
        if isinstance(err, subprocess.TimeoutExpired):
            raise BuildError("assemble", f"{argv[0]} did not finish within {UNPACK_TIMEOUT_S} s") from None
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def unpack_debs(debs: list[Path], tree: Path) -> None:
    """``dpkg-deb -x`` every package into ``tree``."""
    def unpack(deb: Path) -> None:
        proc = run_group(["dpkg-deb", "-x", str(deb), str(tree)])
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


def link_busybox_applets(tree: Path, native: bool = True) -> None:
    """Symlink busybox applets where Debian gave no real program of that name on PATH.

    A real program anywhere on PATH wins (util-linux's setpriv, not busybox's weaker one).
    ``native``: the guest's busybox runs on this host; otherwise (an aarch64 guest here) the
    applet list comes from the host's busybox-static, built from the same Debian source.
    """
    busybox = str(tree / "bin" / "busybox")
    if not native:
        host_busybox = shutil.which("busybox")
        if host_busybox is None:
            raise BuildError("assemble",
                             "busybox is not installed on the host (its applet list names the guest's links)",
                             "run `mvmctl bootstrap` to install busybox-static")
        busybox = host_busybox
    listing = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout
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


def write_agent(tree: Path) -> None:
    """The agent package and the one module of mvm it imports, in GUEST_DIR: /init runs
    ``python3 -m agent`` there, so ``agent`` and ``mvm.core.protocol`` both import."""
    for name in AGENT_FILES:
        write_file(tree, f"{GUEST_DIR}/{name}", guest_file(name), 0o644)
    write_file(tree, f"{GUEST_DIR}/mvm/__init__.py", "", 0o644)
    write_file(tree, f"{GUEST_DIR}/mvm/core/__init__.py", "", 0o644)
    write_file(tree, f"{GUEST_DIR}/mvm/core/protocol.py", protocol_source(), 0o644)


def write_mvm_config(tree: Path, workload: Workload, artifact_json: str) -> dict[str, int]:
    """/etc/mvm/*, users, /init and the agent. Returns the owners the image must give paths."""
    uids = workload.uids
    entry = workload.entrypoint
    write_file(tree, "/init", guest_file("init"), 0o755)
    write_agent(tree)
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


def in_tree(tree: Path, guest_path: str) -> Path | None:
    """Where ``guest_path`` is inside ``tree``, following symlinks as the guest would (an absolute
    target is relative to the tree, never the host's /), or None if it does not exist there."""
    parts = [p for p in guest_path.split("/") if p]
    current, hops = tree, 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            current = current.parent if current != tree else tree
            continue
        if name == ".":
            continue
        candidate = current / name
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = tree
            parts = [p for p in target.split("/") if p] + parts
            continue
        current = candidate
    return current if current.exists() else None


def _python_sources(tree: Path, roots: list[str]) -> list[tuple[str, str, str]]:
    """(source on the host, path as the guest's importer finds it, guest path), sorted."""
    jobs = []
    for guest_root in roots:
        top = tree / guest_root.lstrip("/")
        if top.is_symlink() or not top.is_dir():
            continue
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in PYC_SKIP_DIRS)
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                if name == "turtle.py" and not (Path(root) / "tkinter").is_dir():
                    continue  # needs tkinter, which Debian ships apart (python3-tk)
                seen = Path(root, name)
                guest = "/" + seen.relative_to(tree).as_posix()
                source = in_tree(tree, guest)
                if source is not None and source.is_file():
                    jobs.append((str(source), str(seen), guest))
    return jobs


def _guest_magic(tree: Path, version: str) -> str | None:
    """The guest interpreter's bytecode magic (hex), read from its importlib source."""
    import re

    source = in_tree(tree, f"/usr/lib/{version}/importlib/_bootstrap_external.py")
    if source is None:
        return None
    match = re.search(r"^MAGIC_NUMBER = \((\d+)\)\.to_bytes\(2, 'little'\) \+ b'\\r\\n'", source.read_text(), re.M)
    return (int(match.group(1)).to_bytes(2, "little") + b"\r\n").hex() if match else None


def _host_compiler(tree: Path, version: str) -> list[str]:
    """argv of a host interpreter whose bytecode the guest's loads (same magic number): the
    guest's own cannot run on a host of another architecture."""
    import sys

    wanted = _guest_magic(tree, version)
    probe = "import importlib.util, sys; sys.stdout.write(importlib.util.MAGIC_NUMBER.hex())"
    for candidate in dict.fromkeys(filter(None, (shutil.which(version), sys.executable))):
        try:
            magic = subprocess.run([candidate, "-I", "-c", probe], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if wanted is not None and magic == wanted:
            return [candidate, "-I", "-S", "-B"]
    raise BuildError("assemble", f"no {version} on this host to compile the guest's bytecode with (the guest's "
                     "own interpreter is for another architecture)", f"install {version} on the host (apt-get install "
                     f"{version}-minimal)")


def compile_python(tree: Path, arch: str = DEFAULT_ARCH) -> int:
    """Precompile the guest's Python (stdlib, dist-packages, /usr/lib/mvm) into __pycache__.

    Debian's .debs ship no .pyc (its maintainer scripts make them, and we run none), so without
    this every python3 start in the guest compiles what it imports, which costs seconds under
    TCG. The guest's own interpreter does the work, run on the host through the tree's dynamic
    loader and libraries, so magic number and bytecode are exactly the guest's. The pycs are
    unchecked-hash (no mtime: reproducible; the guest never compares them to the source) and
    name guest paths. Returns the number written; 0 if the tree has no python3.
    """
    python = in_tree(tree, "/usr/bin/python3")
    if python is None:
        return 0
    version = python.name.removeprefix("python")  # python3 -> python3.11
    jobs = _python_sources(tree, [f"/usr/lib/python{version}", "/usr/lib/python3/dist-packages", GUEST_DIR])
    if is_native(arch):
        loader = in_tree(tree, guest_arch(arch).loader)
        if loader is None:
            return 0
        triplet = guest_arch(arch).triplet
        libs = [p for p in (in_tree(tree, f"/lib/{triplet}"), in_tree(tree, f"/usr/lib/{triplet}")) if p]
        # No site (Debian's sitecustomize is an absolute symlink: it would run the host's), no
        # bytecode of its own, no cwd on sys.path, nothing from the host's environment.
        env = {"PYTHONHOME": str(tree / "usr"), "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
        argv = [str(loader), "--inhibit-cache", "--library-path", ":".join(map(str, libs)), str(python),
                "-S", "-s", "-B", "-P", "-c", _COMPILE_DRIVER]
    else:
        env = {"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
        argv = [*_host_compiler(tree, f"python{version}"), "-c", _COMPILE_DRIVER]
    try:
        proc = subprocess.run(argv, input=json.dumps(jobs), capture_output=True, text=True, env=env,
                              cwd=tree, umask=0o022, check=False, timeout=UNPACK_TIMEOUT_S * 3)
    except subprocess.TimeoutExpired:
        raise BuildError("assemble", f"compiling the guest's Python did not finish within {UNPACK_TIMEOUT_S * 3} s") \
            from None
    except OSError as err:
        raise BuildError("assemble", f"cannot run the guest's python{version} to compile its bytecode: {err}") from None
    if proc.returncode != 0:
        if "No space left" in proc.stderr:
            raise BuildError("assemble", "no space left on the device while compiling the guest's Python",
                             "free disk space (or point MVM_HOME elsewhere) and build again")
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError("assemble", f"the guest's python{version} could not compile its bytecode: {reason}")
    failed = json.loads(proc.stdout)  # a package's own file that does not compile stays source
    ours = [path for path in failed if path.startswith(GUEST_DIR + "/")]
    if ours:
        raise BuildError("assemble", f"{ours[0]} does not compile with the guest's python{version}")
    return len(jobs) - len(failed)


def stage_root(tree: Path, debs: list[Path], setpriv_debs: list[Path], workload: Workload,
               artifact_json: str) -> dict[str, int]:
    tree.mkdir(parents=True)
    unpack_debs(debs, tree)
    for deb in setpriv_debs:
        extract_members(deb, setpriv_files(guest_arch(workload.arch).triplet), tree)
    if not (tree / "usr/bin/setpriv").is_file():
        raise BuildError("assemble", "util-linux did not provide /usr/bin/setpriv")
    if not (tree / "bin/busybox").is_file():
        raise BuildError("assemble", "busybox-static did not provide /bin/busybox")
    prune(tree)
    link_busybox_applets(tree, native=is_native(workload.arch))
    return write_mvm_config(tree, workload, artifact_json)


def stage_initramfs(tree: Path, busybox: Path, kernel: Kernel) -> None:
    """Stage 1: static busybox, the virtio modules in load order, and a tiny /init."""
    for directory in ("bin", "dev", "proc", "newroot", "modules"):
        (tree / directory).mkdir(parents=True)
    shutil.copy2(busybox, tree / "bin" / "busybox")
    for module in MODULES + VOLUME_MODULES:
        shutil.copy2(kernel.modules / f"{module}.ko", tree / "modules" / f"{module}.ko")
    write_file(tree, "/modules.order", "\n".join(MODULES) + "\n")
    write_file(tree, "/modules.volumes", "\n".join(VOLUME_MODULES) + "\n")
    write_file(tree, "/init", guest_file("initramfs-init"), 0o755)
