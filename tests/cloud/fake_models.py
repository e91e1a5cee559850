"""Two small fake device-model files for registry and server tests: the registry hashes bytes,
so they need not be real GGUF.  The model file is bigger than the 64 KiB sample limit, so the
server's separate model limit is exercised."""
from __future__ import annotations

from pathlib import Path

from device.contracts.model_id import model_id


def model_files(tmp_path: Path, seed: int = 0) -> tuple[str, dict[str, Path]]:
    d = tmp_path / f"model{seed}"
    d.mkdir()
    files = {"model": d / "model.gguf", "mmproj": d / "mmproj.gguf"}
    files["model"].write_bytes(bytes([seed]) * 100_000 + b"GGUF-model")
    files["mmproj"].write_bytes(bytes([seed + 1]) * 3_000 + b"GGUF-mmproj")
    return model_id(files), files
