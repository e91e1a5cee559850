"""Per-model OOD reference statistics: shipped with the model, or estimated from its first chats.

UTS's input-side score is the distance of an image's visual tokens to statistics of the SAME
model's tokens on familiar images. Another model's statistics are meaningless (another width,
another space), so the statistics live with the model they describe: a versioned model keeps
them in its store folder (``feature_stats.npz``, written by the cloud from the twin on the replay
set, or by this estimator), files given with ``--model`` in ``<device_dir>/stats/<model id>.npz``.

When none exist, the device estimates them from the model's first ``min_images`` chats with an
image (pooled per-dimension mean and variance, float64 running sums in ``.partial.npz``). Until
then OOD is simply not measured -- the entropy stage still works -- which is the honest answer
for a model the device has not seen yet. The first chats of a user are their "source" domain.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from device.contracts.atomic import write_bytes_atomic
from device.contracts.feature_stats import FEATURE_STATS_FILE, FeatureStats

MIN_IMAGES = 16


class StatsEstimator:
    """Running pooled statistics of one model's visual tokens, persisted after every image."""

    def __init__(self, path: Path, dim: int, min_images: int = MIN_IMAGES) -> None:
        self.path, self.dim, self.min_images = Path(path), int(dim), int(min_images)
        self.partial = self.path.with_name(self.path.stem + ".partial.npz")
        self.n_images, self.count = 0, 0
        self.sum, self.sumsq = np.zeros(self.dim), np.zeros(self.dim)
        if self.partial.is_file():
            try:
                with np.load(self.partial, allow_pickle=False) as z:
                    if z["sum"].shape == (self.dim,):
                        self.n_images, self.count = int(z["n_images"]), int(z["count"])
                        self.sum, self.sumsq = z["sum"].astype(np.float64), z["sumsq"].astype(np.float64)
            except (OSError, KeyError, ValueError):
                pass  # a torn partial file: start again

    @property
    def done(self) -> bool:
        return self.path.is_file()

    def observe(self, emb: np.ndarray) -> FeatureStats | None:
        """Add one image's visual tokens ([N, D]); returns the finished statistics once enough
        images were seen (then they are also written next to the model), else None."""
        x = np.asarray(emb, dtype=np.float64)
        if self.done or x.ndim != 2 or x.shape[1] != self.dim or not np.isfinite(x).all():
            return None
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        self.count += x.shape[0]
        self.n_images += 1
        if self.n_images < self.min_images:
            self._save_partial()
            return None
        mean = self.sum / self.count
        stats = FeatureStats(mean, np.maximum(self.sumsq / self.count - mean * mean, 0.0), self.count)
        stats.save(self.path)
        self.partial.unlink(missing_ok=True)
        return stats

    def _save_partial(self) -> None:
        buf = io.BytesIO()
        np.savez(buf, sum=self.sum, sumsq=self.sumsq, count=np.int64(self.count), n_images=np.int64(self.n_images))
        write_bytes_atomic(self.partial, buf.getvalue(), sync_dir=False)


def stats_path(folder: Path, key: str | None = None) -> Path:
    """Where a model's statistics live: ``folder/feature_stats.npz`` (a store) or ``folder/<key>.npz``."""
    return Path(folder) / (FEATURE_STATS_FILE if key is None else f"{key}.npz")


def load_matching(path: Path, dim: int | None) -> FeatureStats | None:
    """The statistics at ``path`` if they exist and describe ``dim``-wide tokens (else None)."""
    if not Path(path).is_file():
        return None
    try:
        st = FeatureStats.load(path)
    except ValueError:
        return None
    return st if dim is None or st.dim == dim else None
