"""AKD -- Adapter-based Knowledge Distillation of an HF teacher into the device's twin.

The student is the family's HF twin of the device GGUF (weights = dequantized GGUF); its base
weights stay frozen and only PEFT LoRA adapters learn, on the parts the family names: language
adapters (LM projections), query adapters (the connector) and, for low-level shifts, the vision
tower.  Loss terms, each switchable for ablation:

* ``ce``   cross-entropy on the teacher's answers (pseudo-labels) for the uplinked samples;
* ``kd``   KL(teacher || student) over the full vocabulary at temperature T on the answer tokens,
           uncertain tokens (UTS token stage) weighted up -- only when the teacher tokenizes like
           the device ("logit" KD); otherwise the teacher's answers are the targets ("sequence" KD);
* ``feat`` MSE between the student's and the teacher's mean answer hidden states through a
           learned linear alignment (never shipped); works across tokenizers.

All three are on by default; the cloud's settings switch ``kd`` and ``feat`` off (``akd_kd``,
``akd_feature``), which saves a teacher forward pass per step.  On the embedded default CE alone
matched them on noise + texture but lost the combo + rotate round (README findings).

Source replay (ground-truth CE on the cloud's replay set) keeps the round from forgetting.
Every input goes through the family (libmtmd's layout), so the twin trains on what the device sees.

Runs on CPU by default and unchanged under ``accelerate launch`` (an ``Accelerator`` wraps the
adapter model and optimizer; with one process it is a no-op); see ``cloud.akd_check``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

from device.contracts.config import Settings
from device.contracts.wire import RoundOptions

from .families import PARTS, Example, Twin, collate
from .families.teacher import Teacher


_ROUND = RoundOptions.model_fields  # the round's defaults are declared once, in the wire contract
_SET = Settings.model_fields  # ... and the cloud's loss switches once, in the settings


@dataclass
class AKDConfig:
    steps: int = _ROUND["steps"].default
    batch_size: int = 48
    lr: float = _ROUND["learning_rate"].default
    lora_rank: int = 8
    lora_alpha: int = 16
    language_adapter: bool = True
    projector_adapter: bool = True
    vision_adapter: bool = True  # low-level shifts (noise, texture) need the encoder to adapt too
    ce: bool = True
    kd: bool = _SET["akd_kd"].default
    feat: bool = _SET["akd_feature"].default
    kd_weight: float = 1.0
    feat_weight: float = 0.1
    temperature: float = 2.0
    uncertain_weight: float = 2.0
    replay_fraction: float = 0.5
    seed: int = 0

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p, on in zip(PARTS, (self.language_adapter, self.projector_adapter, self.vision_adapter)) if on)


@dataclass
class DistillSet:
    """The round's training data: uplinked images + questions, the teacher's answers, and per
    sample the answer-token positions the device was unsure of."""

    images: Sequence[np.ndarray | None]
    questions: list[str]
    labels: list[str]
    uncertain_positions: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.questions)


@dataclass
class ReplaySet:
    """Ground-truth (image, question, answer) the cloud was given (``--replay`` LLaVA JSON)."""

    images: Sequence[np.ndarray | None]
    questions: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.questions)


def add_adapters(twin: Twin, cfg: AKDConfig):
    targets = twin.family.lora_targets(twin.model, cfg.parts)
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(copy.deepcopy(twin.model), lcfg)


def _answer_rows(ex: Sequence[Example]) -> tuple[list[int], list[int]]:
    """(batch index, position) of every output that predicts an answer token (shifted by one)."""
    bi, pos = [], []
    for i, e in enumerate(ex):
        for p, lab in enumerate(e.labels or []):
            if lab != -100:
                bi.append(i)
                pos.append(p - 1)
    return bi, pos


def _token_weights(ex: Sequence[Example], unc: Sequence[Sequence[int]], w_unc: float) -> torch.Tensor:
    w = []
    for e, u in zip(ex, unc):
        n = sum(1 for lab in (e.labels or []) if lab != -100)
        w += [w_unc if j in set(u) else 1.0 for j in range(n)]
    return torch.tensor(w)


def _pooled(hidden: torch.Tensor, bi: list[int], pos: list[int], n: int) -> torch.Tensor:
    """Mean hidden state over each example's answer-predicting positions."""
    h = hidden[bi, pos]
    idx = torch.tensor(bi)
    out = torch.zeros((n, h.shape[-1]), dtype=h.dtype, device=h.device).index_add_(0, idx.to(h.device), h)
    return out / torch.bincount(idx, minlength=n).clamp(min=1)[:, None].to(h.device).to(h.dtype)


def _ce(logits: torch.Tensor, ex: Sequence[Example]) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor]:
    bi, pos = _answer_rows(ex)
    tgt = torch.tensor([e.labels[p + 1] for e, p in ((ex[b], p) for b, p in zip(bi, pos))])
    return F.cross_entropy(logits[bi, pos], tgt.to(logits.device)), bi, pos, tgt


