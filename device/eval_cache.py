"""Device-measured accuracies, remembered per (model bytes, eval set): a sync's "before" is the
previous sync's "after" whenever the device still runs the same bytes, so it is read, not measured
again (issue 14: data of a round flows forward once; a second sync spent 10-30 s re-measuring).

The key is the model's content id (sha256 of every file it runs), the eval file's sha256 and the
per-domain limit: any change to the weights, the set or the subset misses.  llama.cpp's greedy
answers are a function of those bytes, so a hit is the same measurement.  A missing, unreadable
or foreign cache file is a miss, never an error."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from device.contracts.atomic import write_text_atomic
from device.contracts.model_id import file_sha256

CACHE_DIR = "eval-cache"
FORMAT = 1


def cache_key(model_id: str, eval_path: Path, per_domain: int | None) -> str:
    h = hashlib.sha256(f"{FORMAT}\0{model_id}\0{file_sha256(eval_path)}\0{per_domain}".encode())
    return h.hexdigest()[:32]


def load(device_dir: Path, key: str) -> dict | None:
    p = Path(device_dir) / CACHE_DIR / f"{key}.json"
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return rec.get("accuracy") if isinstance(rec, dict) and rec.get("key") == key else None


def save(device_dir: Path, key: str, accuracy: dict, version: str | None = None) -> None:
    d = Path(device_dir) / CACHE_DIR
    d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(d / f"{key}.json", json.dumps({"key": key, "version": version, "accuracy": accuracy}))
