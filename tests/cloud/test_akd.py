import numpy as np
import pytest
import torch

from cloud.akd import AKDConfig, DistillSet, distil, pseudo_label
from cloud.zoo import scenes
from cloud.zoo.build import load_pt
from cloud.zoo.data import Codec, from_samples
from cloud.zoo.gguf_load import load_gguf_pair


@pytest.fixture(scope="module")
def pair(assets):
    twin, tok = load_gguf_pair(assets / "student-q4_0.gguf", assets / "mmproj-f32.gguf")
    return twin, load_pt(assets / "teacher.pt"), Codec(tok)


def _dset(teacher, codec, n=24):
    s = scenes.generate("noise", n, 11)
    imgs = np.stack([x.image for x in s])
    qs = [x.question for x in s]
    return DistillSet(imgs, qs, pseudo_label(teacher, codec, imgs, qs), [[0]] * n)


def test_adapters_leave_base_frozen_and_touch_only_targets(pair):
    twin, teacher, codec = pair
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    merged, stats = distil(twin, teacher, codec, _dset(teacher, codec), None, AKDConfig(steps=3, batch_size=8))
    for k, v in twin.state_dict().items():
        assert torch.equal(v, before[k]), f"twin changed: {k}"
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "adapters learned nothing"
    allowed = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "mm0.weight", "mm2.weight")
    vision = tuple(f".{n}.weight" for n in ("q", "k", "v", "o", "up", "down"))
    assert all(k.endswith(".weight") and (any(a in k for a in allowed) or
                                          (k.startswith("vision.blocks.") and k.endswith(vision))) for k in changed), changed
    assert any(k.startswith("vision.blocks.") for k in changed)  # the encoder adapters learned too
    assert {"ce", "kd", "feat"} <= set(stats) and stats["kd_active"]


def test_deterministic_and_switchable(pair):
    twin, teacher, codec = pair
    d = _dset(teacher, codec)
    cfg = AKDConfig(steps=2, batch_size=8, kd=False, feat=False, projector_adapter=False, seed=3)
    a, sa = distil(twin, teacher, codec, d, None, cfg)
    b, sb = distil(twin, teacher, codec, d, None, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "kd" not in sa and "feat" not in sa and sa["ce"] == sb["ce"]
    assert torch.equal(a.vision.mm0.weight, twin.vision.mm0.weight)  # projector adapter off


def test_replay_is_used(pair):
    twin, teacher, codec = pair
    replay = from_samples(scenes.generate("source", 32, 5))
    _, stats = distil(twin, teacher, codec, _dset(teacher, codec), replay, AKDConfig(steps=2, batch_size=8))
    assert "replay" in stats
