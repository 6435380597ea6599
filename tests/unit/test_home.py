"""core/home.py is how exec's fast path finds a VM; core/state.py must find the same one."""

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


def test_no_home_directory_fails_as_pathlib_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MVM_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr("os.path.expanduser", lambda path: path)  # no $HOME and no passwd entry
    with pytest.raises(RuntimeError) as pathlib_err:
        state.mvm_home()
    with pytest.raises(RuntimeError) as ours:
        home.home_dir()
    assert str(ours.value) == str(pathlib_err.value)
