"""runtime/client.py's plain classes keep what their dataclasses gave callers, and a VM can be
reached by its socket path alone."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mvm.core import protocol
from mvm.core.errors import VmError
from mvm.runtime.client import ExecResult, VmClient


def test_exec_result_compares_and_reports_like_the_dataclass() -> None:
    assert ExecResult(None, 9, False) == ExecResult(None, 9, False, b"", b"")
    assert ExecResult(None, 9, False).exit_status == 137
    assert ExecResult(4, None, False).exit_status == 4
    assert ExecResult(0, None, True, b"o") != ExecResult(0, None, True, b"x")
    assert repr(ExecResult(0, None, False)) == "ExecResult(code=0, signal=None, timed_out=False, stdout=b'', stderr=b'', receipt=None)"


def test_frame_compares_and_reports_like_the_dataclass() -> None:
    assert protocol.Frame({"type": "x"}) == protocol.Frame({"type": "x"}, b"", {})
    assert protocol.Frame({"type": "x"}).extra == {}
    assert protocol.Frame({"type": "x"}).extra is not protocol.Frame({"type": "x"}).extra
    assert repr(protocol.Frame({"type": "x"}, b"b")) == "Frame(header={'type': 'x'}, body=b'b', extra={})"


def test_connect_socket_names_the_vm_when_nothing_listens(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="VM fx is not running"):
        VmClient.connect_socket(str(tmp_path / "missing.sock"), "fx")
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()
    with pytest.raises(VmError, match="VM fx is not running"):
        VmClient.connect_socket(str(stale), "fx")


def test_connect_by_paths_keeps_them(tmp_path: Path) -> None:
    from mvm.core.state import MvmHome

    paths = MvmHome(tmp_path).vm("fx")
    paths.dir.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(paths.ctl_socket))
    listener.listen(1)
    try:
        with VmClient.connect(paths) as client:
            assert (client.name, client.paths) == ("fx", paths)
    finally:
        listener.close()
