"""cloud/dwc_refit.py on the embedded default's Q4_0 pair: the masks name exactly the GGUF rows DWC
chose (through the Llama Q/K row permutation), refitting moves only those rows, and the patch of
the refit model ships no row outside them."""

import numpy as np
import torch

from cloud.dwc import DWCConfig, compress
from cloud.dwc_refit import compress_refit, refit, row_masks
from cloud.families import DeviceFiles
from cloud.zoo import scenes
from perturbed import perturbed


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
    merged = perturbed(twin)
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
    res, model = compress_refit(perturbed(twin), twin, parsed, tmp_path / "p.gguf", cfg, "r", None, _examples(twin),
                                [], seed=0)
    assert 0 < res.patch_bytes <= 8192 and model is not None
    off, same = compress_refit(perturbed(twin), twin, parsed, tmp_path / "q.gguf", DWCConfig(budget_bytes=8192, refit_steps=0),
                               "r", None, _examples(twin), [])
    assert off.rows == res.rows  # refit keeps DWC's choice of rows
