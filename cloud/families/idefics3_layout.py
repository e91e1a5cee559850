"""Idefics3 / SmolVLM inputs laid out exactly as libmtmd lays them out on the device.

Why not the Hugging Face processor: the device runs llama.cpp's libmtmd, and it tiles, orders and
delimits an image differently (for a small image: one tile plus an overview, tiles first, a
``\\n\\n`` token before the overview; HF's processor gives one image without tiles).  A twin trained
or scored in HF's layout sees other positions and other special tokens than the device, so every
cloud-side input of this family goes through this module.  Source read: llama.cpp
``tools/mtmd/mtmd.cpp`` (PROJECTOR_TYPE_IDEFICS3, ``add_media``), ``mtmd-image.cpp``
(``mtmd_image_preprocessor_idefics3``) and ``clip.cpp`` (hparams for idefics3), llama-cpp-python 0.3.36.

What libmtmd does, and so what :func:`layout` returns:

1. The prompt text (the chat template already rendered, the image given as libmtmd's media marker
   ``<__media__>``) is split at the marker; each text piece is tokenized on its own with special
   tokens parsed and nothing added; BOS goes first if the vocabulary says ``add_bos``.
2. The image (uint8 HxWx3) is resized (Pillow-compatible Lanczos) so its longer edge is
   ``clip.vision.preproc_image_size`` (the other edge rounded down, then up to even), resized
   again to the next multiple of ``image_size`` on both sides, cut into ``rows x cols`` tiles of
   ``image_size``; the overview is the refined image resized to one tile.  Pixels are ``/255``
   then ``(x - mean) / std`` per channel, in float32.
3. Tokens: for each tile, row-major, ``<fake_token_around_image><row_R_col_C>`` (R, C from 1,
   tokenized as text) then the tile's image tokens; a ``\\n`` token between rows (none after the
   last); then ``\\n\\n`` ``<fake_token_around_image>`` ``<global-img>``, the overview's image
   tokens, ``<fake_token_around_image>``.  Each tile yields ``(image_size / patch_size / scale)^2``
   tokens (pixel shuffle by ``clip.vision.projector.scale_factor``).

For E6 (training the default in this layout): the vocabulary must hold single tokens whose text is
exactly ``"\\n"``, ``"\\n\\n"``, ``"<fake_token_around_image>"`` and ``"<global-img>"`` (libmtmd looks
them up by piece; a missing one is an error here, a -1 token there), plus ``"<image>"`` for the
placeholder id.  Training pairs: ``layout(...)`` gives ``input_ids`` with ``image_token_id`` at every
image-token position and ``pixel_values`` with the tiles in the order they appear (overview last),
which is exactly what ``Idefics3ForConditionalGeneration(input_ids=..., pixel_values=...)`` consumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

MEDIA_MARKER = "<__media__>"  # libmtmd's default marker (device/contracts/prompt.py has the same)
FAKE, GLOBAL, IMAGE = "<fake_token_around_image>", "<global-img>", "<image>"


@dataclass(frozen=True)
class Geometry:
    """The mmproj's image hyper-parameters that decide the layout (``clip.vision.*`` keys)."""

    image_size: int
    patch_size: int
    scale_factor: int
    longest_edge: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size // self.scale_factor
        return side * side

    @classmethod
    def from_mmproj(cls, reader) -> "Geometry":
        """From an open ``gguf.GGUFReader`` of an idefics3 mmproj."""
        def get(key, default=None):
            f = reader.get_field(key)
            return default if f is None else f.contents()
        size = int(get("clip.vision.image_size"))
        return cls(size, int(get("clip.vision.patch_size")), int(get("clip.vision.projector.scale_factor", 2)),
                   int(get("clip.vision.preproc_image_size", size)),
                   tuple(float(x) for x in get("clip.vision.image_mean")),
                   tuple(float(x) for x in get("clip.vision.image_std")))


class Vocab(Protocol):
    """What the layout needs from a tokenizer: llama.cpp's own (``llama_vocab``) or HF's."""

    add_bos: bool
    bos_id: int

    def tokenize(self, text: str) -> list[int]:
        """``text`` -> ids, special tokens parsed, nothing added (llama_tokenize(..., False, True))."""

    def lookup(self, piece: str) -> int:
        """The id whose piece is exactly ``piece`` (libmtmd's ``lookup_token``); raise if none."""


@dataclass
class Layout:
    """One (image, prompt) as the device sees it: ``input_ids`` with ``image_token_id`` at each
    image-token position, and the tiles (overview last) as normalized float32 [n_tiles, 3, S, S]."""

    input_ids: list[int]
    pixel_values: np.ndarray | None
    grid: tuple[int, int] = (0, 0)  # (rows, cols) of tiles, overview not counted


