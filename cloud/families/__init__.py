"""The model-family seam: which family rebuilds a device's GGUF pair in the cloud.

``family_for(model_gguf, mmproj_gguf)`` (or ``family_of`` on an already parsed
:class:`DeviceFiles`) reads ``general.architecture`` (text GGUF) and ``clip.projector_type``
(mmproj) and returns the registered family, or raises one line naming what
was found and what is supported.  Families register themselves with :func:`register`; only the
modules in this package import concrete model classes.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .base import PARTS, Example, Family, FamilyError, RowMap, Twin, collate, load_teacher
from .device_files import DeviceFiles

# a round loads the twin, the teacher and patched twins: one tqdm bar each from transformers would
# drown the round's own progress (sync's stage rows, the demo, the TUI's log) -- the cloud reports
# its progress through RoundStatus instead
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.disable_progress_bar()
# peft asks transformers a deprecated question on every get_peft_model; the notice is for peft's
# authors, not for someone reading a round's output
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

_REGISTRY: list[type[Family]] = []


def register(cls: type[Family]) -> type[Family]:
    _REGISTRY.append(cls)
    return cls


def supported() -> str:
    text = sorted({a for c in _REGISTRY if not c.projector_types for a in c.architectures})
    vis = sorted({f"{a}+{p}" for c in _REGISTRY for a in c.architectures for p in c.projector_types})
    return f"text-only: {', '.join(text)}; vision: {', '.join(vis)}"


def family_for(model_gguf: str | Path, mmproj_gguf: str | Path | None = None) -> Family:
    """The family of a GGUF pair given by path (parses both; a round parses once and calls
    :func:`family_of` with that parse)."""
    return family_of(DeviceFiles.open({"model": model_gguf, "mmproj": mmproj_gguf}))


def family_of(files: DeviceFiles) -> Family:
    arch = files.field("model", "general.architecture")
    proj = files.field("mmproj", "clip.projector_type") if files.mmproj else None
    arch, proj = (None if v is None else str(v) for v in (arch, proj))
    for cls in _REGISTRY:
        if arch in cls.architectures and (proj in cls.projector_types if proj else not cls.projector_types):
            return cls()
    what = f"architecture {arch!r}" + (f" with projector type {proj!r}" if proj else " (text-only)")
    raise FamilyError(f"{files.model.name}: {what} is not supported by the cloud; supported: {supported()}")


from . import idefics3, llama  # noqa: E402,F401  (registration)

__all__ = ["PARTS", "DeviceFiles", "Example", "Family", "FamilyError", "RowMap", "Twin", "collate", "family_for",
           "family_of", "load_teacher", "register", "supported"]
