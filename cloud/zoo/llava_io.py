"""Write generated samples in the LLaVA conversation format (images as PNG files beside it)."""
from __future__ import annotations

from pathlib import Path

from device.contracts.dataset import llava_record, write_llava
from device.contracts.image import encode_png

from . import scenes


def _records(out: Path, domain: str, n: int, seed: int, teacher: bool) -> list[dict]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, s in enumerate(scenes.generate(domain, n, seed, teacher=teacher)):
        rid = f"{domain}-{seed}-{i:05d}"
        (out / f"images/{rid}.png").write_bytes(encode_png(s.image))
        records.append(llava_record(rid, f"images/{rid}.png", s.question, s.answer, domain=domain, task=s.task))
    return records


def write_generated(out: Path, domain: str, n: int, seed: int, teacher: bool = False) -> Path:
    """``<out>/<domain>.json`` with PNGs under ``<out>/images``."""
    path = Path(out) / f"{domain}.json"
    write_llava(path, _records(Path(out), domain, n, seed, teacher))
    return path


def write_eval_set(out: Path, n_per_domain: int, seed: int) -> Path:
    """The device's held-out set: every domain in one ``eval.json`` (what `cdcca sync` measures)."""
    recs = [r for d in scenes.DOMAINS for r in _records(Path(out), d, n_per_domain, seed, False)]
    path = Path(out) / "eval.json"
    write_llava(path, recs)
    return path
