"""The model-family seam: which family rebuilds a device's GGUF pair in the cloud.

``family_for(model_gguf, mmproj_gguf)`` reads ``general.architecture`` (text GGUF) and
``clip.projector_type`` (mmproj) and returns the registered family, or raises one line naming what
was found and what is supported.  Families register themselves with :func:`register`; only the
modules in this package import concrete model classes.
"""
from __future__ import annotations

from pathlib import Path

from .base import PARTS, Example, Family, FamilyError, RowMap, Twin, collate, load_teacher

# a round loads the twin, the teacher and patched twins: one tqdm bar each from transformers would
# drown the round's own progress (sync's stage rows, the demo, the TUI's log) -- the cloud reports
# its progress through RoundStatus instead
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.disable_progress_bar()

_REGISTRY: list[type[Family]] = []


def register(cls: type[Family]) -> type[Family]:
    _REGISTRY.append(cls)
    return cls


def _field(path: Path, key: str) -> str | None:
    import gguf

    if not Path(path).is_file():
        raise FamilyError(f"{path}: no such GGUF file")
    try:
        f = gguf.GGUFReader(str(path), "r").get_field(key)
    except Exception as e:  # gguf-py raises assorted errors on non-GGUF bytes
        raise FamilyError(f"{path}: not a valid GGUF file ({type(e).__name__})") from None
    return None if f is None else str(f.contents())


def supported() -> str:
    text = sorted({a for c in _REGISTRY if not c.projector_types for a in c.architectures})
    vis = sorted({f"{a}+{p}" for c in _REGISTRY for a in c.architectures for p in c.projector_types})
    return f"text-only: {', '.join(text)}; vision: {', '.join(vis)}"


def family_for(model_gguf: str | Path, mmproj_gguf: str | Path | None = None) -> Family:
    arch = _field(Path(model_gguf), "general.architecture")
    proj = _field(Path(mmproj_gguf), "clip.projector_type") if mmproj_gguf else None
    for cls in _REGISTRY:
        if arch in cls.architectures and (proj in cls.projector_types if proj else not cls.projector_types):
            return cls()
    what = f"architecture {arch!r}" + (f" with projector type {proj!r}" if proj else " (text-only)")
    raise FamilyError(f"{Path(model_gguf).name}: {what} is not supported by the cloud; supported: {supported()}")


from . import idefics3, llama  # noqa: E402,F401  (registration)

__all__ = ["PARTS", "Example", "Family", "FamilyError", "RowMap", "Twin", "collate", "family_for", "load_teacher",
           "register", "supported"]
