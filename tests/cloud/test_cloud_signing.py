"""cloud.signing: the patch-signing key is created once, 0600 in a 0700 folder, and reloaded."""
from __future__ import annotations

import stat
from pathlib import Path

from cloud.signing import key_path, load_or_create_key
from device.contracts.signing import public_key_b64


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_cloud_key_is_created_once_0600(tmp_path: Path) -> None:
    k1 = load_or_create_key(tmp_path)
    k2 = load_or_create_key(tmp_path)
    assert public_key_b64(k1) == public_key_b64(k2)
    assert mode(key_path(tmp_path)) == 0o600 and mode(key_path(tmp_path).parent) == 0o700
