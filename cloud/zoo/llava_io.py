"""Write generated samples in the LLaVA conversation format (images as PNG files beside it)."""
from __future__ import annotations

from pathlib import Path

from device.contracts.dataset import llava_record, write_llava
from device.contracts.image import encode_png

from . import scenes


def write_generated(out: Path, domain: str, n: int, seed: int, teacher: bool = False) -> Path:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, s in enumerate(scenes.generate(domain, n, seed, teacher=teacher)):
        rel = f"images/{domain}-{seed}-{i:05d}.png"
        (out / rel).write_bytes(encode_png(s.image))
        records.append(llava_record(f"{domain}-{seed}-{i:05d}", rel, s.question, s.answer, domain=domain, task=s.task))
    path = out / f"{domain}.json"
    write_llava(path, records)
    return path
