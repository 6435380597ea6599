"""Reading a VM's state: ls, status, logs, boot-report (cli/vm.py starts and stops VMs)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import click

from mvm.core.sizes import format_size
from mvm.core.state import DamagedVm, MvmHome, VmRecord
from mvm.runtime import backends, lifecycle
from mvm.runtime.boot_phases import PHASES, boot_phases, step_origin, steps
from mvm.runtime.client import VmClient
from mvm.runtime.transfer import printable

PROCESS_CHECK_MAX = 512
TELEMETRY_WAIT_S = 5.0  # status waits this long for a busy guest's agent, then reports without it

@click.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print the VMs as a JSON list.")
def ls(as_json: bool) -> None:
    """List VMs: running ones and stopped ones that still have a record."""
    records = lifecycle.list_vms(MvmHome.default())
    if as_json:
        click.echo(json.dumps([_summary(r) for r in records], indent=2))
        return
    if not records:
        click.echo("no VMs (start one with `mvmctl up DIR`)")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import (
        Text,  # cells as text, not markup: a record's fields may hold anything
    )

    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "STATE", "BACKEND", "ARCH", "MODE", "CPUS", "MEMORY", "UPTIME", "IMAGE"):
        table.add_column(column)
    for record in records:
        if isinstance(record, DamagedVm):
            table.add_row(*map(Text, (record.name, "damaged", "-", "-", "-", "-", "-", "-", printable(record.why))))
            continue
        summary = _summary(record)
        table.add_row(*map(Text, (record.name, summary["state_detail"], f"{record.backend}/{record.accel}", record.arch,
                                  record.mode, str(record.vcpus), format_size(record.memory_mib * 1024 * 1024),
                                  summary["uptime"] or "-", f"{record.artifact_name} ({record.artifact_key[:12]})")))
    Console(width=200).print(table)


def _summary(record: VmRecord | DamagedVm) -> dict[str, Any]:
    if isinstance(record, DamagedVm):
        return {"name": record.name, "state": "damaged", "why": record.why,
                "fix": f"mvmctl down --force {record.name}"}
    uptime = None
    if record.running:
        uptime = _duration(time.time() - record.created_at)
    if record.state == "stopped" and record.suspended:
        detail = "suspended (on disk)"
    elif record.state == "stopped":
        detail = "stopped" + (f" (exit {record.exit_status})" if record.exit_status is not None else "")
    else:
        detail = record.state
    return {"name": record.name, "state": record.state, "state_detail": detail, "backend": record.backend,
            "accel": record.accel, "arch": record.arch, "mode": record.mode, "vcpus": record.vcpus, "memory_mib": record.memory_mib,
            "uptime": uptime, "exit_status": record.exit_status, "stop_reason": record.stop_reason,
            "image": record.artifact_name, "artifact": record.artifact_key, "suspended": record.suspended,
            "snapshot": record.snapshot}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


NETWORK_NOTES = {"deny": " (no network device: nothing in or out but forwards)",
                 "allow-list": " (no network device: out only to the listed destinations, checked by the host)",
                 "open": " (ordinary outbound networking)"}


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(name: str, as_json: bool) -> None:
    """Show VM NAME: state, backend, mode, pids, uptime, resources, services, and the uids its
    processes really run as in the guest, checked against the image's metadata."""
    home = MvmHome.default()
    paths, record = lifecycle.require_vm(home, name)
    report: dict[str, Any] = {**asdict(record), "guest": None, "uid_check": None}
    if record.state == "running":
        try:
            with VmClient.connect(paths) as client:
                report["guest"] = guest = client.call("telemetry", wait_s=TELEMETRY_WAIT_S)
            report["uid_check"] = _uid_check(record, guest)
        except Exception as err:  # noqa: BLE001 - a VM stopping mid-status is still a status
            report["guest_error"] = str(err)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(f"{record.name}: {_summary(record)['state_detail']}"
               + (f" - {record.stop_reason}" if record.stop_reason else ""))
    click.echo(f"  backend     {record.backend} ({record.accel}), mode {record.mode}")
    click.echo(f"  image       {record.artifact_name} {record.artifact_key[:16]}"
               f" ({'sealed' if record.sealed else 'accessible'})")
    click.echo(f"  resources   {record.vcpus} vCPU, {record.memory_mib} MiB, {record.arch}")
    click.echo(f"  network     {record.network}" + NETWORK_NOTES.get(record.network, ""))
    if record.network == "allow-list":
        click.echo(f"  allow       {', '.join(record.allow) or '(nothing)'}")
    if record.snapshot:
        click.echo(f"  cloned from snapshot {record.snapshot}")
    click.echo(f"  pids        supervisor {record.supervisor_pid}, {record.backend} {record.qemu_pid}")
    for label, text in backends.get(record.backend).describe(record):
        click.echo(f"  {label:<11} {text}")
    data = backends.get(record.backend).data_location(paths)
    if data.is_symlink():
        click.echo(f"  data disk   {printable(os.readlink(data))} (kept across down/up; `down --purge` removes it)")
    for volume in record.volumes:
        click.echo(f"  volume      {printable(str(volume.get('host')))} -> {printable(str(volume.get('guest')))} "
                   f"({'ro' if volume.get('readonly') is not False else 'rw'}, "
                   f"{backends.get(record.backend).volume_kind})")
    if record.running:
        click.echo(f"  uptime      {_duration(time.time() - record.created_at)}")
    guest = report.get("guest")
    if guest:
        memory = guest.get("memory") or {}
        click.echo(f"  guest       load {' '.join(str(x) for x in guest.get('load', []))}, memory "
                   f"{format_size(memory.get('available', 0))} free of {format_size(memory.get('total', 0))}")
    for line in report.get("uid_check") or []:
        click.echo(f"  uid         {line}")
    for fwd in record.forwards:
        click.echo(f"  forward     {fwd['host_addr']}:{fwd['host_port']} -> guest port {fwd['guest_port']}")
    for service, info in record.services.items():
        click.echo(f"  service     {service}: {info['state']}, restarts {max(info['restarts'], 0)}, "
                   f"last exit {info['last_exit'] if info['last_exit'] is not None else '-'}")


