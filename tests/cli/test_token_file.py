"""The device token comes from --token / CDCCA_DEVICE_TOKEN, else <home>/device/token (0600)."""
from __future__ import annotations

import pytest

from cdcca_cli.common import load_device_settings
from device.contracts.config import load_settings
from device.trust import save_token


def test_token_file_is_used_when_no_flag_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDCCA_DEVICE_TOKEN", raising=False)
    assert load_device_settings().device_token is None
    path = save_token(load_settings().device_dir, "from-the-file")
    assert load_device_settings().device_token == "from-the-file"
    monkeypatch.setenv("CDCCA_DEVICE_TOKEN", "from-env")
    assert load_device_settings().device_token == "from-env"
    assert load_device_settings(device_token="from-flag").device_token == "from-flag"
    monkeypatch.delenv("CDCCA_DEVICE_TOKEN")
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        load_device_settings()
