"""Which model the device runs: the embedded default (installed into the versioned store on first
use) or files the user points at with ``--model/--mmproj``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device.contracts.config import DEFAULT_MODEL_DIR, Settings
from device.contracts.feature_stats import FEATURE_STATS_FILE, FeatureStats
from device.contracts.model_id import model_id, model_id_from_hashes
from device.versions import VersionStore

QUANTS = ("f32", "f16", "q8_0", "q4_0")


@dataclass
class DeviceModel:
    model: Path
    mmproj: Path | None
    id: str
    stats: FeatureStats | None
    store: VersionStore | None  # None for user-given files (no patch/rollback)
    version: str | None

    def files(self) -> dict[str, Path]:
        return {"model": self.model} | ({"mmproj": self.mmproj} if self.mmproj else {})


def bundled_files(quant: str, model_dir: Path = DEFAULT_MODEL_DIR) -> tuple[Path, Path]:
    if quant not in QUANTS:
        raise ValueError(f"unknown device quantization {quant!r}; choose from {', '.join(QUANTS)}")
    model, mmproj = model_dir / f"student-{quant}.gguf", model_dir / "mmproj-f32.gguf"
    for p in (model, mmproj):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: embedded model file missing (run `cdcca models build --out {model_dir}`)")
    return model, mmproj


def _stats_near(path: Path) -> FeatureStats | None:
    for d in (path.parent, DEFAULT_MODEL_DIR):
        f = d / FEATURE_STATS_FILE
        if f.is_file():
            return FeatureStats.load(f)
    return None


def store_for(settings: Settings, quant: str) -> VersionStore:
    return VersionStore(settings.device_dir / "models", name=f"default-{quant}")


def open_device_model(settings: Settings, model: Path | None = None, mmproj: Path | None = None,
                      quant: str | None = None) -> DeviceModel:
    if model is not None:
        model = Path(model)
        if not model.is_file():
            raise FileNotFoundError(f"{model}: no such model file")
        if mmproj is not None and not Path(mmproj).is_file():
            raise FileNotFoundError(f"{mmproj}: no such mmproj file")
        files = {"model": model} | ({"mmproj": Path(mmproj)} if mmproj else {})
        return DeviceModel(model, Path(mmproj) if mmproj else None, model_id(files), _stats_near(model), None, None)
    quant = quant or settings.device_quant
    store = store_for(settings, quant)
    if not store.installed():
        m, p = bundled_files(quant)
        store.install_base(m, p)
    store.recover()
    v = store.identify()  # the live files must be this version's bytes; their hashes name the model
    paths = store.paths(v)
    mid = model_id_from_hashes({r: rec.sha256 for r, rec in v.files.items()})
    stats = FeatureStats.load(DEFAULT_MODEL_DIR / FEATURE_STATS_FILE) if (DEFAULT_MODEL_DIR / FEATURE_STATS_FILE).is_file() else None
    return DeviceModel(paths.model, paths.mmproj, mid, stats, store, v.id)
