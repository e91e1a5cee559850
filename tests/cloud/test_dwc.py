"""DWC on the embedded default's Q4_0 GGUF pair: only changed tensors are updates, the budget
holds, every patched device row is either its old bytes or exactly ggml's re-quantization of the
new row, untouched tensors stay byte-identical, and a bigger budget keeps more importance."""

import gguf
import numpy as np
import pytest
import torch

from cloud import ggml_quant
from cloud.dwc import DWCConfig, apply_patch, compress, patched_twin, weight_updates
from cloud.families import family_for
from device.contracts.patch_format import read_patch
from perturbed import perturbed


def _layers(model):
    return model.model.text_model.layers


def _patched(twin, files, patch_path, dest):
    dest.mkdir()
    pfiles, patch = apply_patch(files, patch_path, dest)
    return patched_twin(twin, patch, pfiles)


def _dequant(path, name):
    t = {x.name: x for x in gguf.GGUFReader(str(path)).tensors}[name]
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]), t.tensor_type


def test_only_changed_tensors_are_updates(twin):
    ups = weight_updates(perturbed(twin), twin)
    n = len(_layers(twin.model))
    assert set(ups) == {f"blk.{i}.{t}.weight" for i in range(n) for t in ("attn_q", "ffn_down")}


@pytest.mark.parametrize("budget", [4096, 16384, None])
def test_budget_respected_and_device_rows_equal_requantized_rows(files, twin, tmp_path, budget):
    merged = perturbed(twin)
    res = compress(merged, twin, files, tmp_path / "p.gguf", DWCConfig(budget_bytes=budget, fisher=False), "r1")
    assert res.patch_path is not None and res.rows_patched > 0
    if budget is not None:
        assert res.patch_bytes <= budget  # the file itself, header and metadata included
    new = _patched(twin, files, res.patch_path, tmp_path / "new")
    pfiles = new.files
    dev, qtype = _dequant(pfiles["model"], "blk.0.ffn_down.weight")  # no Q/K permutation: GGUF rows = HF rows
    assert torch.equal(_layers(new.model)[0].mlp.down_proj.weight, torch.from_numpy(dev))
    old = _layers(twin.model)[0].mlp.down_proj.weight.detach().numpy()
    want = _layers(merged)[0].mlp.down_proj.weight.detach().numpy()
    q = np.frombuffer(ggml_quant.quantize(np.ascontiguousarray(want), qtype), np.uint8).reshape(old.shape[0], -1)
    req = gguf.quants.dequantize(q, qtype).reshape(old.shape)  # ggml's own quantizer: the device's bytes
    same_old = [np.array_equal(dev[i], old[i]) for i in range(old.shape[0])]
    same_new = [np.array_equal(dev[i], req[i]) for i in range(old.shape[0])]
    assert all(a or b for a, b in zip(same_old, same_new))
    if budget is None:
        assert all(same_new)  # every changed row shipped
    # untouched tensors are byte-identical
    assert torch.equal(_layers(new.model)[0].self_attn.k_proj.weight, _layers(twin.model)[0].self_attn.k_proj.weight)


def test_bigger_budget_keeps_more_importance(files, twin, tmp_path):
    merged = perturbed(twin)
    small = compress(merged, twin, files, tmp_path / "a.gguf", DWCConfig(budget_bytes=4096, fisher=False), "r")
    big = compress(merged, twin, files, tmp_path / "b.gguf", DWCConfig(budget_bytes=32768, fisher=False), "r")
    assert small.selected_importance_frac < big.selected_importance_frac <= 1.0
    assert small.patch_bytes < big.patch_bytes


def test_patched_twin_equals_a_fresh_load_of_the_patched_files(files, twin, tmp_path):
    """The round builds the patched twin from the verified patch rows instead of reloading the
    patched files; it must be the same model, bit for bit: Q/K rows (the RoPE row permutation),
    other LM rows and vision-tower rows (the mmproj) all patched."""
    g = torch.Generator().manual_seed(1)
    merged = perturbed(twin)
    with torch.no_grad():
        for lin in (merged.model.vision_model.encoder.layers[0].mlp.fc1, _layers(merged)[0].self_attn.k_proj):
            lin.weight += 0.05 * torch.randn(lin.weight.shape, generator=g)
    res = compress(merged, twin, files, tmp_path / "p.gguf", DWCConfig(budget_bytes=None, fisher=False), "r1")
    new = _patched(twin, files, res.patch_path, tmp_path / "new")
    assert {e.role for e in read_patch(res.patch_path).entries} == {"model", "mmproj"}
    fresh = family_for(new.files["model"], new.files["mmproj"]).load_twin(new.files["model"], new.files["mmproj"])
    got, want = new.model.state_dict(), fresh.model.state_dict()
    assert set(got) == set(want)
    changed = [n for n in want if not torch.equal(want[n], twin.model.state_dict()[n])]
    assert any("q_proj" in n for n in changed) and any("vision_model" in n for n in changed)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    q_new, q_old = (_layers(m)[0].self_attn.q_proj.weight for m in (new.model, twin.model))
    assert not torch.equal(q_new, q_old)
