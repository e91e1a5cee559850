"""device.trust: private folders and files, the token file, and key pinning (issue 11, item 9)."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.contracts.signing import SignatureError, public_key_b64
from device.trust import PINNED_KEY_FILE, pin_key, private_dir, read_token, save_token, trusted_key


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_private_dir_tightens_our_folder(tmp_path: Path) -> None:
    d = tmp_path / "device"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    assert mode(private_dir(d)) == 0o700
    assert mode(private_dir(tmp_path / "new" / "device")) == 0o700


def test_token_file_is_0600_and_a_loose_one_is_refused(tmp_path: Path) -> None:
    assert read_token(tmp_path) is None
    path = save_token(tmp_path, "secret-token")
    assert mode(path) == 0o600 and read_token(tmp_path) == "secret-token"
    assert read_token(tmp_path, given="from-env") == "from-env"
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        read_token(tmp_path)


def test_pinning_first_use_then_refuse_a_different_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CDCCA_CLOUD_KEY", raising=False)
    a, b = (public_key_b64(Ed25519PrivateKey.generate()) for _ in range(2))
    assert trusted_key(tmp_path, announced=None) is None
    assert trusted_key(tmp_path, announced=a) == a  # trusted on first use
    assert mode(tmp_path / PINNED_KEY_FILE) == 0o600
    assert trusted_key(tmp_path, announced=b) == a  # the network cannot change a pinned key
    with pytest.raises(SignatureError, match="differs from the one pinned"):
        trusted_key(tmp_path, announced=None, configured=b)
    with pytest.raises(SignatureError, match="not an Ed25519 public key"):
        pin_key(tmp_path / "other", "AAAA")
