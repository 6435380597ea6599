"""The host's signing key: made once, kept private, and refused when it is not."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from mvm.security.host_key import HostKey, HostKeyError, canonical_json, verify


def test_made_once_private_and_verifiable(tmp_path: Path) -> None:
    key = HostKey.load_or_create(tmp_path / "keys")
    assert (tmp_path / "keys" / "host.ed25519").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    data = canonical_json({"b": 1, "a": [1, "é"]})
    assert data == b'{"a":[1,"\\u00e9"],"b":1}'
    signature = key.sign(data)
    assert verify(key.public_hex, signature, data)
    assert not verify(key.public_hex, signature, data + b" ")
    assert not verify(key.public_hex, "not base64!", data)
    assert HostKey.load_or_create(tmp_path / "keys").public_hex == key.public_hex
    assert (tmp_path / "keys" / "host.ed25519.pub").read_text().strip() == key.public_hex


def test_racing_creators_agree(tmp_path: Path) -> None:
    keys: list[str] = []
    threads = [threading.Thread(target=lambda: keys.append(HostKey.load_or_create(tmp_path / "k").public_hex))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys) == 8


@pytest.mark.parametrize("damage", ["mode", "garbage", "symlink"])
def test_a_key_others_could_read_or_a_damaged_one_is_refused(tmp_path: Path, damage: str) -> None:
    path = HostKey.load_or_create(tmp_path / "keys").path
    if damage == "mode":
        path.chmod(0o640)
    elif damage == "garbage":
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    else:
        path.rename(tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(HostKeyError) as err:
        HostKey.load_or_create(tmp_path / "keys")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
