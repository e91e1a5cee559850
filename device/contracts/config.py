"""One typed settings object for the whole project.

Precedence (lowest to highest): defaults < ``$CDCCA_HOME/config.toml`` < env ``CDCCA_*`` < CLI flags.
Both the device and the cloud read their data directory from the same ``CDCCA_HOME`` setting so
that a loopback demo and the tests can isolate everything in one folder.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir
from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS_DIR = REPO_ROOT / "assets"
DEFAULT_MODEL_DIR = ASSETS_DIR / "default"


def default_home() -> Path:
    env = os.environ.get("CDCCA_HOME")
    return Path(env).expanduser() if env else Path(user_data_dir("cdcca", appauthor=False))


class _TomlSource(PydanticBaseSettingsSource):
    """Reads ``$CDCCA_HOME/config.toml`` if it exists (flat keys, same names as the fields)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by pydantic here
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = default_home() / "config.toml"
        if not path.is_file():
            return {}
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SystemExit(f"error: {path}: not valid TOML ({e})") from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDCCA_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="data directory (device and cloud)")
    # device runtime
    threads: int = Field(2, ge=1, description="llama.cpp threads")
    n_ctx: int = Field(512, ge=64, description="llama.cpp context length")
    max_tokens: int = Field(16, ge=1, description="max answer tokens per question")
    device_quant: str = Field("q4_0", description="GGUF type the device installs by default")
    # uplink
    cloud_url: str = Field("http://127.0.0.1:8765", description="cloud server base URL")
    device_token: str | None = Field(None, description="bearer token given by `cdcca cloud add-device`")
    # cloud
    db_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under <home>/cloud")
    max_upload_bytes: int = Field(8 << 20, description="largest accepted upload request")
    max_model_bytes: int = Field(8 << 30, description="largest accepted model-file upload (one GGUF file)")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _TomlSource(settings_cls))

    # --- derived paths: one definition of the on-disk layout ---
    @property
    def device_dir(self) -> Path:
        return self.home / "device"

    @property
    def cloud_dir(self) -> Path:
        return self.home / "cloud"

    @property
    def zoo_dir(self) -> Path:
        return self.home / "zoo"


def load_settings(**overrides: Any) -> Settings:
    """Settings with CLI-flag overrides applied (``None`` values mean "flag not given")."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
