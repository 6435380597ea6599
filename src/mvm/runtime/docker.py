"""The Docker backend: reduced isolation (a container shares the host kernel), for hosts
where no hypervisor works.

The artifact's rootfs.ext4 becomes an image with ``docker import`` (no registry; cached
by artifact key), and the container runs the same /init and agent as a VM. The agent
connects to a unix socket the supervisor listens on, in a host directory bind-mounted at
/.mvm, so the supervisor and every client work unchanged. ``--network none`` by default.

This module talks to dockerd through the docker CLI: it is imported by the lean per-VM
supervisor, and the CLI already handles contexts, DOCKER_HOST and API version negotiation.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from mvm.core.errors import BackendUnavailable, HostToolMissing, VmError
from mvm.core.state import VmPaths, VmRecord

CAP_ADD = ("CHOWN", "SETUID", "SETGID", "KILL", "DAC_OVERRIDE", "FOWNER")  # what /init needs, no more
CHANNEL_MOUNT = "/.mvm"
CLI_TIMEOUT_S = 60


def docker_cli() -> str:
    cli = shutil.which("docker")
    if cli is None:
        raise HostToolMissing("docker", "docker.io")
    return cli


def _docker(*args: str, input: bytes | None = None, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([docker_cli(), *args], input=input, capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise VmError(f"`docker {args[0]}` did not answer within {timeout:.0f} s", "check that dockerd is healthy") from None


def daemon_status() -> tuple[bool, str]:
    """Whether dockerd answers, and a one-line reason either way."""
    if shutil.which("docker") is None:
        return False, "no docker CLI on PATH (apt-get install docker.io)"
    try:
        proc = _docker("version", "--format", "{{.Server.Version}}", timeout=10)
    except VmError as err:
        return False, str(err)
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode == 0:
        return True, f"dockerd {proc.stdout.decode().strip()} answers"
    if "permission denied" in err.lower():
        return False, "permission denied on the docker socket (add yourself to the docker group, or use root)"
    if "cannot connect" in err.lower() or "is the docker daemon running" in err.lower():
        return False, "dockerd is not running (start it, or set DOCKER_HOST)"
    return False, f"docker does not answer: {err.splitlines()[-1] if err else proc.returncode}"


def require_daemon() -> None:
    ok, why = daemon_status()
    if not ok:
        raise BackendUnavailable(f"the docker backend cannot run: {why}", "`mvmctl doctor` shows every backend")


def image_tag(artifact_name: str, artifact_key: str) -> str:
    return f"mvm/{artifact_name}:{artifact_key[:20]}"


def ensure_image(rootfs: Path, tag: str) -> bool:
    """Import the rootfs as ``tag`` unless dockerd already has it; True when it imported."""
    if _docker("image", "inspect", tag).returncode == 0:
        return False
    with tempfile.TemporaryDirectory(prefix="mvm-docker-import-") as tmp:
        tree = Path(tmp) / "root"
        tree.mkdir()
        # debugfs reads the ext4 without mounting it; as root it keeps owners and modes.
        dump = subprocess.run(["debugfs", "-R", f"rdump / {tree}", str(rootfs)], capture_output=True, text=True)
        if dump.returncode != 0 or not (tree / "init").exists():
            lines = [line for line in dump.stderr.splitlines() if line.startswith("debugfs:")] or ["no /init in it"]
            raise VmError(f"cannot unpack {rootfs} for docker: {lines[0].removeprefix('debugfs: ')}",
                          "rebuild the image with `mvmctl build --no-cache`")
        tar = subprocess.Popen(["tar", "-C", str(tree), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            proc = subprocess.run([docker_cli(), "import", "-", tag], stdin=tar.stdout, capture_output=True,
                                  timeout=600)
        finally:
            tar.stdout.close()
            tar.wait()
    if proc.returncode != 0:
        raise VmError(f"docker import of {rootfs} failed: {proc.stderr.decode(errors='replace').strip()}",
                      "check dockerd's disk space and logs")
    return True


def container_name(paths: VmPaths) -> str:
    """Unique per MVM_HOME, so two homes on one dockerd never collide."""
    home = hashlib.sha256(str(paths.dir.parent.resolve()).encode()).hexdigest()[:8]
    return f"mvm-{paths.name}-{home}"


def run_argv(paths: VmPaths, record: VmRecord, tag: str, data_disk: bool) -> list[str]:
    argv = [docker_cli(), "run", "--rm", "-i", "--name", container_name(paths), "--hostname", record.name,
            "--network", "none", "--cpus", str(record.vcpus), "--memory", f"{record.memory_mib}m",
            "--tmpfs", "/tmp:rw,exec", "--tmpfs", "/run:rw,noexec,nosuid",
            "--cap-drop", "ALL", *[arg for cap in CAP_ADD for arg in ("--cap-add", cap)],
            "--env", "MVM_BACKEND=docker", "--label", f"mvm.vm={record.name}",
            "--volume", f"{paths.channel_dir}:{CHANNEL_MOUNT}"]
    if data_disk:
        argv += ["--volume", f"{paths.data_dir}:/data"]
    return [*argv, tag, "/init"]


def prepare_dirs(paths: VmPaths, data_disk: bool) -> None:
    paths.channel_dir.mkdir(mode=0o755, exist_ok=True)
    paths.channel_dir.chmod(0o755)  # the agent (uid 990 in the container) must reach its socket
    if data_disk:
        paths.data_dir.mkdir(exist_ok=True)
        paths.data_dir.chmod(0o1777)


def kill(container: str) -> None:
    """SIGKILL the container; quietly nothing if it is already gone."""
    _docker("kill", container)


def remove(container: str) -> None:
    _docker("rm", "--force", container)


def pause(container: str, paused: bool) -> None:
    proc = _docker("pause" if paused else "unpause", container)
    if proc.returncode != 0:
        raise VmError(f"docker {'pause' if paused else 'unpause'} failed: {proc.stderr.decode(errors='replace').strip()}")
