"""mvm's own guest kernel: Debian's ``linux-source-6.1`` built with a config kept in this repository.

The config (``kernel_configs/<arch>.config``) is a fragment applied on top of ``make
tinyconfig``: every driver the guest uses is built in, so the kernel mounts its root disk
itself and an image made with it needs no initramfs and loads no modules. A build takes
minutes on two cores, so it is cached under ``cache/kernels/`` by the digest of the fragment,
the source package and this recipe; ``mvmctl kernel ls`` lists what is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mvm.core.artifact import LockedPackage
from mvm.core.errors import BuildError
from mvm.core.state import MvmHome

CONFIG_DIR = Path(__file__).with_name("kernel_configs")
SOURCE_PACKAGE = "linux-source-6.1"
RECIPE_VERSION = 1  # bump when the steps below change what comes out
BUILD_TIMEOUT_S = 3 * 3600
# What compiling a kernel needs on the host: a file that shows it is there, and its package.
BUILD_NEEDS = (
    ("gcc", "gcc"), ("make", "make"), ("flex", "flex"), ("bison", "bison"), ("bc", "bc"),
    ("xz", "xz-utils"), ("/usr/include/gelf.h", "libelf-dev"),  # (objtool reads ELF with libelf)
)
ARCHES = ("x86_64", "aarch64")
BUILT_ARCHES = ("x86_64",)  # no aarch64 config yet: aarch64 guests boot Debian's arm64 cloud kernel
_CONFIG_LINE = re.compile(r"^(CONFIG_[A-Z0-9_]+)=(.*)$")
_UNSET_LINE = re.compile(r"^# (CONFIG_[A-Z0-9_]+) is not set$")

Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class BuiltKernel:
    """A kernel of ours in the cache: ``vmlinux``, its ``config`` and ``build.json``."""

    directory: Path
    release: str
    arch: str
    config_digest: str
    source: str  # the linux-source package's file name
    seconds: float

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def name(self) -> str:
        return self.directory.name

    @classmethod
    def load(cls, directory: Path) -> BuiltKernel | None:
        """The cached kernel in ``directory``, or None when it is not a complete one."""
        try:
            facts = json.loads((directory / "build.json").read_text())
            kernel = cls(directory, str(facts["release"]), str(facts["arch"]), str(facts["configDigest"]),
                         str(facts["source"]), float(facts["seconds"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return kernel if kernel.vmlinux.is_file() else None


def config_fragment(arch: str) -> Path:
    if arch not in ARCHES:
        raise BuildError("kernel", f"no kernel config for architecture {arch!r}", f"use one of {', '.join(ARCHES)}")
    if arch not in BUILT_ARCHES:
        raise BuildError("kernel", f"mvm's own kernel has no {arch} configuration yet ({arch} guests boot "
                         "Debian's cloud kernel)", f"build for {', '.join(BUILT_ARCHES)}")
    return CONFIG_DIR / f"{arch}.config"


def edits_file(arch: str) -> Path:
    return CONFIG_DIR / f"{arch}.edits.toml"


def config_digest(arch: str) -> str:
    """What names a build of ours before its source is known: the fragment, the source edits
    and the recipe."""
    edits = edits_file(arch).read_bytes() if edits_file(arch).is_file() else b""
    material = (config_fragment(arch).read_bytes() + b"\nedits\n" + edits
                + f"\nrecipe {RECIPE_VERSION} {arch}\n".encode())
    return hashlib.sha256(material).hexdigest()


@dataclass(frozen=True)
class SourceEdit:
    """One exact change to the source before it is configured (kernel_configs/<arch>.edits.toml)."""

    path: str
    old: str
    new: str
    why: str


def source_edits(arch: str) -> list[SourceEdit]:
    import tomllib

    file = edits_file(arch)
    if not file.is_file():
        return []
    try:
        entries = tomllib.loads(file.read_text())["edit"]
        return [SourceEdit(str(e["path"]), str(e["old"]), str(e["new"]), str(e["why"])) for e in entries]
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as err:
        raise BuildError("kernel", f"{file.name} is malformed ({err})", "restore it from mvm's sources") from None


def apply_edits(tree: Path, edits: list[SourceEdit]) -> None:
    """Each edit's ``old`` text must be in its file exactly once: a source package whose code
    moved fails the build, naming the edit, rather than being changed somewhere unintended."""
    for edit in edits:
        target = tree / edit.path
        try:
            text = target.read_text()
        except OSError as err:
            raise BuildError("kernel", f"source edit of {edit.path}: cannot read it ({err.strerror})",
                             "the source package changed: look at the edit again") from None
        found = text.count(edit.old)
        if found != 1:
            raise BuildError("kernel", f"source edit of {edit.path}: its text is there {found} times, not once",
                             "the source package changed: look at the edit in kernel_configs/ again")
        target.write_text(text.replace(edit.old, edit.new))


def cached_kernels(home: MvmHome) -> list[BuiltKernel]:
    if not home.kernels.is_dir():
        return []
    found = (BuiltKernel.load(d) for d in sorted(home.kernels.iterdir()) if d.name.startswith("mvm-"))
    return [k for k in found if k is not None]


def cached_kernel(home: MvmHome, arch: str = "x86_64") -> BuiltKernel | None:
    """Ours for the config in this repository, if it was built already."""
    digest = config_digest(arch)
    return next((k for k in cached_kernels(home) if k.arch == arch and k.config_digest == digest), None)


def default_kernel(home: MvmHome, arch: str = "x86_64") -> str:
    """What ``kernel = "auto"`` (the default) builds with: ours once this home has it built for
    ``arch`` (`mvmctl kernel build`, which scripts/setup.sh runs), else Debian's cloud kernel.

    Never a compile on the way to a first boot: that takes minutes, and needs a compiler.
    """
    return "mvm" if arch in BUILT_ARCHES and cached_kernel(home, arch) is not None else "debian"


def missing_build_needs() -> list[str]:
    """Packages to install before a kernel can be compiled here."""
    missing = []
    for need, package in BUILD_NEEDS:
        there = Path(need).exists() if need.startswith("/") else shutil.which(need) is not None
        if not there and package not in missing:
            missing.append(package)
    return missing


def ensure_kernel(home: MvmHome, arch: str = "x86_64", progress: Progress | None = None) -> BuiltKernel:
    """Ours from the cache, built first if it is not there (minutes: progress says so)."""
    from filelock import FileLock

    say = progress or (lambda phase, detail: None)
    cached = cached_kernel(home, arch)
    if cached is not None:
        return cached
    missing = missing_build_needs()
    if missing:
        raise BuildError("kernel", f"building a kernel needs {', '.join(missing)}",
                         f"install them: apt-get install {' '.join(missing)}")
    home.kernels.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home.kernels / f".mvm-{arch}.lock")):
        cached = cached_kernel(home, arch)  # another build finished while this one waited
        if cached is not None:
            return cached
        return _build(home, arch, say)


def _build(home: MvmHome, arch: str, say: Progress) -> BuiltKernel:
    from mvm.build.packages import DebCache, pin_packages

    say("kernel", f"resolving {SOURCE_PACKAGE}")
    deb = pin_packages([SOURCE_PACKAGE], home)[SOURCE_PACKAGE]
    debs = DebCache(home.debs)
    say("kernel", f"downloading {deb.filename} ({deb.size >> 20} MiB)")
    debs.ensure([deb])
    with home.scratch("kernel-build") as scratch_name:
        scratch = Path(scratch_name)
        try:
            return _build_in(scratch, home, arch, debs.path(deb), deb, say)
        except BuildError as err:  # the scratch goes; its log is kept for the one who reads the error
            kept = home.kernels / f"mvm-{arch}-failed-build.log"
            if (scratch / "make.log").is_file():
                shutil.copyfile(scratch / "make.log", kept)
            err.fix = f"{err.fix + '; ' if err.fix else ''}the build log is {kept}"
            raise


def _build_in(scratch: Path, home: MvmHome, arch: str, source: Path, deb: LockedPackage,
              say: Progress) -> BuiltKernel:
    digest = config_digest(arch)
    started = time.monotonic()
    log = scratch / "make.log"
    say("kernel", "unpacking the source")
    tree = _unpack_source(source, scratch)
    edits = source_edits(arch)
    apply_edits(tree, edits)
    say("kernel", f"configuring (tinyconfig + kernel_configs/{arch}.config)")
    _configure(tree, config_fragment(arch), log)
    say("kernel", "compiling vmlinux (several minutes on two cores)")
    _make(tree, ["vmlinux"], log, say)
    release = _run(["make", "-s", "kernelrelease"], tree, log).strip()
    out = scratch / "out"
    out.mkdir()
    shutil.copyfile(tree / "vmlinux", out / "vmlinux")
    shutil.copyfile(tree / ".config", out / "config")
    (out / "build.json").write_text(json.dumps({
        "release": release, "arch": arch, "configDigest": digest, "source": deb.filename,
        "sourceSha256": deb.sha256, "seconds": round(time.monotonic() - started, 1), "recipe": RECIPE_VERSION,
        "sourceEdits": [edit.path for edit in edits],
    }, indent=2, sort_keys=True) + "\n")
    target = home.kernels / f"mvm-{arch}-{digest[:12]}"
    shutil.rmtree(target, ignore_errors=True)  # an incomplete one (no build.json) from a killed run
    os.rename(out, target)
    kernel = BuiltKernel.load(target)
    assert kernel is not None
    return kernel


def _unpack_source(deb: Path, scratch: Path) -> Path:
    _run(["dpkg-deb", "-x", str(deb), str(scratch / "deb")], scratch, scratch / "make.log")
    tarballs = sorted((scratch / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
    if not tarballs:
        raise BuildError("kernel", f"{deb.name} holds no linux-source tarball", "delete it from cache/debs and retry")
    _run(["tar", "-xf", str(tarballs[0]), "-C", str(scratch)], scratch, scratch / "make.log")
    shutil.rmtree(scratch / "deb")
    tree = scratch / tarballs[0].name.split(".tar")[0]
    if not (tree / "Makefile").is_file():
        raise BuildError("kernel", f"{tarballs[0].name} did not unpack to {tree.name}/", "delete it and retry")
    return tree


def _configure(tree: Path, fragment: Path, log: Path) -> None:
    _run(["make", "-s", "tinyconfig"], tree, log)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)], tree, log)
    _run(["make", "-s", "olddefconfig"], tree, log)
    unmet = unmet_settings(fragment.read_text(), (tree / ".config").read_text())
    if unmet:
        raise BuildError("kernel", f"the kernel's config did not take {', '.join(unmet[:5])} from {fragment.name}",
                         "a setting depends on one the fragment does not enable: add that one too")


def unmet_settings(fragment: str, config: str) -> list[str]:
    """Settings the fragment asks for that the final .config does not have (Kconfig drops a
    setting whose dependencies are off, silently)."""
    have: dict[str, str] = {}
    for line in config.splitlines():
        if match := _CONFIG_LINE.match(line):
            have[match[1]] = match[2]
    unmet = []
    for line in fragment.splitlines():
        if match := _CONFIG_LINE.match(line.strip()):
            if have.get(match[1]) != match[2]:
                unmet.append(f"{match[1]}={match[2]}")
        elif (match := _UNSET_LINE.match(line.strip())) and have.get(match[1], "n") not in ("n", ""):
            unmet.append(f"{match[1]} off")
    return unmet


def _build_env() -> dict[str, str]:
    """Fixed build user, host and time: the same source and config give the same banner."""
    return {**os.environ, "LC_ALL": "C", "KBUILD_BUILD_USER": "mvm", "KBUILD_BUILD_HOST": "mvm",
            "KBUILD_BUILD_TIMESTAMP": "1970-01-01"}


def _run(argv: list[str], cwd: Path, log: Path) -> str:
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=_build_env(),
                          timeout=BUILD_TIMEOUT_S)
    with log.open("a") as out:
        out.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise BuildError("kernel", f"{' '.join(argv[:3])} failed: {_last_error(proc.stderr + proc.stdout)}",
                         "install the packages it names (see `mvmctl kernel build --help`) and retry")
    return proc.stdout


def _make(tree: Path, targets: list[str], log: Path, say: Progress) -> None:
    """``make -jN`` with a line of progress per hundred files compiled."""
    argv = ["make", f"-j{(os.cpu_count() or 1) + 1}", *targets]
    compiled = 0
    with log.open("a") as out:
        proc = subprocess.Popen(argv, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, env=_build_env(), preexec_fn=_end_with_parent)
        assert proc.stdout is not None
        tail: list[str] = []
        try:
            for line in proc.stdout:
                out.write(line)
                tail = (tail + [line])[-20:]
                if line.lstrip().startswith("CC "):
                    compiled += 1
                    if compiled % 100 == 0:
                        say("kernel", f"compiling vmlinux: {compiled} files")
            code = proc.wait(timeout=BUILD_TIMEOUT_S)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if code != 0:
        raise BuildError("kernel", f"make vmlinux failed: {_last_error(''.join(tail))}")


def _end_with_parent() -> None:
    """make gets SIGTERM (and stops its compilers) if mvmctl dies, even by SIGKILL."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _last_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:200]
