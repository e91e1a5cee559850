"""cloud/dwc_refit.py on the embedded default's Q4_0 pair: the masks name exactly the GGUF rows DWC
chose (through the Llama Q/K row permutation), refitting moves only those rows, and the patch of
the refit model ships no row outside them."""
import copy

import numpy as np
import pytest
import torch

from cloud.dwc import DWCConfig, compress
from cloud.dwc_refit import compress_refit, refit, row_masks
from cloud.families import DeviceFiles, family_for
from cloud.zoo import scenes


@pytest.fixture(scope="module")
def files(assets):
    return {"model": assets / "student-q4_0.gguf", "mmproj": assets / "mmproj-f32.gguf"}


@pytest.fixture(scope="module")
def twin(files):
    torch.set_num_threads(1)
    return family_for(files["model"], files["mmproj"]).load_twin(files["model"], files["mmproj"])


def _merged(twin, scale=0.05):
    g = torch.Generator().manual_seed(0)
    m = copy.deepcopy(twin.model)
    with torch.no_grad():
        for layer in m.model.text_model.layers:
            for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
                lin.weight += scale * torch.randn(lin.weight.shape, generator=g)
    return m


def _examples(twin, n=8):
    fam = twin.family
    size = twin.meta["geometry"].image_size
    from PIL import Image
    out = []
    for s in scenes.generate("rotate", n, 3):
        im = np.asarray(Image.fromarray(s.image).resize((size, size)))
        out.append(fam.example(twin, s.question, im, s.answer))
    return out


def test_masks_follow_the_gguf_rows_through_the_qk_permutation(twin, files):
    types = DeviceFiles.open(files).types()
    rows = {"model:blk.0.attn_q.weight": [(0, 8), (40, 8)], "model:blk.1.ffn_down.weight": [(16, 8)]}
    masks = row_masks(twin, rows, types)
    maps = {m.gguf_name: m for m in twin.family.row_maps(twin)}
    q = maps["blk.0.attn_q.weight"]
    assert q.row_order is not None  # the Llama RoPE permutation is in play
    mk = masks[q.hf_name].numpy()
    want = np.zeros(mk.shape[0], bool)
    want[q.row_order[list(range(0, 8)) + list(range(40, 48))]] = True
    assert (mk.any(1) == want).all() and (mk[want] == 1).all()
    assert masks[maps["blk.1.ffn_down.weight"].hf_name].numpy().any(1).nonzero()[0].tolist() == list(range(16, 24))
    assert len(masks) == 2


def test_refit_moves_only_the_chosen_rows_and_the_patch_ships_only_them(twin, files, tmp_path):
    merged = _merged(twin)
    parsed = DeviceFiles.open(files)
    first = compress(merged, twin, parsed, tmp_path / "a.gguf", DWCConfig(budget_bytes=8192), "r", "", None)
    masks = row_masks(twin, first.rows, parsed.types())
    model = refit(twin, merged, masks, _examples(twin), _examples(twin), steps=3, lr=1e-2, batch_size=4)
    base, new, mer = (dict(m.named_parameters()) for m in (twin.model, model, merged))
    for n, p in base.items():
        if n not in masks:
            assert torch.equal(new[n], p), n  # nothing outside the selection moved
            continue
        mk = masks[n].bool()
        assert torch.equal(new[n][~mk], p[~mk]), n
        assert not torch.equal(new[n][mk], mer[n][mk]), n  # the chosen rows were trained on
    second = compress(model, twin, parsed, tmp_path / "b.gguf", DWCConfig(budget_bytes=8192), "r", "", None)
    for t, ranges in second.rows.items():
        chosen = {r for s, c in first.rows[t] for r in range(s, s + c)}
        assert {r for s, c in ranges for r in range(s, s + c)} <= chosen, t
    assert 0 < second.patch_bytes <= 8192


def test_compress_refit_ships_the_refit_model_within_the_budget(twin, files, tmp_path):
    parsed = DeviceFiles.open(files)
    cfg = DWCConfig(budget_bytes=8192, refit_steps=2)
    res, model = compress_refit(_merged(twin), twin, parsed, tmp_path / "p.gguf", cfg, "r", None, _examples(twin),
                                [], seed=0)
    assert 0 < res.patch_bytes <= 8192 and model is not None
    off, same = compress_refit(_merged(twin), twin, parsed, tmp_path / "q.gguf", DWCConfig(budget_bytes=8192, refit_steps=0),
                               "r", None, _examples(twin), [])
    assert off.rows == res.rows  # refit keeps DWC's choice of rows
