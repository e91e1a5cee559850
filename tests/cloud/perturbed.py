"""A merged update with a known footprint, for the DWC tests (test_dwc, test_dwc_refit)."""
import copy

import torch


def perturbed(twin, seed: int = 0, scale: float = 0.05):
    """A copy of the twin with noise on every text layer's q_proj and down_proj: a merged update
    with a known set of changed tensors (two per layer)."""
    g = torch.Generator().manual_seed(seed)
    merged = copy.deepcopy(twin.model)
    with torch.no_grad():
        for layer in merged.model.text_model.layers:
            for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
                lin.weight += scale * torch.randn(lin.weight.shape, generator=g)
    return merged
