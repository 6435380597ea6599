"""``mvmctl bootstrap`` and ``mvmctl doctor``: prepare this host and report what it can do."""

from __future__ import annotations

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mvm.core.state import MvmHome
from mvm.runtime.hosttools import bootstrap as bootstrap_host
from mvm.security.posture import Posture, host_posture


def _yes_no(value: bool | None) -> Text:
    if value is None:
        return Text("unknown", style="yellow")
    return Text("yes", style="green") if value else Text("no", style="red")


@click.command(short_help="Install the missing host tools with apt-get.")
@click.option(
    "--dry-run", is_flag=True,
    help="Only report what is missing and the apt-get commands that would run.",
)
def bootstrap(dry_run: bool) -> None:
    """Install the host tools mvm needs (QEMU, qemu-img, busybox-static, e2fsprogs,
    lz4, cpio, apt/dpkg).

    \b
    Checks every tool first and installs only the Debian packages of the missing
    ones, with `apt-get install -y --no-install-recommends` (no GUI pulled in by
    QEMU), non-interactively. Runs apt-get update only when the package lists are
    missing or stale. As root it installs directly; otherwise through `sudo -n`
    when that needs no password, else it prints the commands to run and exits 1.
    On a host without apt it names the packages to install. Running it again
    when everything is present does nothing.
    """
    result = bootstrap_host(dry_run=dry_run, echo=click.echo)
    if result.status == "manual":
        raise click.exceptions.Exit(1)


