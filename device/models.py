"""Which model the device runs: a versioned model from the device's stores -- the embedded default
(installed on first use) or a user's GGUF imported with ``cdcca models add`` -- or files the user
points at with ``--model/--mmproj`` (no versions, no sync).

Stores live under ``<device_dir>/models/<name>/`` (``device/versions.py``); ``ACTIVE`` names the
store ``cdcca chat``/``sync``/``versions``/``rollback`` act on when no ``--quant`` is given (absent:
the default ``default-<quant>``). Each model's OOD statistics belong to it (``device/model_stats.py``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from device.contracts.atomic import write_text_atomic
from device.contracts.config import DEFAULT_MODEL_DIR, EMBEDDED_QUANTS as QUANTS, Settings
from device.contracts.feature_stats import FEATURE_STATS_FILE, FeatureStats
from device.contracts.gguf_index import GGUFIndexError, read_index
from device.contracts.model_id import model_id, model_id_from_hashes
from device.model_stats import StatsEstimator, load_matching, stats_path
from device.versions import VersionStore

ACTIVE_FILE = "ACTIVE"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass
class DeviceModel:
    model: Path
    mmproj: Path | None
    id: str
    stats: FeatureStats | None
    store: VersionStore | None  # None for user-given files (no patch/rollback)
    version: str | None
    estimator: StatsEstimator | None = None  # learns this model's stats from its first chats

    @property
    def lineage(self) -> str:
        """What this model's adaptive UTS window is filed under: its version store (a patch keeps
        the model's score scale, so versions share one window), else the files' content id."""
        return f"store:{self.store.name}" if self.store is not None else f"id:{self.id}"

    def files(self) -> dict[str, Path]:
        return {"model": self.model} | ({"mmproj": self.mmproj} if self.mmproj else {})

    def observe(self, visual_embeddings) -> None:
        """Feed one chat's visual tokens to the estimator; adopt the stats once it has enough."""
        if self.estimator is not None and visual_embeddings is not None and self.stats is None:
            done = self.estimator.observe(visual_embeddings)
            if done is not None:
                self.stats, self.estimator = done, None


def bundled_files(quant: str, model_dir: Path = DEFAULT_MODEL_DIR) -> tuple[Path, Path]:
    if quant not in QUANTS:
        raise ValueError(f"unknown device quantization {quant!r}; choose from {', '.join(QUANTS)}")
    model, mmproj = model_dir / f"student-{quant}.gguf", model_dir / "mmproj-f32.gguf"
    for p in (model, mmproj):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: embedded model file missing (run `cdcca models build --out {model_dir}`)")
    return model, mmproj


def embedding_dim(model: Path) -> int | None:
    """Width of the text model's embeddings (= the projected visual tokens), from its GGUF header."""
    kv = read_index(model).scalars
    return kv.get(f"{kv.get('general.architecture', '')}.embedding_length")


def models_dir(settings: Settings) -> Path:
    return settings.device_dir / "models"


def store_for(settings: Settings, quant: str) -> VersionStore:
    return VersionStore(models_dir(settings), name=f"default-{quant}")


