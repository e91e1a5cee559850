"""A LoRA-adapter downlink, for comparison with DWC: the round's text-model update shipped as a
GGUF LoRA adapter that llama.cpp applies at load time (``general.type = adapter``,
``adapter.type = lora``, tensors ``<base>.lora_a`` [r, in] / ``<base>.lora_b`` [out, r]).

AKD's merged update of each decoder matrix is exactly low-rank (rank <= the LoRA rank), so a
truncated SVD of the merged delta recovers factors that reproduce it; they are stored in f16.
llama.cpp's mmproj (libmtmd) takes no adapters, so the vision/projector part of the update can
only travel as a patch: one row ships the adapter alone, another adds a DWC patch of the mmproj.
"""
from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np

from device.runtime import Runtime

ALPHA_KEY = "adapter.lora.alpha"


def lora_factors(merged, twin, rank: int) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """{gguf tensor: (A [r, in], B [out, r], relative residual)} for every changed text matrix."""
    from cloud.dwc import weight_updates

    out = {}
    for g, (role, _new, delta) in weight_updates(merged, twin).items():
        if role != "model" or delta.ndim != 2:
            continue
        u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
        r = min(rank, len(s))
        root = np.sqrt(s[:r])
        b, a = (u[:, :r] * root).astype(np.float32), (root[:, None] * vt[:r]).astype(np.float32)
        resid = float(np.linalg.norm(delta - b @ a) / max(np.linalg.norm(delta), 1e-30))
        out[g] = (a, b, resid)
    return out


def write_adapter(path: Path, factors: dict, dtype=np.float16) -> int:
    """Write the adapter GGUF; alpha = rank so llama.cpp's scale (alpha / rank) is exactly 1."""
    ranks = {a.shape[0] for a, _, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"mixed LoRA ranks {sorted(ranks)}: one alpha cannot scale them all by 1")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32(ALPHA_KEY, float(ranks.pop()))
    for name in sorted(factors):
        a, b, _ = factors[name]
        w.add_tensor(f"{name}.lora_a", a.astype(dtype))
        w.add_tensor(f"{name}.lora_b", b.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path).stat().st_size


def apply_factors(model, factors: dict, dtype=np.float16):
    """A copy of ``model`` with W += B @ A, using the factors exactly as shipped (``dtype``)."""
    import torch

    from cloud.zoo.gguf_names import tensor_map

    m = copy.deepcopy(model)
    names = tensor_map(m.cfg)
    state = m.state_dict()
    for g, (a, b, _) in factors.items():
        t = names[g][1]
        upd = b.astype(dtype).astype(np.float32) @ a.astype(dtype).astype(np.float32)
        state[t] = state[t] + torch.from_numpy(upd)
    m.load_state_dict(state)
    return m.eval()


def with_vision_from(twin, merged):
    """The twin with only the mmproj-side (vision tower + projector) weights of ``merged``."""
    m = copy.deepcopy(twin)
    src = merged.state_dict()
    state = m.state_dict()
    for k in state:
        if k.startswith("vision."):
            state[k] = src[k].clone()
    m.load_state_dict(state)
    return m.eval()


class LoraRuntime(Runtime):
    """The device runtime with a LoRA adapter loaded by llama.cpp (``Llama(lora_path=...)``).
    The product's Runtime has no adapter option; this wraps the one constructor call it makes."""

    def __init__(self, cfg, lora_path: Path | None):
        self.lora_path = lora_path
        super().__init__(cfg)

    def _load(self) -> None:
        import llama_cpp

        orig = llama_cpp.Llama
        lora = None if self.lora_path is None else str(self.lora_path)

        def make(*args, **kwargs):
            return orig(*args, lora_path=lora, **kwargs)

        llama_cpp.Llama = make
        try:
            super()._load()
        finally:
            llama_cpp.Llama = orig
