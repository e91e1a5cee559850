"""AKD and DWC through the family interface on a text-only Llama: the patch carries the merged
weights into exactly the right GGUF rows (Q/K permutation included), and a teacher with another
tokenizer falls back to sequence-level KD, which the stats say."""
from __future__ import annotations

import numpy as np
import pytest
import tiny_families as tiny
import torch

from cloud.akd import AKDConfig, DistillSet, distil_twin
from cloud.dwc import DWCConfig, apply_patch, compress, fisher_diag, patched_twin
from cloud.families import family_for
from cloud.families.teacher import Teacher

QS = ["what colour is the circle?", "how many shapes?", "is there a red square?", "what shape is it?"]


@pytest.fixture(scope="module")
def twin(llama_gguf):
    torch.set_num_threads(1)
    return family_for(llama_gguf["f32"]).load_twin(llama_gguf["f32"])


def test_patch_lands_in_the_right_rows(twin, llama_gguf, tmp_path):
    teacher = Teacher(llama_gguf["hf"], max_new_tokens=3)  # the student's own checkpoint: same vocabulary
    dset = DistillSet([None] * 4, QS, ["red", "two", "yes", "circle"], [[0]] * 4)
    merged, stats = distil_twin(twin, teacher, dset, None, AKDConfig(steps=20, batch_size=4, lr=5e-3, kd=True))
    assert stats["kd_mode"] == "logit" and stats["lora_targets"] == 14  # 7 projections x 2 layers
    fam = twin.family
    exs = [fam.example(twin, q, None, a) for q, a in zip(dset.questions, dset.labels)]
    fisher = fisher_diag(merged, twin, exs, 2)
    assert fisher["blk.0.attn_q.weight"].shape == (64, 64)
    res = compress(merged, twin, {"model": llama_gguf["f32"]}, tmp_path / "p.gguf", DWCConfig(budget_bytes=None),
                   "r1", "", fisher)
    assert res.tensors_patched >= 14 and not res.skipped
    (tmp_path / "new").mkdir()
    pfiles, patch = apply_patch({"model": llama_gguf["f32"]}, res.patch_path, tmp_path / "new")
    patched = patched_twin(twin, patch, pfiles)
    fresh = family_for(pfiles["model"]).load_twin(pfiles["model"]).model.state_dict()  # the rows, put back
    assert all(torch.equal(v, fresh[n]) for n, v in patched.model.state_dict().items())
    # F32 re-quantization is exact: every HF weight of the patched device file equals the merged model's
    want, got = merged.state_dict(), patched.model.state_dict()
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
              "model.layers.0.mlp.down_proj.weight"):
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)
    answers = [fam.decode(twin, fam.generate(twin, e, 3, model=merged)) for e in
               (fam.example(twin, q, None) for q in QS)]
    assert answers == [fam.decode(patched, fam.generate(patched, fam.example(patched, q, None), 3)) for q in QS]


def test_other_tokenizer_means_sequence_kd(twin, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(tiny.CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = tiny.CHAT_TEMPLATE
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(hf), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, eos_token_id=2)).save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    teacher = Teacher(tmp_path, max_new_tokens=3)
    assert not teacher.same_tokenizer(twin)
    dset = DistillSet([None] * 4, QS, teacher.answer([None] * 4, QS), [[]] * 4)
    _, stats = distil_twin(twin, teacher, dset, None, AKDConfig(steps=3, batch_size=4, kd=True, feat=True))
    assert stats["kd_mode"] == "sequence" and "kd" not in stats and "feat" in stats