def active_name(settings: Settings) -> str | None:
    try:
        name = (models_dir(settings) / ACTIVE_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return name if NAME_RE.match(name) else None


def set_active(settings: Settings, name: str | None) -> None:
    """Make store ``name`` the one the device commands use (None: back to the default)."""
    d = models_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    if name is None:
        (d / ACTIVE_FILE).unlink(missing_ok=True)
        return
    if not VersionStore(d, name).installed():
        raise ValueError(f"no device model named {name!r} (see `cdcca models list`)")
    write_text_atomic(d / ACTIVE_FILE, name + "\n", sync_dir=False)


def list_models(settings: Settings) -> list[tuple[str, VersionStore]]:
    d = models_dir(settings)
    if not d.is_dir():
        return []
    return [(p.name, VersionStore(d, p.name)) for p in sorted(d.iterdir())
            if p.is_dir() and VersionStore(d, p.name).installed()]


def add_user_model(settings: Settings, model: Path, mmproj: Path | None = None, name: str | None = None,
                   activate: bool = True) -> VersionStore:
    """Import a user's GGUF (+ mmproj) as v0 of a new store and (by default) make it current.

    llama.cpp must load it (with its mmproj) first: a file the device cannot run is refused before
    anything is copied. Text-only models (no mmproj) are welcome."""
    from device.runtime import Runtime, RuntimeConfig

    model = Path(model)
    name = name or re.sub(r"[^a-z0-9._-]+", "-", model.stem.lower()).strip("-.")[:64] or "model"
    if not NAME_RE.match(name) or name.startswith("default-"):
        raise ValueError(f"invalid model name {name!r}: use a-z 0-9 . _ - (not 'default-...')")
    store = VersionStore(models_dir(settings), name)
    if store.installed():
        raise ValueError(f"a device model named {name!r} exists already (choose another with --name)")
    for p, what in ((model, "model"), (mmproj, "mmproj")):
        if p is not None:
            try:
                read_index(p)
            except (GGUFIndexError, FileNotFoundError) as e:
                raise ValueError(f"{what}: {e}") from None
    Runtime(RuntimeConfig(model, Path(mmproj) if mmproj else None, n_threads=1, n_ctx=64)).close()
    store.install_base(model, mmproj, note=f"imported {model.name}")
    shipped = model.parent / FEATURE_STATS_FILE  # stats the user's model came with, if they fit it
    st = load_matching(shipped, embedding_dim(model)) if mmproj else None
    if st is not None:
        st.save(stats_path(store.dir))
    if activate:
        set_active(settings, name)
    return store


def _stats_for_files(settings: Settings, model: Path, mmproj: Path | None, mid: str):
    """Stats for ``--model`` files: the cache for this exact model, else a fitting file beside it."""
    if mmproj is None:
        return None, None
    dim = embedding_dim(model)
    cache = stats_path(settings.device_dir / "stats", mid)
    st = load_matching(cache, dim) or load_matching(model.parent / FEATURE_STATS_FILE, dim)
    if st is None and dim:
        cache.parent.mkdir(parents=True, exist_ok=True)
        return None, StatsEstimator(cache, dim)
    return st, None


def _stats_for_store(store: VersionStore, paths, default: bool):
    if paths.mmproj is None:
        return None, None
    dim = embedding_dim(paths.model)
    st = load_matching(stats_path(store.dir), dim)
    if st is None and default:  # the embedded default ships its own (measured on its source set)
        st = load_matching(DEFAULT_MODEL_DIR / FEATURE_STATS_FILE, dim)
    if st is None and dim:
        return None, StatsEstimator(stats_path(store.dir), dim)
    return st, None


def open_device_model(settings: Settings, model: Path | None = None, mmproj: Path | None = None,
                      quant: str | None = None) -> DeviceModel:
    if model is not None:
        model = Path(model)
        if not model.is_file():
            raise FileNotFoundError(f"{model}: no such model file")
        if mmproj is not None and not Path(mmproj).is_file():
            raise FileNotFoundError(f"{mmproj}: no such mmproj file")
        files = {"model": model} | ({"mmproj": Path(mmproj)} if mmproj else {})
        mid = model_id(files)
        st, est = _stats_for_files(settings, model, Path(mmproj) if mmproj else None, mid)
        return DeviceModel(model, Path(mmproj) if mmproj else None, mid, st, None, None, est)
    name = None if quant else active_name(settings)
    if name is not None:
        store = VersionStore(models_dir(settings), name)
        if not store.installed():
            raise ValueError(f"the active device model {name!r} is not installed; `cdcca models use default`")
    else:
        quant = quant or settings.device_quant
        store = store_for(settings, quant)
        if not store.installed():
            m, p = bundled_files(quant)
            store.install_base(m, p)
    store.recover()
    v = store.identify()  # the live files must be this version's bytes; their hashes name the model
    paths = store.paths(v)
    mid = model_id_from_hashes({r: rec.sha256 for r, rec in v.files.items()})
    st, est = _stats_for_store(store, paths, name is None)
    return DeviceModel(paths.model, paths.mmproj, mid, st, store, v.id, est)
