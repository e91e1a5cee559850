"""Procedural multimodal data: small images of coloured shapes with questions and answers.

One *source* domain (what the pocket model is trained on) and shifted *target* domains where it
is weak -- the continual-adaptation setting of the paper.  Everything is seeded; no downloads.

Design notes (see the field notes in shared/README.md):
* Held-out colour/shape pairs are chosen so each held-out colour keeps two held-out shapes and
  each shape two held-out colours: in the ``combo`` domain the question never determines the
  answer, so a model cannot score there without looking at the image.
* Pixel-level i.i.d. noise is not a shift for 8-px patches; ``noise`` uses low-frequency colour
  noise (a coarse grid upsampled), which is.
* Colours and shapes are distinct within a scene, so every question has exactly one answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
HELD_OUT = frozenset({
    ("red", "circle"), ("red", "square"), ("green", "triangle"), ("green", "cross"),
    ("blue", "circle"), ("blue", "triangle"), ("yellow", "square"), ("yellow", "cross"),
})
SEEN = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT)
UNSEEN = tuple(sorted(HELD_OUT))
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
COUNT_WORDS = ("zero", "one", "two", "three")
DOMAINS = ("source", "texture", "noise", "combo", "rotate")
TARGET_DOMAINS = DOMAINS[1:]
TASKS = ("colour", "shape", "count", "position", "exists", "caption")
CAPTION_PROMPT = "describe the image."


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cell: int  # 0..3 on a 2x2 grid, row-major


@dataclass
class Sample:
    image: np.ndarray  # uint8 [H, W, 3]
    question: str
    answer: str
    domain: str
    task: str


# ---------------------------------------------------------------- drawing
def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        base = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        base = [(0, -1.15), (1.05, 0.85), (-1.05, 0.85)]
    else:  # cross: a 12-gon plus sign
        t = 0.38
        base = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in base]


def _draw(img: Image.Image, obj: Obj, rng: np.random.Generator, size: int, rotate: bool) -> None:
    cell = size // 2
    r = cell * (rng.uniform(0.22, 0.42) if rotate else rng.uniform(0.30, 0.36))
    cx = (obj.cell % 2) * cell + cell / 2 + rng.uniform(-1.5, 1.5)
    cy = (obj.cell // 2) * cell + cell / 2 + rng.uniform(-1.5, 1.5)
    fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[obj.colour])
    d = ImageDraw.Draw(img)
    if obj.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        angle = rng.uniform(0.35, 1.2) * rng.choice([-1, 1]) if rotate else 0.0
        d.polygon(_shape_points(obj.shape, cx, cy, r, angle), fill=fill)


def _background(domain: str, rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(0, 40)
    bg = np.full((size, size, 3), base, np.float32) + rng.normal(0, 3, (size, size, 3))
    if domain == "texture":
        period = int(rng.integers(3, 7))
        a, b = rng.integers(30, 140, 3), rng.integers(0, 60, 3)
        yy, xx = np.mgrid[:size, :size]
        kind = rng.integers(3)
        mask = ((xx // period + yy // period) % 2 if kind == 0 else
                (xx // period) % 2 if kind == 1 else ((xx + yy) // period) % 2).astype(bool)
        bg[mask] = a
        bg[~mask] = b
    return bg


def _low_freq_noise(rng: np.random.Generator, size: int, sigma: float = 70.0) -> np.ndarray:
    coarse = rng.normal(0, sigma, (4, 4, 3)).astype(np.float32)
    up = [Image.fromarray(coarse[..., c], mode="F").resize((size, size), Image.BILINEAR) for c in range(3)]
    return np.stack([np.asarray(u) for u in up], -1)


def render(objs: list[Obj], domain: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    bg = _background(domain, rng, size)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    for o in objs:
        _draw(img, o, rng, size, rotate=domain == "rotate")
    out = np.asarray(img, np.float32)
    if domain == "noise":
        out = out + _low_freq_noise(rng, size)
    return np.clip(out, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- scenes and questions
def _pairs_for(domain: str, teacher: bool) -> tuple[tuple[str, str], ...]:
    if domain == "combo":
        return UNSEEN
    return ALL_PAIRS if teacher else SEEN


def _sample_objects(rng: np.random.Generator, pairs, n: int) -> list[Obj]:
    while True:
        idx = rng.choice(len(pairs), n, replace=False)
        chosen = [pairs[i] for i in idx]
        if len({c for c, _ in chosen}) == n and len({s for _, s in chosen}) == n:
            cells = rng.choice(4, n, replace=False)
            return [Obj(c, s, int(k)) for (c, s), k in zip(chosen, cells)]


def caption(objs: list[Obj]) -> str:
    parts = [f"{'an' if o.colour == 'orange' else 'a'} {o.colour} {o.shape}" for o in sorted(objs, key=lambda o: o.cell)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _question(objs: list[Obj], task: str, rng: np.random.Generator, pairs) -> tuple[str, str]:
    o = objs[int(rng.integers(len(objs)))]
    if task == "colour":
        return f"what colour is the {o.shape}?", o.colour
    if task == "shape":
        return f"what shape is the {o.colour} object?", o.shape
    if task == "count":
        return "how many shapes are there?", COUNT_WORDS[len(objs)]
    if task == "position":
        return f"is the {o.colour} {o.shape} on the left or the right?", "left" if o.cell % 2 == 0 else "right"
    if task == "exists":
        present = {(x.colour, x.shape) for x in objs}
        if rng.random() < 0.5:
            return f"is there a {o.colour} {o.shape}?", "yes"
        absent = [p for p in pairs if p not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        return f"is there a {c} {s}?", "no"
    return CAPTION_PROMPT, caption(objs)


def generate(domain: str, n: int, seed: int, *, teacher: bool = False, size: int = 32,
             tasks: tuple[str, ...] = TASKS) -> list[Sample]:
    """``n`` samples of ``domain``. ``teacher=True`` draws from all colour/shape pairs."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")
    rng = np.random.default_rng([seed, DOMAINS.index(domain), int(teacher)])
    pairs = _pairs_for(domain, teacher)
    out = []
    for i in range(n):
        objs = _sample_objects(rng, pairs, int(rng.integers(1, 4)))
        task = tasks[i % len(tasks)]
        q, a = _question(objs, task, rng, pairs)
        out.append(Sample(render(objs, domain, rng, size), q, a, domain, task))
    return out


def generate_mix(n: int, seed: int, weights: dict[str, float], *, teacher: bool, size: int = 32) -> list[Sample]:
    """A mixture of domains, ``weights`` normalised; order interleaved deterministically."""
    total = sum(weights.values())
    parts = [generate(d, round(n * w / total), seed, teacher=teacher, size=size) for d, w in weights.items()]
    rng = np.random.default_rng(seed)
    flat = [s for p in parts for s in p]
    return [flat[i] for i in rng.permutation(len(flat))]
