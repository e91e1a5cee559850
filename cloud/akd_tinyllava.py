"""LEGACY (deleted with TinyLlava at the default switch): AKD -- Adapter-based Knowledge Distillation of the cloud teacher into the device's twin.

The student is the exact (dequantized) device model; its base weights stay frozen and only PEFT
LoRA adapters learn: "language adapters" on every decoder projection and "query adapters" on the
multimodal projector (mm0/mm2).  Three loss terms, each switchable for ablation:

* ``ce``   cross-entropy on the teacher's answers (pseudo-labels) for the uplinked samples;
* ``kd``   KL(teacher || student) over the full vocabulary at temperature T on the answer tokens,
           with the tokens the device flagged as uncertain (UTS token stage) weighted up;
* ``feat`` MSE between the student's and the teacher's last hidden states on the answer tokens,
           through a small learned linear alignment (student dim -> teacher dim; never shipped).

Source replay (ground-truth CE on source samples) keeps the round from forgetting what the device
already knew -- the field notes measured source collapsing without it.

Runs on CPU by default and unchanged under ``accelerate launch`` (an ``Accelerator`` wraps the
adapter model and optimizer; with one process it is a no-op).  Manual multi-process check:
``torchrun --nproc_per_node 2 -m cloud.akd_check`` (gloo on CPU; ``accelerate launch
--num_processes N`` on GPUs) -- see that module.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

from .zoo.data import Codec, Split, make_batch
from .zoo.evaluate import generate
from .zoo.model import TinyLlava, lm_loss

DECODER_TARGETS = r".*text\.layers\.\d+\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_TARGETS = r".*vision\.(mm0|mm2)"
VISION_TARGETS = r".*vision\.blocks\.\d+\.(q|k|v|o|up|down)"


@dataclass
class AKDConfig:
    steps: int = 150
    batch_size: int = 48
    lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    projector_adapter: bool = True
    vision_adapter: bool = True  # low-level shifts (noise, texture) need the encoder to adapt too
    ce: bool = True
    kd: bool = True
    feat: bool = True
    kd_weight: float = 1.0
    feat_weight: float = 0.1
    temperature: float = 2.0
    uncertain_weight: float = 2.0
    replay_fraction: float = 0.5
    seed: int = 0


@dataclass
class DistillSet:
    """The round's training data: uplinked images + questions, the teacher's answers, and per
    sample the answer-token positions the device was unsure of."""

    images: np.ndarray
    questions: list[str]
    labels: list[str]
    uncertain_positions: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.questions)


@torch.no_grad()
def pseudo_label(teacher: TinyLlava, codec: Codec, images: np.ndarray, questions: list[str]) -> list[str]:
    return generate(teacher, codec, images, questions)


def add_adapters(student: TinyLlava, cfg: AKDConfig):
    target = DECODER_TARGETS + (f"|{PROJECTOR_TARGETS}" if cfg.projector_adapter else "") + \
        (f"|{VISION_TARGETS}" if cfg.vision_adapter else "")
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=target)
    return get_peft_model(copy.deepcopy(student), lcfg)


def _answer_mask(labels: torch.Tensor, starts: torch.Tensor, positions: list[list[int]], w_unc: float) -> torch.Tensor:
    """Per-token KD weight on the text part: 1 on answer tokens, ``w_unc`` on uncertain ones."""
    w = (labels != -100).float()
    for i, pos in enumerate(positions):
        for p in pos:
            j = int(starts[i]) + p
            if j < w.shape[1] and w[i, j] > 0:
                w[i, j] = w_unc
    return w


def _text_slice(logits: torch.Tensor, n_text: int) -> torch.Tensor:
    """Outputs that predict the text tokens (shifted by one): positions [-n_text-1, -1)."""
    return logits[:, -n_text - 1:-1]


def distil(student: TinyLlava, teacher: TinyLlava, codec: Codec, dset: DistillSet, replay: Split | None,
           cfg: AKDConfig, on_step: Callable[[int, dict], None] | None = None,
           cancelled: Callable[[], bool] | None = None) -> tuple[TinyLlava, dict]:
    """Train adapters on ``dset`` (+ replay) and return the MERGED student and loss statistics."""
    torch.manual_seed(cfg.seed)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    # each process draws its own batches; gradients are averaged across processes by DDP
    rng = np.random.default_rng(cfg.seed if acc.process_index == 0 else [cfg.seed, acc.process_index])
    same_vocab = student.cfg.text.vocab_size == teacher.cfg.text.vocab_size
    kd_on = cfg.kd and same_vocab
    model = add_adapters(student, cfg)
    align = torch.nn.Linear(student.cfg.text.dim, teacher.cfg.text.dim, bias=False)
    params = [p for p in model.parameters() if p.requires_grad] + (list(align.parameters()) if cfg.feat else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model, align, opt = acc.prepare(model, align, opt)
    teacher = teacher.to(acc.device)
    teacher.eval()
    n_replay = int(round(cfg.batch_size * cfg.replay_fraction)) if replay is not None and len(replay) else 0
    n_new = cfg.batch_size - n_replay
    hist: dict[str, list[float]] = {"loss": [], "ce": [], "kd": [], "feat": [], "replay": []}
    model.train()
    for step in range(cfg.steps):
        if cancelled is not None and cancelled():
            raise InterruptedError("round cancelled")
        idx = rng.integers(0, len(dset), n_new)
        b = make_batch(codec, dset.images[idx], [dset.questions[i] for i in idx], [dset.labels[i] for i in idx])
        logits, hid = model(b, output_hidden=True)
        n_text = b.text_ids.shape[1]
        loss = torch.zeros(())
        terms = {}
        s_log = _text_slice(logits, n_text)
        tgt = b.labels
        if cfg.ce:
            terms["ce"] = F.cross_entropy(s_log.reshape(-1, s_log.shape[-1]), tgt.reshape(-1), ignore_index=-100)
            loss = loss + terms["ce"]
        if kd_on or cfg.feat:
            with torch.no_grad():
                t_logits, t_hid = teacher(b, output_hidden=True)
            w = _answer_mask(tgt, b.answer_start, [dset.uncertain_positions[i] if dset.uncertain_positions else []
                                                   for i in idx], cfg.uncertain_weight)
            if kd_on:
                T = cfg.temperature
                t_log = _text_slice(t_logits, n_text)
                kl = F.kl_div(F.log_softmax(s_log / T, -1), F.log_softmax(t_log / T, -1), log_target=True,
                              reduction="none").sum(-1) * T * T
                terms["kd"] = (kl * w).sum() / w.sum().clamp(min=1)
                loss = loss + cfg.kd_weight * terms["kd"]
            if cfg.feat:
                sh, th = _text_slice(hid[-1], n_text), _text_slice(t_hid[-1], n_text)
                fe = (align(sh) - th).pow(2).mean(-1)
                terms["feat"] = (fe * (w > 0)).sum() / (w > 0).sum().clamp(min=1)
                loss = loss + cfg.feat_weight * terms["feat"]
        if n_replay:
            r = replay.batch(codec, rng.integers(0, len(replay), n_replay))
            terms["replay"] = lm_loss(model(r), r.full_labels(model.cfg.vision.n_patches if r.images is not None else 0))
            loss = loss + terms["replay"] * (n_replay / cfg.batch_size) / max(n_new / cfg.batch_size, 1e-6)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        hist["loss"].append(loss.item())
        for k, v in terms.items():
            hist[k].append(v.item())
        if on_step is not None:
            on_step(step, {k: v.item() for k, v in terms.items()})
    model.eval()
    merged = acc.unwrap_model(model).merge_and_unload().cpu()
    stats = {k: float(np.mean(v[-20:])) for k, v in hist.items() if v}
    stats.update(kd_active=kd_on, steps=cfg.steps, trainable_params=sum(p.numel() for p in params))
    return merged, stats
