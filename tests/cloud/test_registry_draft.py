"""A round's new version is written once, inside the registry (ModelRegistry.draft), and
registered by renaming that folder (adopt): no second copy, the same id put() would give, the
same publication to the blob URL, and nothing left behind -- also when the bytes are already
registered or the files are not the draft's."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloud.registry import ModelRegistry
from device.contracts.model_id import model_id


def _write(folder: Path, seed: int) -> dict[str, Path]:
    files = {"model": folder / "model.gguf", "mmproj": folder / "mmproj.gguf"}
    files["model"].write_bytes(bytes([seed]) * 4096 + b"model")
    files["mmproj"].write_bytes(bytes([seed + 1]) * 512 + b"mmproj")
    return files


def test_adopt_registers_the_draft_by_rename_and_publishes_it(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    reg = ModelRegistry(tmp_path / "models", url=f"file://{bucket}")
    draft = reg.draft()
    files = _write(draft, 3)
    inode = os.stat(files["model"]).st_ino
    mid = reg.adopt(draft, files)
    assert mid == model_id(_write(tmp_path, 3))  # the id of these bytes, wherever they lie
    got = reg.get(mid)
    assert got["model"].parent == reg.root / mid and os.stat(got["model"]).st_ino == inode  # renamed, not copied
    assert ModelRegistry(tmp_path / "elsewhere", url=f"file://{bucket}").has(mid)  # published like put()
    again = reg.draft()
    assert reg.adopt(again, _write(again, 3)) == mid  # the same bytes twice: one model, the draft gone
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".")]


def test_adopt_refuses_files_outside_the_draft(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    draft = reg.draft()
    with pytest.raises(ValueError, match="not the files of draft"):
        reg.adopt(draft, _write(tmp_path, 5))
    assert reg.ids() == []
