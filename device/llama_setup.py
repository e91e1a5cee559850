"""Setting llama-cpp-python up the way the device runtime needs it: quiet logs, no weight
repacking (it crashes some CPUs), the mmproj's image geometry, and a clear error for a file that
is not a GGUF.  Kept apart from ``device/runtime.py`` so that the decode loop reads on its own.
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path

GGML_TYPES = {"f32": 0, "f16": 1}  # KV-cache precisions RuntimeConfig.kv_cache accepts


class ModelError(RuntimeError):
    """A model could not be loaded or run; the message is one line naming the file."""


def silence_llama_logs() -> None:
    import llama_cpp
    from llama_cpp import mtmd_cpp

    @llama_cpp.llama_log_callback
    def _quiet(level, text, user_data):  # noqa: ARG001
        return None

    global _LOG_CB  # keep a reference so ctypes does not free the callback
    _LOG_CB = _quiet
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
    try:
        mtmd_cpp.mtmd_helper_log_set(_quiet, ctypes.c_void_p(0))
    except Exception:  # pragma: no cover - older builds
        pass


@contextmanager
def no_weight_repacking(repack: bool):
    """Llama() offers no switch for ``use_extra_bufts``: wrap the default-params factory it calls."""
    import llama_cpp.llama_cpp as lc

    if repack:
        yield
        return
    orig = lc.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = params
    try:
        yield
    finally:
        lc.llama_model_default_params = orig


def vision_geometry(mmproj: Path) -> tuple[int, int]:
    """(image_size, patch_size) of an mmproj: the size images are resized to before libmtmd."""
    from device.contracts.gguf_index import read_index

    kv = read_index(mmproj).scalars
    return int(kv["clip.vision.image_size"]), int(kv["clip.vision.patch_size"])


def check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ModelError(f"{path}: no such {what} file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (bad magic)")
