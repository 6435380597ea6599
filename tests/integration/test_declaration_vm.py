"""A Python declaration end to end on a real guest: `mvmctl build app.py` makes the very
artifact (same store key, a cache hit) that the equivalent mvm.toml made, and `mvmctl up
app.py` boots it without ever running the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

TOML = """
name = "declared"
[entrypoint]
command = ["/bin/sh", "-c", "while :; do sleep 1; done"]
[extra_files."/etc/motd"]
content = "declared in python\\n"
"""

APP = """
import mvm
open({marker!r}, "w").write("app.py was run")  # mvmctl must never get here

@mvm.app(
    name="declared",
    entrypoint=mvm.command(["/bin/sh", "-c", "while :; do sleep 1; done"]),
    extra_files={{"/etc/motd": {{"content": "declared in python\\n"}}}},
)
def declared():
    raise SystemExit("not called")
"""


def test_up_a_declaration_then_exec_and_down(mvmctl: Mvmctl, tmp_path: Path) -> None:
    toml_dir = tmp_path / "toml"
    toml_dir.mkdir()
    (toml_dir / "mvm.toml").write_text(TOML)
    marker = tmp_path / "ran"
    app = tmp_path / "py" / "app.py"
    app.parent.mkdir()
    app.write_text(APP.format(marker=str(marker)))

    from_toml = json.loads(mvmctl("build", "--json", str(toml_dir), check=True, timeout=1200).stdout)
    from_py = json.loads(mvmctl("build", "--json", str(app), check=True, timeout=600).stdout)
    assert from_py["key"] == from_toml["key"] and from_py["cacheHit"]
    assert (app.parent / "app.mvm.lock").is_file() and not (app.parent / "mvm.lock").exists()

    up = mvmctl("up", str(app), check=True)
    try:
        assert "VM declared is up" in up.stdout
        proc = mvmctl("exec", "declared", "--", "cat", "/etc/motd", check=True)
        assert proc.stdout == "declared in python\n"
    finally:
        mvmctl("down", "declared", "--force")
    assert not marker.exists()
