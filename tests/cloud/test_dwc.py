import copy

import gguf
import numpy as np
import pytest
import torch

from cloud.dwc import DWCConfig, compress, patched_twin, weight_updates
from cloud.zoo.gguf_load import dequantize, load_gguf_pair


@pytest.fixture()
def files(assets):
    return {"model": assets / "student-q4_0.gguf", "mmproj": assets / "mmproj-f32.gguf"}


def _perturbed(twin, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    merged = copy.deepcopy(twin)
    with torch.no_grad():
        for layer in merged.text.layers:
            for lin in (layer.q_proj, layer.down_proj):
                lin.weight += scale * torch.randn(lin.weight.shape, generator=g)
    return merged


def test_only_changed_tensors_are_updates(files):
    twin, _ = load_gguf_pair(files["model"], files["mmproj"])
    merged = _perturbed(twin)
    ups = weight_updates(merged, twin)
    assert set(ups) == {f"blk.{i}.{n}.weight" for i in range(twin.cfg.text.layers) for n in ("attn_q", "ffn_down")}


@pytest.mark.parametrize("budget", [4096, 16384, None])
def test_budget_respected_and_device_weights_equal_requantized_rows(files, tmp_path, budget):
    twin, _ = load_gguf_pair(files["model"], files["mmproj"])
    merged = _perturbed(twin)
    res = compress(merged, twin, files, tmp_path / "p.gguf", DWCConfig(budget_bytes=budget, fisher=False),
                   "r1", "v0", fisher=None)
    assert res.patch_path is not None and res.rows_patched > 0
    if budget is not None:
        assert res.patch_bytes <= budget + 4096  # + GGUF header/metadata of the patch file
    new, pfiles, _ = patched_twin(files, res.patch_path)
    r = gguf.GGUFReader(str(pfiles["model"]))
    t = {x.name: x for x in r.tensors}["blk.0.attn_q.weight"]
    dev = dequantize(t)
    assert torch.equal(new.text.layers[0].q_proj.weight, torch.from_numpy(dev))
    # each row is either the old device row or exactly the re-quantized new row
    old = twin.text.layers[0].q_proj.weight.detach().numpy()
    req = gguf.quants.dequantize(gguf.quants.quantize(merged.text.layers[0].q_proj.weight.detach().numpy(), t.tensor_type),
                                 t.tensor_type).reshape(old.shape)
    for i in range(old.shape[0]):
        assert np.array_equal(dev[i], old[i]) or np.array_equal(dev[i], req[i])
    # untouched tensors are byte-identical
    assert torch.equal(new.text.layers[0].k_proj.weight, twin.text.layers[0].k_proj.weight)


def test_bigger_budget_keeps_more_importance(files, tmp_path):
    twin, _ = load_gguf_pair(files["model"], files["mmproj"])
    merged = _perturbed(twin)
    small = compress(merged, twin, files, tmp_path / "a.gguf", DWCConfig(budget_bytes=4096), "r", "v0")
    big = compress(merged, twin, files, tmp_path / "b.gguf", DWCConfig(budget_bytes=32768), "r", "v0")
    assert small.selected_importance_frac < big.selected_importance_frac <= 1.0
    assert small.patch_bytes < big.patch_bytes
