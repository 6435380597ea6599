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
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvm.core.errors import BackendUnavailable, HostToolMissing, HostTooSmall, MvmError, VmError
from mvm.core.state import MvmHome, VmPaths, VmRecord
from mvm.runtime.backends.base import (
    BackendReport,
    CachedImage,
    Capabilities,
    Host,
    HostFacts,
    Progress,
    Spawned,
    VmBackend,
    encoded_argv,
    in_thread,
    join_reasons,
    peer_uid,
)
from mvm.runtime.log_budget import LogBudget
from mvm.runtime.process import spawn_tied

if TYPE_CHECKING:
    from mvm.core.bootimage import BootImage
    from mvm.runtime.backends.base import AgentHandler
    from mvm.runtime.volumes import Mount

CAP_ADD = ("CHOWN", "SETUID", "SETGID", "KILL", "DAC_OVERRIDE", "FOWNER")  # what /init needs, no more
CHANNEL_MOUNT = "/.mvm"
CLI_TIMEOUT_S = 60
PIDS_LIMIT = 4096  # a fork bomb in a container would otherwise spend the host's pids (a VM has its own)
DOCKER_SOCKET = "/var/run/docker.sock"
REDUCED_ISOLATION = ("docker runs the guest as a container: reduced isolation (it shares the host kernel), "
                     "not a microVM")


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


HOME_LABEL = "mvm.home"  # on every image mvm imports: which MVM_HOME's store it came from


def home_label(home: MvmHome) -> str:
    """Which MVM_HOME imported an image, so `prune` of one home never removes another's."""
    return hashlib.sha256(str(home.root.resolve()).encode()).hexdigest()[:16]


def home_of(image: BootImage) -> MvmHome:
    """The MVM_HOME whose store holds ``image`` (store/<key>)."""
    return MvmHome(image.path.parent.parent)


