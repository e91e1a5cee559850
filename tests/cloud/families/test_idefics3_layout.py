"""The cloud lays out (image, prompt) exactly as libmtmd does on the device: same token ids,
image tokens at the same positions, and tiles that give the same image embeddings."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from mtmd_probe import mtmd_chunks

from cloud.families.idefics3_layout import Geometry, HFVocab, LlamaVocab, layout, tiles

PROMPT = "<|im_start|>User: <__media__>what colour is the circle?<end_of_utterance>\nAssistant:"


@pytest.mark.parametrize("shape", [(32, 32, 3), (20, 50, 3), (70, 40, 3), (64, 64, 3)])
def test_token_layout_equals_libmtmd(idefics3_pair, shape):
    from transformers import AutoTokenizer

    model, mmproj = idefics3_pair["f32"]
    geo = Geometry.from_mmproj(gguf.GGUFReader(str(mmproj)))
    assert geo.longest_edge == 64 and geo.image_size == 32  # the fixture tiles: 2x2 (or 1x2, 2x1) + overview
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    want, embds = mtmd_chunks(model, mmproj, PROMPT, img)
    lv = LlamaVocab(str(model))
    hv = HFVocab(AutoTokenizer.from_pretrained(idefics3_pair["hf"]), add_bos=lv.add_bos)
    img_id = hv.tok.convert_tokens_to_ids("<image>")
    for vocab in (lv, hv):
        lay = layout(vocab, geo, PROMPT, img, img_id)
        assert [-1 if t == img_id else t for t in lay.input_ids] == want, type(vocab).__name__
        assert lay.pixel_values.shape == (len(embds), 3, 32, 32)
        assert lay.pixel_values.dtype == np.float32
    rows, cols = lay.grid
    assert rows * cols + 1 == len(embds)


def test_tiles_follow_the_longest_edge_rule():
    geo = Geometry(32, 8, 2, 64, (0.5,) * 3, (0.5,) * 3)
    ts, ov, grid = tiles(np.zeros((20, 50, 3), np.uint8), geo)
    assert grid == (1, 2) and len(ts) == 2 and ov.shape == (32, 32, 3)  # 50x20 -> 64x26 -> 64x32
    ts, _, grid = tiles(np.zeros((70, 40, 3), np.uint8), geo)
    assert grid == (2, 2)  # 40x70 -> 36x64 (36 = int(64*40/70)=36, even) -> 64x64


def test_marker_count_is_checked():
    geo = Geometry(32, 8, 2, 32, (0.5,) * 3, (0.5,) * 3)

    class V:
        add_bos, bos_id = True, 1

        def tokenize(self, t):
            return [5] * len(t)

        def lookup(self, p):
            return 7

    with pytest.raises(ValueError, match="1 media markers for 0 image"):
        layout(V(), geo, PROMPT, None, 3)
    with pytest.raises(ValueError, match="0 media markers for 1 image"):
        layout(V(), geo, "no marker", np.zeros((4, 4, 3), np.uint8), 3)