def _merged(acc: Accelerator, model, twin: Twin, cfg: AKDConfig):
    """The adapters merged into the twin.  Under FSDP each rank holds only a shard, so the full
    state is gathered (a collective: every rank calls it) onto the main process, loaded into an
    unsharded copy and merged there; the other ranks get None (only the main one writes back)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP:
        return acc.unwrap_model(model).merge_and_unload().cpu()
    state = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None
    full = add_adapters(twin, cfg)
    full.load_state_dict({k: v.cpu() for k, v in state.items()})
    return full.merge_and_unload()


def distil_twin(twin: Twin, teacher: Teacher, dset: DistillSet, replay: ReplaySet | None, cfg: AKDConfig,
                on_step: Callable[[int, dict], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    fam = twin.family
    acc = Accelerator(cpu=not torch.cuda.is_available())
    rng = np.random.default_rng(cfg.seed if acc.process_index == 0 else [cfg.seed, acc.process_index])
    pad = twin.meta.get("pad_id", 0)
    s_ex = [fam.example(twin, q, im, a) for im, q, a in zip(dset.images, dset.questions, dset.labels)]
    same = teacher.same_tokenizer(twin)
    kd_on = cfg.kd and same
    t_ex = [teacher.example(q, im, a, twin.vocab if same else None)
            for im, q, a in zip(dset.images, dset.questions, dset.labels)] \
        if (kd_on or cfg.feat) else []
    if kd_on:  # logit KD pairs answer tokens one to one
        n_ans = lambda e: sum(1 for x in e.labels if x != -100)
        kd_on = all(n_ans(a) == n_ans(b) for a, b in zip(s_ex, t_ex))
    r_ex = [fam.example(twin, q, im, a) for im, q, a in zip(replay.images, replay.questions, replay.answers)] \
        if replay is not None and len(replay) else []
    model = add_adapters(twin, cfg)
    dim = int(getattr(twin.model.config, "text_config", twin.model.config).hidden_size)
    align = torch.nn.Linear(dim, teacher.hidden_size, bias=False)
    params = [p for p in model.parameters() if p.requires_grad] + (list(align.parameters()) if cfg.feat else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model, align, opt = acc.prepare(model, align, opt)
    tmodel = teacher.model.to(acc.device).eval()
    n_replay = int(round(cfg.batch_size * cfg.replay_fraction)) if r_ex else 0
    n_new = min(cfg.batch_size - n_replay, len(s_ex)) or 1
    hist: dict[str, list[float]] = {"loss": [], "ce": [], "kd": [], "feat": [], "replay": []}
    model.train()
    for step in range(cfg.steps):
        if cancelled is not None and cancelled():
            raise InterruptedError("round cancelled")
        idx = rng.integers(0, len(s_ex), n_new)
        ex = [s_ex[i] for i in idx]
        b = {k: v.to(acc.device) for k, v in collate(ex, pad).items() if k != "labels"}
        out = model(**b, output_hidden_states=True)
        ce, bi, pos, _ = _ce(out.logits, ex)
        terms, loss = {}, torch.zeros((), device=acc.device)
        if cfg.ce:
            terms["ce"] = ce
            loss = loss + ce
        if kd_on or cfg.feat:
            tex = [t_ex[i] for i in idx]
            tb = {k: v.to(acc.device) for k, v in collate(tex, teacher.pad_id).items() if k != "labels"}
            with torch.no_grad():
                tout = tmodel(**tb, output_hidden_states=True)
            tbi, tpos = _answer_rows(tex)
            if kd_on:
                T, V = cfg.temperature, out.logits.shape[-1]
                s_log, t_log = out.logits[bi, pos] / T, tout.logits[tbi, tpos][:, :V] / T
                kl = F.kl_div(F.log_softmax(s_log, -1), F.log_softmax(t_log, -1), log_target=True,
                              reduction="none").sum(-1) * T * T
                w = _token_weights(ex, [dset.uncertain_positions[i] if dset.uncertain_positions else [] for i in idx],
                                   cfg.uncertain_weight).to(kl.device)
                terms["kd"] = (kl * w).sum() / w.sum().clamp(min=1)
                loss = loss + cfg.kd_weight * terms["kd"]
            if cfg.feat:
                sh = _pooled(out.hidden_states[-1], bi, pos, len(ex))
                th = _pooled(tout.hidden_states[-1], tbi, tpos, len(ex))
                terms["feat"] = (align(sh) - th).pow(2).mean()
                loss = loss + cfg.feat_weight * terms["feat"]
        if n_replay:
            rex = [r_ex[i] for i in rng.integers(0, len(r_ex), n_replay)]
            rb = {k: v.to(acc.device) for k, v in collate(rex, pad).items() if k != "labels"}
            terms["replay"] = _ce(model(**rb).logits, rex)[0]
            loss = loss + terms["replay"] * n_replay / max(n_new, 1)
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
    merged = _merged(acc, model, twin, cfg)
    stats = {k: float(np.mean(v[-20:])) for k, v in hist.items() if v}
    stats.update(kd_active=kd_on, kd_mode="logit" if kd_on else ("sequence" if cfg.kd else "off"), steps=cfg.steps,
                 trainable_params=sum(p.numel() for p in params), lora_targets=len(fam.lora_targets(twin.model, cfg.parts)))
    return merged, stats
