"""One host connection: its running execs, tunnels and unfinished writes, and the dispatch of
its requests, where any failure becomes an error reply instead of taking the channel down."""

from __future__ import annotations

import os
from _signal import SIGKILL

from mvm.core import protocol

# Importing a concern's module registers its handlers in HANDLERS.
from . import egress, files, identity, process, system, tunnels
from .channel import Channel
from .dispatch import HANDLERS, Refused, handles

# (_signal: the C module; signal.py builds enums at import. typing: only for annotations.)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Session:
    """The state of one host connection: its running execs and unfinished writes."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.tunnels: dict[int, tunnels.Tunnel] = {}
        self.egress: egress.Egress | None = None  # an allow-list guest's listeners
        self.execs: dict[int, process.Exec] = {}
        self.uploads: dict[int | None, files.Upload] = {}
        self.reads: dict[int | None, files.Read] = {}
        self.failed_uploads: set[int | None] = set()  # ignore their frames until more:false
        # Nothing is read before the host's hello on this connection (serve.py): what waits on
        # a channel when an agent starts may have been sent to the one /init restarted it
        # after, and the host has already told its clients those requests failed.
        self.greeted = False

    def handle(self, frame: protocol.Frame) -> None:
        handler = HANDLERS.get(frame.type)
        try:
            if handler is None:
                raise Refused(f"unknown request type {frame.type!r}")
            identity.check_frozen(frame.type)
            handler(self, frame)
        except (Refused, ValueError) as err:  # ValueError: e.g. a NUL byte in a path or argv
            self.channel.error(frame.id, str(err))
        except OSError as err:
            where = frame.header.get("path") or frame.header.get("src") or err.filename
            prefix = f"{where}: " if isinstance(where, str) else ""
            self.channel.error(frame.id, f"{prefix}{err.strerror or err}", err.errno)
        except protocol.ProtocolError as err:
            self.channel.error(frame.id, f"the reply does not fit in one frame: {err}")
        except Exception as err:  # noqa: BLE001 -- a bug must not take the channel down
            import traceback  # (only for a bug: not worth its import at the agent's start)

            traceback.print_exc()
            self.channel.error(frame.id, f"agent error: {type(err).__name__}: {err}")

    def close(self) -> None:
        """The host is gone: silence the channel, kill its processes, drop partial files."""
        self.channel.close()
        for ex in list(self.execs.values()):
            ex.kill(SIGKILL)
        with system.acting_as_exec_uid():  # (its temporary files are the exec uid's)
            for upload in self.uploads.values():
                upload.abort()
        self.uploads.clear()
        for tunnel in list(self.tunnels.values()):
            tunnel.close()
        if self.egress is not None:
            self.egress.close()
        for read in list(self.reads.values()):
            read.cancelled.set()


def say_hello(channel: Channel, request_id: int | None = None) -> None:
    """Our hello: sent when a connection opens and again for every host hello. The host speaks
    first, and what it writes is queued for us, while what we write with no host connected is
    lost; but a host already connected (an agent /init restarted) sends no new hello unasked.
    It learns from ours, by its new pid, that what the old agent had open is gone, fails it,
    and says hello again: until then this agent runs nothing (Session.greeted)."""
    info: dict[str, Any] = {"uid": os.getuid(), "pid": os.getpid(), "uptime": system.uptime()}
    if system.IMPORTED:  # for the boot report's "agent-imported" phase (what the agent says: a hint)
        info["imported"] = system.IMPORTED[0]
    if request_id is not None:
        info["id"] = request_id
    channel.send({"type": "hello", "version": protocol.PROTOCOL_VERSION, "role": "agent", **info})


@handles("hello")
def do_hello(session: Session, frame: protocol.Frame) -> None:
    say_hello(session.channel, frame.id)


@handles("ping")
def do_ping(session: Session, frame: protocol.Frame) -> None:
    session.channel.reply(frame.id, "pong", uptime=system.uptime())