def _lanczos(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Pillow's Lanczos resize (libmtmd's ``resize_pillow`` is a port of it); same size is a copy."""
    if img.shape[1] == w and img.shape[0] == h:
        return img.copy()
    from PIL import Image

    return np.asarray(Image.fromarray(img, "RGB").resize((w, h), Image.LANCZOS), dtype=np.uint8)


def tiles(image: np.ndarray, geo: Geometry) -> tuple[list[np.ndarray], np.ndarray, tuple[int, int]]:
    """(tiles row-major, overview, (rows, cols)) in uint8, as ``mtmd_image_preprocessor_idefics3``."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if h <= 0 or w <= 0:
        raise ValueError("image has no pixels")
    edge, s = geo.longest_edge, geo.image_size
    aspect = w / h  # C++: double
    if w >= h:
        rw, rh = edge, int(edge / aspect)
        rh += rh % 2
    else:
        rw, rh = int(edge * aspect), edge
        rw += rw % 2
    cols, rows = (rw + s - 1) // s, (rh + s - 1) // s
    refined = _lanczos(_lanczos(image, rw, rh), cols * s, rows * s)
    overview = _lanczos(refined, s, s)
    out = [refined[y * s:(y + 1) * s, x * s:(x + 1) * s] for y in range(rows) for x in range(cols)]
    return out, overview, (rows, cols)


def normalize(tile: np.ndarray, geo: Geometry) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW, ``(x/255 - mean) / std`` in float32 like clip_image_f32."""
    x = tile.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(geo.mean, np.float32)) / np.asarray(geo.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def image_tokens(vocab: Vocab, geo: Geometry, grid: tuple[int, int], image_token_id: int) -> list[int]:
    """The token run libmtmd emits for one image (placeholders where embeddings go)."""
    rows, cols = grid
    fake, glob, nl, nn = (vocab.lookup(p) for p in (FAKE, GLOBAL, "\n", "\n\n"))
    run = [image_token_id] * geo.tokens_per_tile
    ids: list[int] = []
    for y in range(rows):
        for x in range(cols):
            ids += vocab.tokenize(f"{FAKE}<row_{y + 1}_col_{x + 1}>") + run
        if y != rows - 1:
            ids.append(nl)
    return ids + [nn, fake, glob] + run + [fake]


def layout(vocab: Vocab, geo: Geometry, prompt: str, image: np.ndarray | None, image_token_id: int,
           add_special: bool = True) -> Layout:
    """Token ids + tile pixels for ``prompt`` (chat template already rendered, image at ``<__media__>``).

    ``add_special`` is what the device passes to ``mtmd_input_text`` (True unless the template
    already wrote BOS).  Exactly one marker is needed when ``image`` is given, none otherwise.
    """
    n_markers = prompt.count(MEDIA_MARKER)
    if n_markers != (1 if image is not None else 0):
        raise ValueError(f"prompt has {n_markers} media markers for {0 if image is None else 1} image")
    ids: list[int] = [vocab.bos_id] if add_special and vocab.add_bos else []
    pix, grid = None, (0, 0)
    before, _, after = prompt.partition(MEDIA_MARKER)
    if before:
        ids += vocab.tokenize(before)
    if image is not None:
        ts, ov, grid = tiles(image, geo)
        ids += image_tokens(vocab, geo, grid, image_token_id)
        pix = np.stack([normalize(t, geo) for t in ts] + [normalize(ov, geo)])
        if after:
            ids += vocab.tokenize(after)
    return Layout(ids, pix, grid)


class HFVocab:
    """A transformers tokenizer seen as libmtmd sees a vocabulary (for training before a GGUF exists)."""

    def __init__(self, tokenizer, add_bos: bool):
        self.tok, self.add_bos = tokenizer, add_bos
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else -1
        self._pieces: dict[str, int] | None = None

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def lookup(self, piece: str) -> int:
        if self._pieces is None:  # lowest id wins, like libmtmd's linear scan
            self._pieces = {}
            for i in range(len(self.tok)):
                self._pieces.setdefault(self.tok.decode([i], skip_special_tokens=False,
                                                        clean_up_tokenization_spaces=False), i)
        if piece not in self._pieces:
            raise ValueError(f"the vocabulary has no single token {piece!r}, which libmtmd needs for idefics3 images")
        return self._pieces[piece]


class LlamaVocab:
    """llama.cpp's own tokenizer for a GGUF (``vocab_only``: no weights loaded) -- the device's exact ids."""

    def __init__(self, model_gguf: str):
        import llama_cpp

        from device.llama_setup import silence_llama_logs

        silence_llama_logs()  # llama.cpp's load log, on every twin load, says nothing a round needs
        self._llm = llama_cpp.Llama(str(model_gguf), vocab_only=True, verbose=False)
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(self._vocab))
        self._pieces: dict[str, int] | None = None

    def tokenize(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode(), add_bos=False, special=True))

    def lookup(self, piece: str) -> int:
        if self._pieces is None:
            self._pieces = {}
            for i in range(self._llm.n_vocab()):
                p = self._llm.detokenize([i], special=True).decode("utf-8", "replace")
                self._pieces.setdefault(p, i)
        if piece not in self._pieces:
            raise ValueError(f"the vocabulary has no single token {piece!r}, which libmtmd needs for idefics3 images")
        return self._pieces[piece]
