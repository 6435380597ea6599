"""The few rules that find a VM: where ``$MVM_HOME`` is, which names are VM names, and where a
VM's control socket lives.

Kept apart from core/state.py, without pathlib or dataclasses, because `mvmctl exec` uses them
to reach a VM before it imports anything heavier. state.py's MvmHome and VmPaths are built on
these same rules.
"""

from __future__ import annotations

import os
import re

from mvm.core.errors import UsageError

VMS_DIR = "vms"  # under the home: one directory per VM
CTL_SOCKET = "ctl.sock"  # in a VM's directory: its supervisor's socket for clients
VM_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
VM_NAME_MAX = 40


def home_dir() -> str:
    """``$MVM_HOME``, else ``~/.mvm``."""
    if os.environ.get("MVM_HOME"):
        return os.environ["MVM_HOME"]
    user_home = os.path.expanduser("~")
    if user_home.startswith("~"):  # as pathlib.Path.home() does: no $HOME and no passwd entry
        raise RuntimeError("Could not determine home directory.")
    return os.path.join(user_home, ".mvm")


def check_vm_name(name: str) -> str:
    """Names become directory and socket names: keep them short and plain."""
    if not VM_NAME.fullmatch(name) or len(name) > VM_NAME_MAX:
        raise UsageError(f"VM name {name!r} is not allowed",
                         f"use 1-{VM_NAME_MAX} lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def ctl_socket_path(name: str) -> str:
    """The control socket of VM ``name`` (checked) under the current home."""
    return os.path.join(home_dir(), VMS_DIR, check_vm_name(name), CTL_SOCKET)