def _print_posture(posture: Posture, console: Console) -> None:
    host = posture.host
    console.rule("Host")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("OS", Text(f"{host.os} ({host.system})"))
    table.add_row("kernel", Text(host.kernel))
    table.add_row("arch", Text(host.arch))
    table.add_row("CPUs", Text(str(host.cpus)))
    table.add_row("memory", Text(f"{host.memory_mib} MiB"))
    console.print(table)

    kvm = posture.kvm
    console.rule("KVM")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("/dev/kvm present", _yes_no(kvm.device_present))
    table.add_row("/dev/kvm accessible", _yes_no(kvm.accessible))
    table.add_row("kvm_pvm loaded (nested PVM)", _yes_no(kvm.pvm_hint))
    table.add_row("usable (probe)", _yes_no(kvm.usable))
    table.add_row("probe says", Text(kvm.reason))
    if kvm.boot_ms is not None:
        table.add_row("probe boot", Text(f"{kvm.boot_ms} ms"))
    console.print(table)

    console.rule("Backends")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("backend", style="bold", no_wrap=True)
    table.add_column("isolation", no_wrap=True)
    table.add_column("available", no_wrap=True)
    table.add_column("tested here", no_wrap=True)
    table.add_column("why")
    for b in posture.backends:
        name = b.name + (f" ({b.accel})" if b.accel else "")
        table.add_row(name, str(b.capabilities["isolation"]), _yes_no(b.available), _yes_no(b.tested_here),
                      Text(b.reason))
    console.print(table)

    console.rule("What mvm can do on each backend")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("backend", style="bold", no_wrap=True)
    short = {"snapshots": "snapshot", "pause_resume": "pause", "vsock": "vsock", "tap_networking": "tap",
             "port_forwarding": "forward", "detach": "detach", "console": "console"}
    columns = list(short)
    for column in columns:
        table.add_column(short[column], no_wrap=True)
    for b in posture.backends:
        caps = b.capabilities
        table.add_row(b.name, *[_yes_no(bool(caps[c])) for c in columns])
    console.print(table)

    if posture.security is not None:
        _print_security(posture, console)
    if posture.kernels is not None:
        _print_kernels(posture, console)

    console.rule("Host tools")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("tool", style="bold", no_wrap=True)
    table.add_column("package", no_wrap=True)
    table.add_column("for", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("path / problem", overflow="fold")
    for t in posture.tools:
        version = Text(t.version or "?") if t.ok else Text("missing", "red")
        where = Text(t.path or "") if t.ok else Text(t.problem or "", "red")
        table.add_row(t.name, t.package, ", ".join(t.needed_by), version, where)
    console.print(table)

    console.rule()
    runnable = [b for b in posture.backends if b.supported and b.available]
    if runnable:
        names = ", ".join(b.name + (f" ({b.accel})" if b.accel else "") for b in runnable)
        console.print(Text(f"can run a VM: yes, with {names}", "green"))
    else:
        console.print(Text("can run a VM: no (see Backends above)", "red"))
    if posture.can_build:
        console.print(Text("can build images: yes", "green"))
    else:
        console.print(Text("can build images: no (run `mvmctl bootstrap`)", "red"))


def _print_kernels(posture: Posture, console: Console) -> None:
    kernels = posture.kernels
    assert kernels is not None
    console.rule("Guest kernels")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    which = "mvm's own" if kernels.default == "mvm" else "Debian's cloud kernel (until mvm's own is built)"
    table.add_row("default", Text(f"{which} for x86_64 guests; aarch64 guests boot Debian's arm64 kernel "
                                  "(mvm.toml's kernel, or `build --kernel`, picks another)"))
    if kernels.ours:
        table.add_row("mvm's own", Text(f"built: {kernels.ours} ({kernels.ours_release})", "green"))
    elif kernels.build_needs_missing:
        table.add_row("mvm's own", Text(f"not built; compiling it needs {', '.join(kernels.build_needs_missing)} "
                                        "(apt-get install them, then `mvmctl kernel build`)", "yellow"))
    else:
        table.add_row("mvm's own", Text("not built yet (`mvmctl kernel build`: about 5 minutes on two cores)"))
    console.print(table)


def _print_security(posture: Posture, console: Console) -> None:
    sec = posture.security
    assert sec is not None
    console.rule("Security")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_row("isolation", Text(", ".join(f"{name}: {tier}" for name, tier in sec.isolation.items())))
    kvm = posture.kvm
    table.add_row("KVM", Text("usable" if kvm.usable else f"not usable ({kvm.reason}): QEMU runs on TCG"))
    argv = {True: "yes", False: "no", None: "unknown (no QEMU here)"}[sec.qemu_seccomp_in_argv]
    running = sec.qemu_seccomp_running
    filtered = sum(1 for r in running if r["seccomp"])
    table.add_row("QEMU seccomp", Text(f"-sandbox on in QEMU's argv: {argv}; running QEMU VMs with a seccomp filter "
                                       f"(/proc/PID/status): {filtered} of {len(running)}"))
    key = sec.key
    if not key["exists"]:
        key_text = Text(f"{key['path']}: not made yet (made 0600 on first use)")
    else:
        key_text = Text(f"{key['path']}: mode {key['mode']}" + ("" if key["ok"] else " - readable by others or "
                                                                "not yours: chmod 600 it"),
                        None if key["ok"] else "red")
    table.add_row("host key", key_text)
    last = sec.audit.get("last_verify")
    if isinstance(last, dict):
        verdict = (f"whole ({last.get('records')} records)" if last.get("ok") else f"BROKEN: {last.get('problem')}")
        last_text = f"last `mvmctl audit verify` at {last.get('time')}: {verdict}"
    else:
        last_text = "never verified (`mvmctl audit verify`)"
    records = sec.audit.get("records")
    head = {True: "signed", False: "NOT signed by this key", None: "none yet"}[sec.audit.get("head_signed")]  # type: ignore[index]
    table.add_row("audit chain", Text(f"{records if records is not None else 0} records, head {head}; {last_text}",
                                      "red" if (isinstance(last, dict) and not last.get("ok")) else None))
    policy = sec.policy
    if policy.get("error"):
        table.add_row("policy", Text(str(policy["error"]), "red"))
    elif policy["files"]:
        rules = policy["rules"]
        table.add_row("policy", Text(f"{', '.join(policy['files'])}: " + ("; ".join(rules) if rules else "no rules")))  # type: ignore[arg-type]
    else:
        table.add_row("policy", Text("none ($MVM_HOME/policy.toml does not exist): every plan is admitted"))
    console.print(table)


@click.command(short_help="Report what this host can run, and why.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--no-probe", is_flag=True,
    help="Do not boot a KVM probe guest; use a cached verdict for this host boot if any.",
)
def doctor(as_json: bool, no_probe: bool) -> None:
    """Report what this host can run: OS, /dev/kvm, every backend, host tools.

    \b
    Each backend is listed as available or not, with the reason and whether it was
    actually exercised here. Whether KVM works is decided by a short probe boot
    (cached per host boot); --no-probe skips it. Exits 0 when at least one
    supported backend can run a VM, 1 otherwise (also with --json).
    """
    posture = host_posture(MvmHome.default(), probe=not no_probe)
    if as_json:
        click.echo(posture.model_dump_json(indent=2))
    else:
        _print_posture(posture, Console(highlight=False))
    raise click.exceptions.Exit(0 if posture.can_run_vm else 1)


COMMANDS = [bootstrap, doctor]
