"""The cloud's patch-signing key: created once, kept private, and the only thing that signs.

The key file is raw PKCS#8 PEM, created with mode 0600 in a 0700 folder under the cloud dir on
the first ``serve`` (or ``add-device``, which prints its public half for the device to pin).
Losing it means re-pinning every device; leaking it means anyone can sign patches, so it is
never logged and never sent.  What is signed is defined once in ``device.contracts.signing``.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding, NoEncryption, PrivateFormat, load_pem_private_key,
)

from device.contracts.signing import public_key_b64

KEY_FILE = "patch-signing-key.pem"


def key_path(cloud_dir: Path) -> Path:
    return Path(cloud_dir) / "keys" / KEY_FILE


def load_or_create_key(cloud_dir: Path) -> Ed25519PrivateKey:
    """The cloud's key, generated on first use.  Creation is O_EXCL so two processes starting at
    once cannot end up with two different keys (the loser reads the winner's file)."""
    path = key_path(cloud_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        tmp = path.with_name(f".{KEY_FILE}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic and refuses to replace an existing key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def public_key(cloud_dir: Path) -> str:
    """Base64 public key: what `cdcca cloud add-device` prints for the device to pin."""
    return public_key_b64(load_or_create_key(cloud_dir))
