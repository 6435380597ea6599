"""Shared fixtures. Integration tests build and boot for real; they share one MVM_HOME per
session so Debian packages and the kernel are downloaded once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def default_kernel(home: Path) -> str:
    """What an mvm.toml without `kernel` boots in ``home`` (ours once it is built there, else
    Debian's): tests of the boot path follow it (Debian's kernel has an initramfs and says
    "cloud-amd64"; ours has neither)."""
    from mvm.build import kernel_source
    from mvm.core.state import MvmHome

    return kernel_source.default_kernel(MvmHome(home))


def initramfs_phases(home: Path) -> tuple[str, ...]:
    """The boot phases only an image with an initramfs (Debian's kernel's) has."""
    return ("initramfs", "root-mounted") if default_kernel(home) == "debian" else ()


@dataclass
class Mvmctl:
    """Runs the real CLI in a subprocess against one MVM_HOME (and the tests' dockerd)."""

    home: Path
    docker_host: str | None = None
    hypervisor: str | None = None  # added to `up` and `run`

    def with_backend(self, hypervisor: str) -> Mvmctl:
        return Mvmctl(self.home, self.docker_host, hypervisor)

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "MVM_HOME": str(self.home)}
        if self.docker_host:
            env["DOCKER_HOST"] = self.docker_host
        return env

    def argv(self, *args: str) -> list[str]:
        if self.hypervisor and args and args[0] in ("up", "run"):
            args = (args[0], "--hypervisor", self.hypervisor, *args[1:])
        return [sys.executable, "-m", "mvm.cli.main", *args]

    def __call__(self, *args: str, input: str | None = None, timeout: float = 300,
                 check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True,
                              input=input, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"mvmctl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc


def default_signals() -> None:
    """preexec_fn for a child a test will signal: a background job (`scripts/test.sh &`)
    inherits SIGINT and SIGQUIT as ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


_HOME_KEY = pytest.StashKey[Path]()
_DOCKER_KEY = pytest.StashKey[str]()


@pytest.fixture(scope="module", autouse=True)
def sweep_leaked_vms(request: pytest.FixtureRequest):
    """After each module, VMs its tests left running are reported and removed, so one test's
    leak cannot fail another module's tests (or hold their names)."""
    yield
    stash = request.session.config.stash
    root = stash.get(_HOME_KEY, None)
    if root is None or not (root / "vms").is_dir():
        return
    ctl = Mvmctl(root, stash.get(_DOCKER_KEY, None))
    listing = ctl("ls", "--json")
    try:
        vms = json.loads(listing.stdout) if listing.returncode == 0 else []
    except ValueError:
        vms = []
    leaked = [vm["name"] for vm in vms if vm.get("state") in ("starting", "running", "paused")]
    for name in leaked:
        ctl("down", name, "--force", timeout=120)
    if leaked:
        print(f"\n{request.module.__name__} left VMs running: {', '.join(leaked)} (removed)", file=sys.stderr)


@pytest.fixture(scope="session")
def mvm_home(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    home = tmp_path_factory.mktemp("mvm-home")
    request.session.config.stash[_HOME_KEY] = home
    # Compiling mvm's own kernel takes minutes: a developer may seed the cache with kernels an
    # earlier run built (MVM_TEST_KERNEL_CACHE=~/.mvm/cache/kernels). CI starts empty and builds.
    seed = os.environ.get("MVM_TEST_KERNEL_CACHE")
    if seed:
        for built in Path(seed).glob("mvm-*"):
            if (built / "build.json").is_file():
                shutil.copytree(built, home / "cache" / "kernels" / built.name)
    _build_own_kernel(home)
    return home


def _build_own_kernel(home: Path) -> None:
    """Ours is the default once built (`kernel = "auto"`), as after scripts/setup.sh: build it
    first, so the whole suite runs on the kernel users get. MVM_TEST_KERNEL=debian keeps
    Debian's as the default instead (tests that need either kernel name it)."""
    from mvm.build import kernel_source

    if os.environ.get("MVM_TEST_KERNEL", "auto") == "debian" or kernel_source.missing_build_needs():
        return
    proc = subprocess.run([sys.executable, "-m", "mvm.cli.main", "kernel", "build", "--json"],
                          env={**os.environ, "MVM_HOME": str(home)}, capture_output=True, text=True,
                          timeout=kernel_source.BUILD_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"mvmctl kernel build failed: {proc.stderr.strip()[-2000:]}")


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """The host's dockerd if one answers, else our own, started once per session."""
    from tests.dockerd import start_dockerd

    root = Path("/tmp") / f"mvm-test-dockerd-{os.getpid()}"  # short: the socket path has a length limit
    daemon = start_dockerd(root)
    if daemon is not None:
        request.session.config.stash[_DOCKER_KEY] = daemon.host
    yield daemon
    if daemon is not None and daemon.proc is not None:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mvmctl(mvm_home: Path) -> Mvmctl:
    return Mvmctl(mvm_home)


@pytest.fixture(scope="session")
def docker_mvmctl(mvm_home: Path, dockerd) -> Mvmctl:
    if dockerd is None:
        pytest.skip("no dockerd binary on this host (apt-get install docker.io)")
    return Mvmctl(mvm_home, dockerd.host)


@pytest.fixture
def workload_dir(tmp_path: Path):
    """Write an mvm.toml into a fresh directory: workload_dir(toml_text) -> Path."""
    def make(toml: str, name: str = "w") -> Path:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        (directory / "mvm.toml").write_text(textwrap.dedent(toml))
        return directory
    return make
