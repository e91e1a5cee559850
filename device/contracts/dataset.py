"""The dataset format: LLaVA conversation JSON (one definition, torch-free).

``[{"id": str, "image": "relative/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}, ...]`` with images resolved relative to the JSON file.
Users bring their own data in the same format.  Multi-turn records are flattened into one
(question, answer) pair per human/gpt turn; records without an image are text-only.
Errors name the file and the record so a bad line in a 100k-record file is easy to find.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from device.contracts.atomic import write_text_atomic

IMAGE_TOKEN = "<image>"


class DatasetError(ValueError):
    """A dataset file or record is malformed; the message names the file and record."""


@dataclass
class QA:
    id: str
    image: Path | None
    question: str
    answer: str
    meta: dict = field(default_factory=dict)


def _record_error(path: Path, i: int, rid, why: str) -> DatasetError:
    return DatasetError(f"{path}: record {i} (id={rid!r}): {why}")


def _parse_record(path: Path, i: int, rec) -> list[QA]:
    if not isinstance(rec, dict):
        raise _record_error(path, i, None, "not a JSON object")
    rid = rec.get("id", str(i))
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise _record_error(path, i, rid, "needs a 'conversations' list with a human and a gpt turn")
    image = rec.get("image")
    if image is not None and not isinstance(image, str):
        raise _record_error(path, i, rid, "'image' must be a path string")
    img_path = (path.parent / image) if image else None
    if img_path is not None and not img_path.is_file():
        raise _record_error(path, i, rid, f"image file not found: {img_path}")
    out = []
    for k in range(0, len(conv) - 1, 2):
        h, g = conv[k], conv[k + 1]
        if not (isinstance(h, dict) and isinstance(g, dict) and h.get("from") == "human" and g.get("from") == "gpt"):
            raise _record_error(path, i, rid, f"turns {k}/{k + 1} must be human then gpt")
        q, a = h.get("value"), g.get("value")
        if not isinstance(q, str) or not isinstance(a, str) or not a.strip():
            raise _record_error(path, i, rid, f"turn {k} has no text value")
        q = q.replace(IMAGE_TOKEN, "").strip()
        out.append(QA(f"{rid}" if len(conv) == 2 else f"{rid}#{k // 2}", img_path, q, a.strip(),
                      {key: v for key, v in rec.items() if key not in ("id", "image", "conversations")}))
    return out


def read_llava(path: str | Path) -> list[QA]:
    """Parse a LLaVA JSON (or JSONL) file into question/answer pairs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(records, list):
        raise DatasetError(f"{path}: top level must be a list of records")
    return [qa for i, rec in enumerate(records) for qa in _parse_record(path, i, rec)]


def llava_record(rid: str, image_rel: str | None, question: str, answer: str, **meta) -> dict:
    human = f"{IMAGE_TOKEN}\n{question}" if image_rel else question
    rec = {"id": rid}
    if image_rel:
        rec["image"] = image_rel
    rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    rec.update(meta)
    return rec


def write_llava(path: str | Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(records, indent=1), sync_dir=False)
