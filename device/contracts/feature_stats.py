"""Source feature statistics: the reference the device's OOD score measures distance to.

The cloud computes the per-dimension mean and variance of the device model's projected visual
tokens over its SOURCE training images and writes them as a small ``.npz`` next to the model
(``feature_stats.npz``: float32 ``mean``, ``var`` of shape [D] or [N, D], int ``count``).  The device loads it
and scores each visual token of a new image by its squared z-score (see ``device/uts.py``).
Pooling all token positions into one [D] mean keeps the file tiny (~2 x D x 4 bytes) and makes the
score independent of the grid size; per-position [N, D] statistics are sharper where position
embeddings make tokens differ by place, and broadcast the same way (N must match the image).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.contracts.atomic import write_bytes_atomic

FEATURE_STATS_FILE = "feature_stats.npz"


@dataclass(frozen=True)
class FeatureStats:
    mean: np.ndarray  # float32 [D] or [N, D]
    var: np.ndarray  # same shape, >= 0
    count: int = 0  # tokens the statistics were computed from (provenance only)

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float32)
        var = np.asarray(self.var, dtype=np.float32)
        if mean.shape != var.shape or mean.ndim not in (1, 2) or mean.size == 0:
            raise ValueError(f"feature stats: mean {mean.shape} and var {var.shape} must be equal, [D] or [N, D]")
        if not (np.isfinite(mean).all() and np.isfinite(var).all()) or (var < 0).any():
            raise ValueError("feature stats: mean/var must be finite and var >= 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "var", var)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[-1])

    def fits(self, emb: np.ndarray) -> bool:
        """True when these statistics describe visual tokens shaped like ``emb`` ([N, D]): same D,
        and the same N for per-position statistics."""
        shape = np.shape(emb)
        return len(shape) == 2 and shape[-1] == self.dim and (self.mean.ndim == 1 or self.mean.shape[0] == shape[0])

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStats":
        """Pool any [..., D] array of source visual tokens (float64 accumulation)."""
        x = np.asarray(features, dtype=np.float64).reshape(-1, np.shape(features)[-1])
        return cls(x.mean(axis=0), x.var(axis=0), int(x.shape[0]))

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + fsync + rename): a reader never sees half a file."""
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, var=self.var, count=np.int64(self.count))
        write_bytes_atomic(path, buf.getvalue(), sync_dir=False)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                return cls(z["mean"], z["var"], int(z["count"]) if "count" in z.files else 0)
        except FileNotFoundError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: not a feature-stats file ({e})") from None