def ensure_image(rootfs: Path, tag: str, home: MvmHome) -> bool:
    """Import the rootfs as ``tag`` unless dockerd already has it; True when it imported.
    The unpacked tree (as big as the image) is scratch in ``home``'s tmp/, not /tmp."""
    if _docker("image", "inspect", tag).returncode == 0:
        return False
    with home.scratch("docker-import") as tmp:
        tree = Path(tmp) / "root"
        tree.mkdir()
        # debugfs reads the ext4 without mounting it; as root it keeps owners and modes.
        try:
            dump = subprocess.run(["debugfs", "-R", f"rdump / {tree}", str(rootfs)], capture_output=True, text=True,
                                  timeout=CLI_TIMEOUT_S * 5)
        except subprocess.TimeoutExpired:
            raise VmError(f"unpacking {rootfs} for docker did not finish within {CLI_TIMEOUT_S * 5} s") from None
        if dump.returncode != 0 or not (tree / "init").exists():
            lines = [line for line in dump.stderr.splitlines() if line.startswith("debugfs:")] or ["no /init in it"]
            raise VmError(f"cannot unpack {rootfs} for docker: {lines[0].removeprefix('debugfs: ')}",
                          "rebuild the image with `mvmctl build --no-cache`")
        tar = subprocess.Popen(["tar", "-C", str(tree), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            proc = subprocess.run([docker_cli(), "import", "--change", f"LABEL {HOME_LABEL}={home_label(home)}",
                                   "-", tag], stdin=tar.stdout, capture_output=True, timeout=600)
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


def cpuset(name: str, vcpus: int) -> str:
    """``vcpus`` of the CPUs we may use, starting at one picked by the VM's name (so containers
    spread over the host): with them, nproc in the container says ``vcpus``, as in a VM."""
    from mvm.runtime.sizing import allowed_cpus

    cpus = allowed_cpus()
    if vcpus > len(cpus):
        raise HostTooSmall(f"{vcpus} vCPUs asked for, but a container cannot have more CPUs than this host's "
                         f"{len(cpus)}, even with --overcommit", f"ask for at most {len(cpus)} (--cpus) on docker")
    start = int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(cpus)
    return ",".join(str(cpus[(start + i) % len(cpus)]) for i in range(vcpus))


def run_argv(paths: VmPaths, record: VmRecord, tag: str, data_disk: bool) -> list[str]:
    # --memory-swap equal to --memory: the limit is the guest's memory, not twice it in swap.
    argv = [docker_cli(), "run", "--rm", "-i", "--name", container_name(paths), "--hostname", record.name,
            "--network", "bridge" if record.network == "open" else "none", "--cpus", str(record.vcpus), "--cpuset-cpus", cpuset(record.name, record.vcpus),
            "--memory", f"{record.memory_mib}m", "--memory-swap", f"{record.memory_mib}m",
            "--pids-limit", str(PIDS_LIMIT),
            "--tmpfs", "/tmp:rw,exec", "--tmpfs", "/run:rw,noexec,nosuid",
            "--cap-drop", "ALL", *[arg for cap in CAP_ADD for arg in ("--cap-add", cap)],
            "--env", "MVM_BACKEND=docker", "--label", f"mvm.vm={record.name}",
            "--volume", f"{paths.channel_dir}:{CHANNEL_MOUNT}"]
    if data_disk:
        argv += ["--volume", f"{paths.data_dir}:/data"]
    for volume in record.volumes:
        argv += ["--mount", bind_mount(str(volume["host"]), str(volume["guest"]), volume.get("readonly") is not False)]
    entrypoint = encoded_argv(record)
    if entrypoint is not None:
        argv += ["--env", f"MVM_ARGV={entrypoint}"]
    if record.network == "allow-list":  # --network none: egress through the agent (guest/init)
        argv += ["--env", "MVM_EGRESS=1"]
    return [*argv, tag, "/init"]


def bind_mount(host: str, guest: str, readonly: bool) -> str:
    """A volume as docker's --mount value (CSV: a host path with a comma or quote is quoted)."""
    import csv
    import io

    out = io.StringIO()
    fields = ["type=bind", f"source={host}", f"target={guest}"] + (["readonly"] if readonly else [])
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue()


def agent_socket_path(paths: VmPaths) -> Path:
    """/.mvm/agent/agent.sock in the container: in a directory only the agent's uid may enter."""
    return paths.channel_dir / "agent" / "agent.sock"


def boot_fifo_path(paths: VmPaths) -> Path:
    """/.mvm/boot in the container: PID 1 (root) writes its boot markers here, nobody else can."""
    return paths.channel_dir / "boot"


def prepare_dirs(paths: VmPaths, data_disk: bool, agent_uid: int) -> None:
    """The channel directory the container sees at /.mvm: the agent's socket directory (its uid,
    0700) and the boot marker FIFO (root, 0600). The container shares the host's uids (no user
    namespace), so these owners hold inside it too."""
    paths.channel_dir.mkdir(mode=0o755, exist_ok=True)
    paths.channel_dir.chmod(0o755)
    agent_dir = agent_socket_path(paths).parent
    agent_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(agent_dir, agent_uid, agent_uid)
    agent_dir.chmod(0o700)
    fifo = boot_fifo_path(paths)
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo, 0o600)
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


def _daemon_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    return host.removeprefix("unix://") if host.startswith("unix://") else DOCKER_SOCKET


class DockerBackend(VmBackend):
    """The guest's root tree as a container: reduced isolation, for hosts with no hypervisor."""

    name = "docker"
    process_label = "the docker CLI"
    volume_kind = "bind mount"
    boots_kernel = False
    why_not = {"snapshots": "a container has no memory state to save; `docker checkpoint` needs CRIU, "
                            "which is not used here"}
    capabilities = Capabilities(snapshots=False, pause_resume=True, vsock=False, tap_networking=False,
                                port_forwarding=True, detach=True, console=True, isolation="container")

    def availability(self, host: Host) -> tuple[bool, str]:
        ok, why = daemon_status()
        return ok, f"{why}; {REDUCED_ISOLATION}" if ok else why

    def accel(self, host: Host) -> str:
        return "container"

    def arch_refusal(self, arch: str) -> str | None:
        from mvm.core.arch import host_arch, is_native

        if is_native(arch):
            return None
        return (f"docker runs a container on the host's own CPU ({host_arch()}): a root tree built for {arch} "
                "would need binfmt_misc with qemu-user, which mvm does not set up (use --hypervisor qemu)")

    def prepare_image(self, image: BootImage, progress: Progress | None = None) -> None:
        tag = image_tag(image.name, image.key)
        if progress:
            progress(f"docker: {REDUCED_ISOLATION}")
        if ensure_image(image.rootfs, tag, home_of(image)) and progress:
            progress(f"docker: imported the image as {tag}")

    def prepare(self, image: BootImage, record: VmRecord, staged: VmPaths) -> None:
        cpuset(record.name, record.vcpus)  # refused here, before the VM is registered, if it cannot be had
        # Named after the final directory: the container is started after the rename.
        record.backend_id = container_name(VmPaths(staged.dir.parent / record.name))
        remove(record.backend_id)  # a leftover from a crash must not block the name
        prepare_dirs(staged, bool(image.data_disk_bytes), image.agent_uid)

    def check_volumes(self, mounts: tuple[Mount, ...]) -> None:
        """Bind mounts: any checked volume can be one (read-only unless rw)."""

    def spawn(self, image: BootImage, record: VmRecord, paths: VmPaths) -> Spawned:
        """The container's agent cannot serve a socket the host could reach, so it dials one
        the supervisor listens on, in a directory bind-mounted at /.mvm."""
        path = agent_socket_path(paths)
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o777)  # its directory is what keeps everyone but the agent's uid out
        listener.listen(4)
        argv = run_argv(paths, record, image_tag(image.name, image.key), bool(image.data_disk_bytes))
        spawned = time.monotonic()
        process = spawn_tied(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return Spawned(process, spawned, agent_listen_fd=listener.detach())

    def socket_paths(self, paths: VmPaths) -> list[Path]:
        return [agent_socket_path(paths)]

    def data_location(self, paths: VmPaths) -> Path:
        return paths.data_dir

    async def serve_agent_channel(self, paths: VmPaths, record: VmRecord, listen_fd: int | None,
                                  handler: AgentHandler) -> None:
        """Connections to the socket the agent dials, refused unless they come from the agent's
        uid (SO_PEERCRED: the container shares the host's uids)."""
        import asyncio

        assert listen_fd is not None
        agent_uid = record.uids.get("agent")
        refusals_logged = LogBudget("agent connections refused for their uid")

        async def from_agent_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            uid = peer_uid(writer)
            if uid != agent_uid:
                if refusals_logged.allow():
                    print(f"mvm-supervisor: refused an agent connection from uid {uid} (the agent is {agent_uid})",
                          file=sys.stderr, flush=True)
                writer.close()
                return
            await handler(reader, writer)

        server = await asyncio.start_unix_server(from_agent_only, sock=socket.socket(fileno=listen_fd))
        async with server:
            await server.serve_forever()

    async def serve_boot_channel(self, paths: VmPaths, feed: Callable[[bytes], None]) -> None:
        """Read the boot FIFO; opened read-write so it never reads EOF between writers."""
        import asyncio

        fd = os.open(boot_fifo_path(paths), os.O_RDWR | os.O_NONBLOCK)
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                feed(data)
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def pause(self, paths: VmPaths, record: VmRecord) -> None:
        await in_thread(pause, self._container(record), True)

    async def resume(self, paths: VmPaths, record: VmRecord) -> None:
        await in_thread(pause, self._container(record), False)

    async def terminate(self, record: VmRecord, process: Any, sig: int) -> None:
        # Signalling the docker CLI would leave the container running: kill the container.
        if record.backend_id:
            await in_thread(kill, record.backend_id)
        process.send_signal(sig)

    async def after_exit(self, record: VmRecord) -> None:
        # The docker CLI may have died alone (kill -9): the container must not outlive it.
        if record.backend_id:
            await in_thread(remove, record.backend_id)
            record.backend_released = True

    def runtime_files(self, paths: VmPaths) -> list[Path]:
        return [*super().runtime_files(paths), agent_socket_path(paths), boot_fifo_path(paths)]

    def release(self, paths: VmPaths, record: VmRecord) -> bool:
        if not record.backend_id:
            return True
        try:
            remove(record.backend_id)
        except MvmError:
            return False  # dockerd is away: try again next time
        return True

    def cached_images(self, home: MvmHome) -> list[CachedImage]:
        """The images this MVM_HOME imported (by their label): never another home's."""
        if shutil.which("docker") is None:
            return []
        require_daemon()
        proc = _docker("images", "--filter", f"label={HOME_LABEL}={home_label(home)}", "--format",
                       "{{.Repository}}:{{.Tag}}")
        tags = sorted({t for t in proc.stdout.decode(errors="replace").split() if t.startswith("mvm/")})
        images = []
        for tag in tags:
            size = _docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.decode().strip()
            images.append(CachedImage(self.name, tag, tag.rsplit(":", 1)[-1], int(size) if size.isdigit() else 0))
        return images

    def remove_cached_image(self, image: CachedImage) -> None:
        proc = _docker("rmi", image.name)
        if proc.returncode != 0:
            raise VmError(f"docker rmi {image.name}: {proc.stderr.decode(errors='replace').strip()[:200]}")

    def describe(self, record: VmRecord) -> list[tuple[str, str]]:
        return [("container", str(record.backend_id)), ("isolation", REDUCED_ISOLATION)]

    def doctor(self, facts: HostFacts) -> BackendReport:
        cli = shutil.which("docker")
        ok, why = daemon_status()
        return self.report(ok, cli is not None, join_reasons(
            REDUCED_ISOLATION, f"docker CLI at {cli}" if cli else "", f"daemon socket {_daemon_socket()}: {why}"))

    @staticmethod
    def _container(record: VmRecord) -> str:
        if not record.backend_id:
            raise VmError(f"VM {record.name} has no container")
        return record.backend_id