def _uid_check(record: VmRecord, guest: dict[str, Any]) -> list[str]:
    lines = []
    for role in ("agent", "entrypoint"):
        seen = (guest.get(role) or {}).get("uid")
        expected = record.uids.get(role)
        if seen is None:
            lines.append(f"{role}: not running (image says uid {expected})")
        else:
            verdict = "matches the image" if seen == expected else f"MISMATCH: the image says {expected}"
            lines.append(f"{role}: uid {seen} ({verdict})")
    return lines + _process_check(record, guest.get("processes"))


def _process_check(record: VmRecord, listed: object) -> list[str]:
    """Every guest process must run as root (/init and its helpers), the agent's uid or the
    entrypoint's, by its real and by its effective uid (a setuid program keeps the real one):
    any other is flagged. An entry is [pid, real uid, name] or, from newer agents, [pid, real
    uid, name, effective uid]. (The list is the agent's word, checked as data.)"""
    if not isinstance(listed, list):
        return ["processes: the agent did not list them"]
    allowed = {0, *record.uids.values()}
    lines = []
    for p in listed[:PROCESS_CHECK_MAX]:
        if not (isinstance(p, list) and len(p) in (3, 4)
                and all(isinstance(u, int) and not isinstance(u, bool) for u in p[1:2] + p[3:])):
            continue
        odd = [(kind, uid) for kind, uid in zip(("uid", "effective uid"), [p[1], *p[3:]], strict=False)
               if uid not in allowed]
        lines += [f"PROCESS {printable(str(p[0]))} ({printable(str(p[2]))[:32]}) runs as {kind} {uid}, which the "
                  f"image does not name" for kind, uid in odd[:1]]
    more = " (the agent listed no more)" if len(listed) > PROCESS_CHECK_MAX else ""
    return lines or [f"processes: all {min(len(listed), PROCESS_CHECK_MAX)} run as root or the image's uids{more}"]


@click.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the VM stops.")
def logs(name: str, follow: bool) -> None:
    """Print VM NAME's console: the entrypoint's output and the guest's messages."""
    out = sys.stdout.buffer

    def sink(data: bytes) -> None:
        out.write(data)
        out.flush()

    lifecycle.logs(MvmHome.default(), name, sink, follow=follow)


@click.command(name="boot-report")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the phases as JSON.")
def boot_report(name: str, as_json: bool) -> None:
    """Where VM NAME's boot went: each phase in ms since its QEMU process started, and the
    step from the phase before it.

    \b
      kernel          the guest kernel's clock starts (QEMU's own start before it)
      initramfs       the initramfs's init runs (virtio modules, then the root disk)
      root-mounted    the root filesystem is mounted; switch_root to /init
      init            /init (PID 1) runs
      agent-started   /init has started the agent's python3
      agent-imported  the agent has imported its modules (as it says in its hello: a hint)
      agent-ready     the agent's hello reached the host
      entrypoint      /init starts the entrypoint (alongside the agent: its step is from
                      agent-started)
      exit            the entrypoint ended

    The guest's phases come from /init on a channel only root in the guest can write; agent-ready
    is the host's own observation. A phase that does not apply (no initramfs, a container's
    kernel) or was not reached is "-" (null in --json).
    """
    _, record = lifecycle.require_vm(MvmHome.default(), name)
    phases = boot_phases(record)
    if as_json:
        click.echo(json.dumps({"name": name, "backend": record.backend, "accel": record.accel, "phases_ms": phases,
                               "steps_ms": steps(phases)}, indent=2))
        return
    for line in boot_report_lines(record):
        click.echo(line)


def boot_report_lines(record: VmRecord) -> list[str]:
    phases = boot_phases(record)
    step = steps(phases)
    lines = [(f"boot report for {record.name} ({record.backend}/{record.accel}; ms since {record.backend} started, "
              "and the step from the phase before):")]
    for phase in PHASES:
        ms = phases[phase]
        if ms is None:
            lines.append(f"  {phase:<15} {'-':>6}")
            continue
        origin = step_origin(phases, phase) or f"{record.backend} start"
        lines.append(f"  {phase:<15} {ms:>6} ms  {step[phase]:>+6} ms after {origin}")
    return lines


COMMANDS = [ls, status, logs, boot_report]
