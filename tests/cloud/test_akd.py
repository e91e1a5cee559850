"""AKD on the embedded default (HF Idefics3 twin rebuilt from its Q4_0 GGUF pair, HF teacher):
the base stays frozen, only the family's LoRA targets move, the run is seeded, every loss term
switches, and the replay set is used."""
import numpy as np
import pytest
import torch

from cloud.akd import AKDConfig, DistillSet, ReplaySet, distil_twin
from cloud.families import family_for
from cloud.families.teacher import Teacher
from cloud.zoo import scenes

LM = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def pair(assets):
    torch.set_num_threads(1)
    model, mmproj = assets / "student-q4_0.gguf", assets / "mmproj-f32.gguf"
    return family_for(model, mmproj).load_twin(model, mmproj), Teacher(assets / "teacher")


def _dset(teacher, n=16):
    s = scenes.generate("noise", n, 11)
    imgs, qs = [x.image for x in s], [x.question for x in s]
    return DistillSet(imgs, qs, teacher.answer(imgs, qs), [[0]] * n)


def test_adapters_leave_base_frozen_and_touch_only_targets(pair):
    twin, teacher = pair
    before = {k: v.clone() for k, v in twin.model.state_dict().items()}
    merged, stats = distil_twin(twin, teacher, _dset(teacher), None, AKDConfig(steps=3, batch_size=8, kd=True, feat=True))
    for k, v in twin.model.state_dict().items():
        assert torch.equal(v, before[k]), f"twin changed: {k}"
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "adapters learned nothing"
    targets = set(twin.family.lora_targets(twin.model))
    assert all(k.endswith(".weight") and k[: -len(".weight")] in targets for k in changed), changed - targets
    assert any(".vision_model." in k for k in changed) and any(".connector." in k for k in changed)
    assert any(k.startswith("model.text_model.") and k.split(".")[-2] in LM for k in changed)
    assert {"ce", "kd", "feat"} <= set(stats) and stats["kd_active"] and stats["kd_mode"] == "logit"


def test_deterministic_and_switchable(pair):
    twin, teacher = pair
    d = _dset(teacher)
    cfg = AKDConfig(steps=2, batch_size=8, kd=False, feat=False, projector_adapter=False, vision_adapter=False, seed=3)
    a, sa = distil_twin(twin, teacher, d, None, cfg)
    b, sb = distil_twin(twin, teacher, d, None, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "kd" not in sa and "feat" not in sa and sa["ce"] == sb["ce"]
    base = twin.model.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in a.state_dict().items()
               if ".connector." in k or ".vision_model." in k)  # projector + vision adapters off


def test_replay_is_used(pair):
    twin, teacher = pair
    s = scenes.generate("source", 16, 5)
    replay = ReplaySet([x.image for x in s], [x.question for x in s], [x.answer for x in s])
    _, stats = distil_twin(twin, teacher, _dset(teacher), replay, AKDConfig(steps=2, batch_size=8))
    assert "replay" in stats and np.isfinite(stats["replay"])


def test_language_adapters_switch_off(pair):
    twin, teacher = pair
    merged, _ = distil_twin(twin, teacher, _dset(teacher), None, AKDConfig(steps=2, batch_size=8, language_adapter=False))
    base = twin.model.state_dict()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and not any(k.startswith("model.text_model.") for k in changed), changed


def test_settings_switch_the_extra_terms_off(pair):
    """With the cloud settings' akd_kd / akd_feature off, only CE (and replay) trains, the teacher is
    not run per step, and the stats say so; the defaults follow the settings' defaults."""
    from device.contracts.config import Settings

    twin, teacher = pair
    assert AKDConfig().kd == Settings.model_fields["akd_kd"].default
    assert AKDConfig().feat == Settings.model_fields["akd_feature"].default
    _, stats = distil_twin(twin, teacher, _dset(teacher), None, AKDConfig(steps=2, batch_size=8, kd=False, feat=False))
    assert stats["kd_mode"] == "off" and "kd" not in stats and "feat" not in stats and np.isfinite(stats["ce"])
