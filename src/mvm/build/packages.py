"""Debian packages for the guest: resolve, lock, download, verify.

Resolution asks the host's own apt, pretending nothing is installed (an empty dpkg status
file) so it returns the whole dependency closure, and ``--print-uris`` so it only reports.
Nothing is installed on the host. The result is pinned in ``mvm.lock`` beside mvm.toml
(exact versions and sha256); a build with a lock downloads exactly those files and refuses
any whose hash differs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import tomllib
import urllib.parse
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ValidationError

from mvm.build import apt_arch
from mvm.core.arch import DEFAULT_ARCH, GuestArch, guest_arch
from mvm.core.artifact import LockedPackage
from mvm.core.digest import sha256_file
from mvm.core.errors import BuildError
from mvm.core.state import MvmHome

# Every image carries these: busybox for /init, Python for the agent (json and friends
# live in libpython3.11-stdlib, not python3-minimal).
BASE_PACKAGES = ("busybox-static", "python3-minimal", "libpython3.11-stdlib")
# Only setpriv and its one library are taken from these: busybox's setpriv lacks
# --reuid/--regid/--clear-groups.
SETPRIV_PACKAGES = ("util-linux", "libcap-ng0")
LOCK_VERSION = 1

# 'URI' FILE SIZE [HASH]: apt prints no hash at all for some archives (e.g. debian-security).
_URI_LINE = re.compile(r"^'(?P<uri>[^']+)' (?P<file>\S+\.deb) (?P<size>\d+)(?: \S+)?\s*$")


APT_TIMEOUT_S = 600  # resolving; every host command has a bound, so a wedged apt is an error, not a hang
DOWNLOAD_TIMEOUT_S = 1800

class PackageLock(BaseModel):
    """mvm.lock: what one set of requested packages resolved to."""

    version: int = LOCK_VERSION
    requested: list[str]
    packages: list[LockedPackage]
    setpriv: list[LockedPackage]
    kernel: LockedPackage
    arch: str = DEFAULT_ARCH  # the guest architecture (core/arch.py) every package is for

    def all_debs(self) -> list[LockedPackage]:
        return [*self.packages, *self.setpriv, self.kernel]

    def dump(self) -> str:
        header = "# Written by `mvmctl build`: the exact Debian packages this image is made of.\n" \
                 "# Commit it for reproducible builds; delete it to pick up newer versions.\n"
        return header + tomli_w.dumps(self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: Path) -> "PackageLock":
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except (tomllib.TOMLDecodeError, ValidationError) as err:
            first = str(err).splitlines()[0]
            raise BuildError("resolve", f"{path} is not a valid lock file ({first})",
                             f"delete {path} and build again") from None


def requested_packages(user_packages: tuple[str, ...]) -> list[str]:
    return sorted(set(BASE_PACKAGES) | set(user_packages))


def _apt_options(work: Path, state: list[str]) -> list[str]:
    """apt with a private, empty view of 'installed', so it resolves the full closure;
    ``state``: apt_arch.state_options for the guest's architecture."""
    status = work / "status"
    status.touch()
    (work / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    return [
        "-q", *state,
        "-o", f"Dir::State::status={status}",
        "-o", f"Dir::Cache::archives={work / 'archives'}",
        "-o", "APT::Install-Recommends=false",
        "-o", "APT::Install-Suggests=false",
        "-o", "Debug::NoLocking=1",
        "-o", "APT::Sandbox::User=root",
    ]


def _run_apt(args: list[str], step: str, cwd: str | None = None) -> str:
    if shutil.which(args[0]) is None:
        raise BuildError(step, f"{args[0]} is not available; the built-in builder needs a Debian or Ubuntu host",
                         "run `mvmctl bootstrap` on a Debian/Ubuntu machine")
    try:
        proc = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=cwd,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
                              timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BuildError(step, f"{args[0]} did not finish within {APT_TIMEOUT_S} s",
                         "check the package sources (`apt-get update`) and the network") from None
    if proc.returncode != 0:
        raise BuildError(step, _apt_reason(proc.stderr or proc.stdout), _apt_fix(proc.stderr or proc.stdout))
    return proc.stdout


def _apt_reason(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("E: "):
            return "apt: " + line[3:].strip()
    return "apt failed: " + (output.strip().splitlines() or ["no output"])[-1]


def _apt_fix(output: str) -> str:
    if "Unable to locate package" in output or "has no installation candidate" in output:
        return "check the name in `packages` (apt-cache search NAME), or run `apt-get update`"
    if "Version" in output and "was not found" in output:
        return "that pinned version has left the archive: delete mvm.lock and build again"
    return "run `apt-get update` and try again"


def _parse_uris(output: str) -> list[tuple[str, str, str, str, int]]:
    """(name, version, arch, filename, size) for every .deb apt would fetch."""
    found = []
    for line in output.splitlines():
        match = _URI_LINE.match(line.strip())
        if match:
            filename = match["file"]
            name, quoted_version, arch = filename[: -len(".deb")].split("_")
            found.append((name, urllib.parse.unquote(quoted_version), arch, filename, int(match["size"])))
    return found


def _pin(found: list[tuple[str, str, str, str, int]], state: list[str]) -> list[LockedPackage]:
    """Add each package's SHA256 from the archive index (apt's URI list may give only MD5)."""
    specs = [f"{n}:{a}={v}" if a != "all" else f"{n}={v}" for n, v, a, _, _ in found]
    records: dict[tuple[str, str, str], str] = {}
    for block in _run_apt(["apt-cache", *state, "show", *specs], "resolve").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line[0].isspace())
        key = (fields.get("Package", ""), fields.get("Version", ""), fields.get("Architecture", ""))
        if "SHA256" in fields:
            records.setdefault(key, fields["SHA256"])
    pinned = []
    for name, version, arch, filename, size in found:
        digest = records.get((name, version, arch))
        if digest is None:
            raise BuildError("resolve", f"the archive index has no SHA256 for {name} {version}",
                             "run `apt-get update` and try again")
        pinned.append(LockedPackage(name=name, version=version, arch=arch, filename=filename,
                                    sha256=digest, size=size))
    return sorted(pinned, key=lambda d: d.name)


def resolve(user_packages: tuple[str, ...], home: MvmHome, arch: str = DEFAULT_ARCH) -> PackageLock:
    """Resolve the guest's closure, setpriv's two packages and the kernel for ``arch``, without
    installing (apt's scratch state in ``home``'s tmp/, not the system /tmp)."""
    requested = requested_packages(user_packages)
    target = guest_arch(arch)
    apt_arch.ensure_lists(target, home)
    state = apt_arch.state_options(target, home)
    with home.scratch("apt") as tmp:
        opts = _apt_options(Path(tmp), state)
        closure = _pin(_parse_uris(_run_apt(
            ["apt-get", *opts, "--print-uris", "-y", "install", *requested], "resolve")), state)
        if not closure:
            raise BuildError("resolve", "apt resolved no packages", "run `apt-get update` and try again")
    kernel_name = _kernel_package_name(target, state)
    by_name = pin_packages([*SETPRIV_PACKAGES, kernel_name], home, arch)
    return PackageLock(requested=requested, packages=closure, arch=target.name,
                       setpriv=[by_name[n] for n in SETPRIV_PACKAGES], kernel=by_name[kernel_name])


def pin_packages(names: list[str], home: MvmHome, arch: str = DEFAULT_ARCH) -> dict[str, LockedPackage]:
    """These packages alone (no dependencies), pinned to the archive's current version."""
    target = guest_arch(arch)
    apt_arch.ensure_lists(target, home)
    state = apt_arch.state_options(target, home)
    with home.scratch("apt") as tmp:
        opts = _apt_options(Path(tmp), state)
        found = _pin(_parse_uris(_run_apt(["apt-get", *opts, "--print-uris", "download", *names], "resolve", cwd=tmp)),
                     state)
    by_name = {d.name: d for d in found}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise BuildError("resolve", f"apt found no {', '.join(missing)}", "run `apt-get update` and try again")
    return by_name


def _kernel_package_name(arch: GuestArch, state: list[str]) -> str:
    out = _run_apt(["apt-cache", *state, "depends", arch.kernel_metapackage], "resolve")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split(":", 1)[1].strip()
    raise BuildError("resolve", f"{arch.kernel_metapackage} names no kernel package",
                     "run `apt-get update` on a Debian host with the main archive configured")


class DebCache:
    """Downloaded .debs shared by every build, named by Debian's own file names."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, deb: LockedPackage) -> Path:
        return self.directory / deb.filename

    def missing(self, debs: list[LockedPackage]) -> list[LockedPackage]:
        return [d for d in debs if not self._valid(d)]

    def _valid(self, deb: LockedPackage) -> bool:
        path = self.path(deb)
        return path.is_file() and path.stat().st_size == deb.size

    def ensure(self, debs: list[LockedPackage], apt_state: list[str] | None = None) -> None:
        """Every deb present and matching the lock; each file is hashed exactly once.
        ``apt_state``: apt_arch.state_options for a guest architecture not the host's."""
        todo = self.missing(debs)
        self._verify_cached([d for d in debs if d not in todo])
        self._download(todo, apt_state or [])

    def _download(self, todo: list[LockedPackage], apt_state: list[str]) -> None:
        """Fetch ``todo``, check each sha256, and only then move it into place."""
        if not todo:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".download-{os.getpid()}-", dir=self.directory) as tmp:
            specs = [f"{d.name}:{d.arch}={d.version}" if d.arch != "all" else f"{d.name}={d.version}" for d in todo]
            try:
                proc = subprocess.run(
                    ["apt-get", "-q", *apt_state, "-o", "APT::Sandbox::User=root", "download", *specs],
                    cwd=tmp, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                    env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
                    timeout=DOWNLOAD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise BuildError("download", f"apt-get download did not finish within {DOWNLOAD_TIMEOUT_S} s",
                                 "check the network, then build again (finished downloads are kept)") from None
            if proc.returncode != 0:
                raise BuildError("download", _apt_reason(proc.stderr), _apt_fix(proc.stderr))
            for deb in todo:
                got = Path(tmp) / deb.filename
                if not got.is_file():
                    raise BuildError("download", f"apt did not deliver {deb.filename}",
                                     "run `apt-get update`, or delete mvm.lock to re-resolve")
                actual = sha256_file(got)
                if actual != deb.sha256:
                    raise BuildError("download", f"{deb.filename} has sha256 {actual[:16]}..., the lock says "
                                     f"{deb.sha256[:16]}...", "delete mvm.lock to re-resolve if the archive changed")
                os.replace(got, self.path(deb))

    def _verify_cached(self, debs: list[LockedPackage]) -> None:
        """Check files already in the cache against the lock before they go into an image."""
        for deb in debs:
            actual = sha256_file(self.path(deb))
            if actual != deb.sha256:
                self.path(deb).unlink(missing_ok=True)
                raise BuildError("download", f"cached {deb.filename} does not match its sha256 (removed it)",
                                 "build again to download it afresh")
