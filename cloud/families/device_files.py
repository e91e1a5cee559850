"""The device's GGUF pair as one round reads it: each file parsed by gguf-py once, and that parse
handed to every step that needs a header field, the tensor table or tensor bytes.

Why (issue 14, "data of a round flows forward once"): a round used to open the same base file
with ``gguf.GGUFReader`` eleven times (family_for, load_twin, four row-map builds, DWC's type
table, the patch builder, and the copy it re-read) and the mmproj four times.  On the tiny default
an open costs milliseconds, but gguf-py materializes every metadata value, and a real model's
vocabulary makes one open take seconds (15-30 s for Gemma-3's 262,144 tokens), so the count is
what matters.  The readers memory-map the files read-only; the cloud never changes a registered
model's bytes (a round's new version is a new file), so a parse stays valid for the whole round.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import gguf

from .base import FamilyError


@dataclass
class DeviceFiles:
    """``paths`` ({role: path}, roles of device.contracts.config.FILE_ROLES) and one open
    ``gguf.GGUFReader`` per role."""

    paths: dict[str, Path]
    readers: dict[str, gguf.GGUFReader]
    _tensors: dict[str, dict] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, files: Mapping[str, str | Path | None]) -> "DeviceFiles":
        """Parse every given file once; a missing or non-GGUF file is one FamilyError line."""
        paths = {r: Path(p) for r, p in files.items() if p is not None}
        readers = {}
        for role, p in paths.items():
            if not p.is_file():
                raise FamilyError(f"{p}: no such GGUF file")
            try:
                readers[role] = gguf.GGUFReader(str(p), "r")
            except Exception as e:  # gguf-py raises assorted errors on non-GGUF bytes
                raise FamilyError(f"{p}: not a valid GGUF file ({type(e).__name__})") from None
        return cls(paths, readers)

    @property
    def model(self) -> Path:
        return self.paths["model"]

    @property
    def mmproj(self) -> Path | None:
        return self.paths.get("mmproj")

    def field(self, role: str, key: str, default=None):
        f = self.readers[role].get_field(key)
        return default if f is None else f.contents()

    def tensors(self, role: str) -> dict:
        """{tensor name: gguf ReaderTensor} of one file (built once)."""
        if role not in self._tensors:
            self._tensors[role] = {t.name: t for t in self.readers[role].tensors}
        return self._tensors[role]

    def types(self) -> dict[str, tuple[gguf.GGMLQuantizationType, tuple[int, ...]]]:
        """{tensor name: (ggml type, ggml shape)} over every file (model and mmproj names are disjoint)."""
        return {t.name: (t.tensor_type, tuple(int(x) for x in t.shape))
                for role in self.readers for t in self.tensors(role).values()}
