"""One typed settings object for the whole project.

Precedence (lowest to highest): defaults < ``$CDCCA_HOME/config.toml`` < env ``CDCCA_*`` < CLI flags.
Both the device and the cloud read their data directory from the same ``CDCCA_HOME`` setting so
that a loopback demo and the tests can isolate everything in one folder.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir
from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS_DIR = REPO_ROOT / "assets"
DEFAULT_MODEL_DIR = ASSETS_DIR / "default"
EMBEDDED_QUANTS = ("f32", "f16", "q8_0", "q4_0")  # the student GGUF types the embedded build ships
DEFAULT_QUANT = "q4_0"  # ... and the one a device installs unless told otherwise
DEFAULT_CLOUD_URL = "http://127.0.0.1:8765"

# --- the on-disk layout, spelled once (the Settings properties below build the paths) ---------
QUEUE_FILE = "queue.sqlite"  # the device's uplink queue (SQLite, WAL) in <home>/device
PATCHES_DIR = "patches"  # downloaded DWC patches, <home>/device/patches/<round id>.gguf
MODELS_DIR = "models"  # the device's versioned model stores, <home>/device/models/<name>
FILE_ROLES = ("model", "mmproj")  # the two GGUF files of a device model, by role
ROLE_FILES = {"model": "model.gguf", "mmproj": "mmproj.gguf"}  # their names inside a version


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
    device_quant: str = Field(DEFAULT_QUANT, description="GGUF type the device installs by default")
    # uplink
    cloud_url: str = Field(DEFAULT_CLOUD_URL, description="cloud server base URL")
    device_token: str | None = Field(None, description="bearer token given by `cdcca cloud add-device`")
    # cloud
    db_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under <home>/cloud")
    max_upload_bytes: int = Field(8 << 20, description="largest accepted upload request")
    max_model_bytes: int = Field(8 << 30, description="largest accepted model-file upload (one GGUF file)")
    # cloud limits (issue 11/13): what one device or one request may cost the server
    max_concurrent_uploads: int = Field(8, ge=1, description="request bodies read at once; more wait, then 503")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within this (model files: per chunk)")
    max_round_steps: int = Field(2000, ge=1, description="largest `steps` a round may ask for")
    max_round_samples: int = Field(1024, ge=1, description="most samples one round learns from")
    max_round_seconds: float = Field(3600.0, gt=0, description="wall time after which a running round is failed")
    rounds_per_hour: int = Field(30, ge=1, description="rounds one device may create per hour")
    round_lease_s: float = Field(60.0, gt=0, description="a worker that misses heartbeats this long loses its round")
    round_attempts: int = Field(2, ge=1, description="times a round is tried before a lost lease fails it")
    staging_max_age_s: float = Field(86400.0, gt=0, description="model-upload staging older than this is swept")
    staging_per_device: int = Field(2, ge=1, description="half-uploaded models one device may park")
    keep_round_models: int = Field(3, ge=1, description="per device: models and patches of its last N rounds kept")
    blob_url: str | None = Field(None, description="fsspec URL for samples, patches and device models; "
                                                    "default <home>/cloud/blobs and <home>/cloud/models")
    train_processes: int = Field(1, ge=1, description="processes a worker trains each round on "
                                                      "(accelerate launch; 1 = in the worker's own process)")
    accelerate_config: Path | None = Field(None, description="accelerate config file for the training launch")
    train_fsdp: bool = Field(False, description="shard the twin with FSDP under accelerate launch (GPUs)")
    # AKD's loss beyond cross-entropy on the teacher's answers.  Both on: CE alone lost the held-out
    # combo + rotate round (+0.8 vs +4.0 points, README findings); off trains 1.6x faster
    akd_kd: bool = Field(True, description="AKD: add logit KD, KL(teacher || student) at temperature T "
                                           "(only when the teacher tokenizes like the device)")
    akd_feature: bool = Field(True, description="AKD: add the answer-hidden-state matching term (any tokenizer)")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _TomlSource(settings_cls))

    # --- derived paths: one definition of the on-disk layout ---
    @property
    def device_dir(self) -> Path:
        return self.home / "device"

    @property
    def queue_path(self) -> Path:
        return self.device_dir / QUEUE_FILE

    @property
    def patches_dir(self) -> Path:
        return self.device_dir / PATCHES_DIR

    @property
    def models_dir(self) -> Path:
        return self.device_dir / MODELS_DIR

    def patch_path(self, round_id: str) -> Path:
        """Where the patch of ``round_id`` is kept; the id comes from the network, so it must be
        a plain token (no separators, no dots) before it becomes part of a path."""
        if not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", round_id or ""):
            raise ValueError(f"refusing round id {round_id[:80]!r}: not a plain token")
        return self.patches_dir / f"{round_id}.gguf"

    @property
    def cloud_dir(self) -> Path:
        return self.home / "cloud"

    @property
    def zoo_dir(self) -> Path:
        return self.home / "zoo"


def load_settings(**overrides: Any) -> Settings:
    """Settings with CLI-flag overrides applied (``None`` values mean "flag not given")."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
