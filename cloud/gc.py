"""Cloud disk retention (issue 11, item 6): what ``cdcca cloud gc`` removes, and workers after
each round.

Kept, always: every sample row's payload, models and patches of each device's last
``keep_round_models`` rounds (the base it trained and the model it produced), the base model of
any active round, and anything younger than ``staging_max_age_s`` (a model just uploaded for a
round about to start, a blob whose row is being written).  Removed: stale upload staging and
temp files, older per-round model copies and patches (their download then answers 410 and the
device simply uploads its model again next round), orphan blobs, leftover round work folders.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, update

from device.contracts.config import Settings

from .registry import ModelRegistry
from .schema import ACTIVE_STATES, rounds, samples
from .server import remove_stale_uploads
from .store import Store


@dataclass
class GcReport:
    staging: int = 0
    uploads: int = 0
    work_dirs: int = 0
    models: list[str] = field(default_factory=list)
    model_bytes: int = 0
    patches: int = 0
    blobs: int = 0

    def line(self) -> str:
        return (f"removed {self.staging} stale staging, {self.uploads} dead uploads, "
                f"{self.work_dirs} round folders, {len(self.models)} models "
                f"({self.model_bytes / 2**20:.1f} MiB), {self.patches} patches, "
                f"{self.blobs} orphan blobs")


def _kept_models_and_patches(store: Store, keep: int) -> tuple[set[str], set[str]]:
    models: set[str] = set()
    patches: set[str] = set()
    seen: dict[str, int] = {}
    query = select(rounds.c.device, rounds.c.state, rounds.c.base_model, rounds.c.metrics,
                   rounds.c.patch_sha256).order_by(rounds.c.created_at.desc())
    with store.engine.connect() as conn:
        for row in conn.execute(query):
            n = seen[row.device] = seen.get(row.device, 0) + 1
            if n <= keep or row.state in ACTIVE_STATES:
                models.add(row.base_model)
                new = (row.metrics or {}).get("new_model")
                if isinstance(new, str):
                    models.add(new)
                if row.patch_sha256:
                    patches.add(row.patch_sha256)
    return models, patches


def _young(path: Path, max_age_s: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < max_age_s
    except OSError:
        return True


def collect(settings: Settings, store: Store, registry: ModelRegistry | None = None,
            dry_run: bool = False) -> GcReport:
    registry = registry or ModelRegistry.from_settings(settings)
    report = GcReport()
    age = settings.staging_max_age_s
    report.staging = registry.sweep(dry_run=dry_run)
    if not dry_run:
        incoming = settings.cloud_dir / "incoming"
        if incoming.is_dir():
            report.uploads = remove_stale_uploads(incoming, max(60.0, 2 * settings.body_timeout_s))
    active = set(store.rounds_in(ACTIVE_STATES))
    work = settings.cloud_dir / "rounds"
    for d in (work.iterdir() if work.is_dir() else []):
        if d.name not in active and not _young(d, 3600):
            report.work_dirs += 1
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
    kept_models, kept_patches = _kept_models_and_patches(store, settings.keep_round_models)
    for mid in registry.ids():
        if mid not in kept_models and time.time() - registry.modified(mid) >= age:
            report.models.append(mid)
            report.model_bytes += 0 if dry_run else registry.remove(mid)
    report.patches = _drop_patches(store, kept_patches, dry_run)
    report.blobs = _orphan_blobs(store, age, dry_run)
    return report


def _drop_patches(store: Store, kept: set[str], dry_run: bool) -> int:
    with store.engine.connect() as conn:
        old = conn.execute(select(rounds.c.id, rounds.c.patch_sha256).where(
            rounds.c.patch_sha256.is_not(None), rounds.c.patch_path.is_not(None))).all()
    dropped = [(rid, sha) for rid, sha in old if sha not in kept]
    if not dry_run and dropped:
        with store.engine.begin() as conn:
            for rid, _sha in dropped:
                conn.execute(update(rounds).where(rounds.c.id == rid).values(patch_path=None))
    return len(dropped)


def _orphan_blobs(store: Store, max_age_s: float, dry_run: bool) -> int:
    """Blobs no sample row and no kept patch points at, and temp files of interrupted writes
    (local blob folders only: object stores have their own lifecycle rules)."""
    if store.blobs.url is not None:
        return 0
    with store.engine.connect() as conn:
        used = set(conn.execute(select(samples.c.payload_sha256)).scalars())
        used |= set(conn.execute(select(rounds.c.patch_sha256).where(
            rounds.c.patch_path.is_not(None))).scalars())
    n = 0
    for tmp in store.blobs.root.glob("??/.*.tmp"):  # a write_atomic that died mid-write
        if not _young(tmp, max_age_s):
            n += 1
            if not dry_run:
                tmp.unlink(missing_ok=True)
    for sha in store.blobs.shas() - used:
        if not _young(store.blobs.path_for(sha), max_age_s):
            n += 1
            if not dry_run:
                store.blobs.delete(sha)
    return n
