"""The host's Ed25519 signing key: what snapshot manifests and the audit chain are signed with.

One key per ``$MVM_HOME``, created on first use under ``keys/`` (private key 0600, the
directory 0700). A key file someone else could read is refused rather than used: a signature
is worth only as much as the secrecy of its key. Verification needs only the public key,
which :func:`verify` takes as hex so that a record can be checked anywhere with a few lines
of Python and the ``cryptography`` package.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from mvm.core.errors import MvmError

KEY_FILE = "host.ed25519"  # PEM, PKCS#8, unencrypted, 0600
PUBLIC_FILE = "host.ed25519.pub"  # hex of the 32 raw bytes


class HostKeyError(MvmError):
    """The host key is missing, damaged or readable by others."""


def canonical_json(obj: Any) -> bytes:
    """The bytes that get signed: sorted keys, no whitespace, ASCII only, so any JSON library
    that re-serialises the same object the same way verifies the same signature."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def verify(public_hex: str, signature: str, data: bytes) -> bool:
    """Whether ``signature`` (base64) is ``public_hex``'s signature of ``data``."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        key.verify(base64.b64decode(signature, validate=True), data)
    except (ValueError, InvalidSignature, TypeError):
        return False
    return True


@dataclass(frozen=True)
class HostKey:
    private: Ed25519PrivateKey
    path: Path

    @property
    def public_hex(self) -> str:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw).hex()

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.private.sign(data)).decode()

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> HostKey:
        """The key under ``keys_dir``, made if there is none. Two processes that race to make
        it agree: the file is created with O_EXCL and the loser reads the winner's."""
        path = keys_dir / KEY_FILE
        if not path.exists():
            keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption())
            fd, name = tempfile.mkstemp(dir=keys_dir, prefix=f".{KEY_FILE}.")  # (mkstemp: 0600)
            tmp = Path(name)
            try:
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # fails if another process made it first: keep theirs
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        key = cls.load(path)
        public = keys_dir / PUBLIC_FILE
        if not public.exists() or public.read_text().strip() != key.public_hex:
            fd, name = tempfile.mkstemp(dir=keys_dir, prefix=f".{PUBLIC_FILE}.")
            with os.fdopen(fd, "w") as f:
                f.write(key.public_hex + "\n")
            os.chmod(name, 0o644)
            os.replace(name, public)
        return key

    @classmethod
    def load(cls, path: Path) -> HostKey:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise HostKeyError(f"there is no host key at {path}", "any `mvmctl snapshot create` makes one") from None
        except OSError as err:
            raise HostKeyError(f"cannot open the host key {path}: {err.strerror}",
                            "it must be a regular file, not a link") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise HostKeyError(f"the host key {path} is not a regular file", f"remove it: rm {path}")
            if info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise HostKeyError(f"the host key {path} is readable or owned by someone else "
                                f"(mode {stat.S_IMODE(info.st_mode):o}, uid {info.st_uid})",
                                f"chmod 600 {path}, or remove it to make a new one (old signatures then fail)")
            data = f.read(16384)
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise HostKeyError(f"the host key {path} is damaged",
                            f"remove it to make a new one: rm {path} (old signatures then fail)") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise HostKeyError(f"the host key {path} is not an Ed25519 key", f"remove it: rm {path}")
        return cls(private, path)

