"""core/home.py is how exec's fast path finds a VM (with os.path); core/state.py's pathlib
objects, built on the same rules, must name the same socket and refuse the same names."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvm.core import home, state
from mvm.core.errors import UsageError


@pytest.mark.parametrize("name", ["fx", "web-1", "a.b_c", "x" * 40, "x" * 41, "Web", "-x", "", "a/b", ".."])
@pytest.mark.parametrize("mvm_home_env", ["set", ""])
def test_ctl_socket_path_is_the_one_state_uses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str,
                                               mvm_home_env: str) -> None:
    monkeypatch.setenv("MVM_HOME", str(tmp_path / "h") if mvm_home_env else "")
    try:
        expected = str(state.MvmHome.default().vm(state.check_vm_name(name)).ctl_socket)
    except UsageError as err:
        with pytest.raises(UsageError) as fast_err:
            home.ctl_socket_path(name)
        assert str(fast_err.value) == str(err)
    else:
        assert home.ctl_socket_path(name) == expected
