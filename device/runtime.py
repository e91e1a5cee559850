"""The device runtime: a GGUF text model (+ optional mmproj) in llama.cpp, with a decode loop
that sees the FULL next-token logits of every step.

We drive libmtmd chunk by chunk instead of using a chat handler so that (1) the image's projected
embeddings -- the visual tokens UTS ranks -- are read straight from the encoder, and (2) every
decode step hands the full-vocabulary logits (a zero-copy numpy view) to the uncertainty hook:
exact entropy at almost no cost, with no ``logits_all`` memory and no top-k truncation.
"""
from __future__ import annotations

import ctypes
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from device.chat_prompt import ChatPrompt, PromptConfig, Rendered
from device.llama_setup import (  # noqa: F401  (ModelError is part of this module's API)
    GGML_TYPES, ModelError, check_file, no_weight_repacking, silence_llama_logs, vision_geometry,
)
from device.uncertainty import TokenUncertainty

LogitsHook = Callable[[np.ndarray], None]


@dataclass
class RuntimeConfig:
    model_path: Path
    mmproj_path: Path | None = None
    n_threads: int = 2
    n_ctx: int = 512
    n_batch: int = 512
    seed: int = 0
    # llama.cpp's "extra buffer types" repack Q4_0/Q8_0 weights for AMX/AVX-512 kernels; on AMX
    # CPUs 0.3.36 segfaults on the first decode of such models, so repacking is off unless asked.
    repack: bool = os.environ.get("CDCCA_LLAMA_REPACK", "0") == "1"
    # KV cache precision: "f16" is llama.cpp's default (half the cache memory); "f32" makes the
    # device bit-comparable with the torch twin (used by the parity tests and evaluation).
    kv_cache: str = "f16"
    # how questions become prompts: the GGUF's own chat template, else the stated fallback
    prompt: PromptConfig = field(default_factory=PromptConfig)
    max_tokens: int = 16  # default answer budget; an answer cut there is marked ``truncated``


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    pieces: list[str]
    visual_embeddings: np.ndarray | None  # [n_visual_tokens, n_embd] float32, as fed to the decoder
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    extra: dict = field(default_factory=dict)
    truncated: bool = False  # stopped by max_tokens, not by an end-of-generation token
    prompt_kind: str = ""  # ChatPrompt.kind: template / toy / fallback:<name>
    decode_cpu_s: float = 0.0  # CPU time of this thread in the decode loop: stable on a shared machine

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.decode_s if self.decode_s > 0 else float("inf")


class Runtime:
    """A loaded device model. Not thread-safe: one generation at a time."""

    def __init__(self, cfg: RuntimeConfig):
        self.cfg = cfg
        self._llama = None
        self._mtmd = None
        self.image_size = self.patch_size = 0  # set by _load when an mmproj is given
        self._load()

    # ------------------------------------------------------------ loading
    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import mtmd_cpp

        silence_llama_logs()
        c = self.cfg
        check_file(Path(c.model_path), "model")
        if c.mmproj_path is not None:
            check_file(Path(c.mmproj_path), "mmproj")
        try:
            with no_weight_repacking(c.repack):
                self._llama = llama_cpp.Llama(model_path=str(c.model_path), n_ctx=c.n_ctx, n_batch=c.n_batch,
                                              n_threads=c.n_threads, n_threads_batch=c.n_threads, seed=c.seed,
                                              type_k=GGML_TYPES[c.kv_cache], type_v=GGML_TYPES[c.kv_cache],
                                              verbose=False)
        except Exception as e:
            raise ModelError(f"{c.model_path}: llama.cpp could not load the model ({str(e).splitlines()[0]})") from None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llama.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self._llama.model)
        if c.mmproj_path is not None:
            p = mtmd_cpp.mtmd_context_params_default()
            p.use_gpu = False
            p.n_threads = c.n_threads
            p.print_timings = False
            p.warmup = False
            p.flash_attn_type = 0  # exact attention for the tiny vision tower (CPU FA casts K/V to f16)
            ctx = mtmd_cpp.mtmd_init_from_file(str(c.mmproj_path).encode(), self._llama.model, p)
            if not ctx:
                self.close()
                raise ModelError(f"{c.mmproj_path}: libmtmd could not load this mmproj for {Path(c.model_path).name} "
                                 "(wrong file, or its projection size does not match the text model)")
            self._mtmd = ctx
            self.image_size, self.patch_size = vision_geometry(Path(c.mmproj_path))
        self.chat = self._chat_prompt()
        self._loaded_stamp = self._stamp()

    def _chat_prompt(self) -> ChatPrompt:
        """The model's own prompt format, read from its GGUF metadata (see device.chat_prompt)."""
        import llama_cpp
        from llama_cpp import mtmd_cpp

        def text(tok: int) -> str:
            return llama_cpp.llama_vocab_get_text(self._vocab, tok).decode("utf-8", "replace") if tok >= 0 else ""

        template = (self._llama.metadata or {}).get("tokenizer.chat_template")
        cp = ChatPrompt(template, text(llama_cpp.llama_vocab_bos(self._vocab)),
                        text(llama_cpp.llama_vocab_eos(self._vocab)), self.cfg.prompt,
                        Path(self.cfg.model_path).name, mtmd_cpp.mtmd_default_marker().decode())
        if cp.notice:
            logging.getLogger("cdcca.runtime").warning(cp.notice)
        return cp

    @property
    def prompt_notice(self) -> str | None:
        """One line when the model has no chat template and a fallback is in use (for the faces)."""
        return self.chat.notice

    def reload(self, model_path: Path | None = None, mmproj_path: Path | None = None, force: bool = False) -> float:
        """Make the current bytes of the model files effective; returns seconds taken.

        When the files are the ones loaded, the text model is memory-mapped (``weights_mapped``),
        its inode and size are unchanged (patched in place, not replaced) and the mmproj is
        untouched, the new bytes are already live: only the KV memory is cleared. Otherwise (or
        with ``force``) the files are closed and loaded again."""
        t = time.perf_counter()
        same = (model_path is None or Path(model_path) == Path(self.cfg.model_path)) and \
            (mmproj_path is None or Path(mmproj_path) == Path(self.cfg.mmproj_path or ""))
        if not force and same and self.weights_mapped and self._stamp() == self._loaded_stamp:
            self._clear_memory()
            return time.perf_counter() - t
        self.close()
        if model_path is not None:
            self.cfg.model_path = Path(model_path)
        if mmproj_path is not None:
            self.cfg.mmproj_path = Path(mmproj_path)
        self._load()
        return time.perf_counter() - t

    def _stamp(self) -> tuple:
        """What an in-place patch leaves unchanged: the text model's inode and size, and the
        mmproj's inode, size and mtime (libmtmd copied its weights at load)."""
        def st(p, full):
            try:
                x = os.stat(p)
            except (OSError, TypeError):
                return None
            return (x.st_ino, x.st_size, x.st_mtime_ns) if full else (x.st_ino, x.st_size)

        return st(self.cfg.model_path, False), st(self.cfg.mmproj_path, True) if self.cfg.mmproj_path else None

    @property
    def weights_mapped(self) -> bool:
        """True when llama.cpp computes straight from the memory-mapped text model (CPU, mmap,
        weights not repacked): bytes patched in place into that file are live without a reload
        (the page cache is the mapping; tested bit-exact against a fresh load)."""
        import llama_cpp

        mode = getattr(self._llama.model_params, "load_mode", None) if self._llama is not None else None
        return mode in (llama_cpp.LLAMA_LOAD_MODE_MMAP, llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK) and not self.cfg.repack

    def refresh(self, roles: tuple[str, ...] = ("model",)) -> float:
        """Make bytes patched in place effective at the least cost; returns seconds taken.
        Text-model patches are already live when ``weights_mapped`` (only the KV memory is
        cleared); libmtmd copies the mmproj's weights, so an mmproj patch (or repacked weights)
        needs a reload."""
        if "mmproj" in roles or not self.weights_mapped:
            return self.reload(force=True)
        t = time.perf_counter()
        self._clear_memory()
        return time.perf_counter() - t

    def close(self) -> None:
        from llama_cpp import mtmd_cpp

        if self._mtmd is not None:
            mtmd_cpp.mtmd_free(self._mtmd)
            self._mtmd = None
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def has_vision(self) -> bool:
        return self._mtmd is not None


    # ------------------------------------------------------------ text helpers
    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        return self._llama.tokenize(text.encode(), add_bos=add_bos, special=special)

    def render(self, question: str, with_image: bool = False) -> Rendered:
        return self.chat.render(question, with_image)

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of a text-only turn's prompt, exactly as prefill feeds them."""
        r = self.render(question, False)
        return self.tokenize(r.text, add_bos=r.add_special, special=r.parse_special)

    def piece(self, token: int) -> str:
        import llama_cpp

        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # ------------------------------------------------------------ prefill
    def _bitmap(self, rgb: np.ndarray):
        from llama_cpp import mtmd_cpp

        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w, _ = rgb.shape
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bmp = mtmd_cpp.mtmd_bitmap_init(w, h, buf)
        if not bmp:
            raise ModelError("libmtmd could not create a bitmap from the image")
        return bmp

    def prefill(self, question: str, image: np.ndarray | None) -> tuple[int, np.ndarray | None, list[int]]:
        """Evaluate the prompt; returns (n_past, visual embeddings or None, prompt token ids)."""
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._clear_memory()
        if image is not None and self._mtmd is None:
            raise ModelError("an image was given but no mmproj is loaded (text-only model)")
        if image is None:
            ids = self.prompt_ids(question)
            self._decode_tokens(ids, 0)
            return len(ids), None, ids
        r = self.render(question, True)
        text = r.text.encode()
        inp = mtmd_cpp.mtmd_input_text(text, len(text), r.add_special, r.parse_special)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        bmp = self._bitmap(image)
        try:
            arr = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bmp)
            if mtmd_cpp.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(inp), arr, 1) != 0:
                raise ModelError("libmtmd failed to tokenize the prompt")
            n_past, embd, ids = 0, None, []
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                kind = mtmd_cpp.mtmd_input_chunk_get_type(chunk)
                if kind == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    toks = [ptr[j] for j in range(n.value)]
                    ids += toks
                    n_past = self._decode_tokens(toks, n_past)
                else:
                    if mtmd_cpp.mtmd_encode_chunk(self._mtmd, chunk) != 0:
                        raise ModelError("libmtmd failed to encode the image")
                    n_tok = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                    ptr = mtmd_cpp.mtmd_get_output_embd(self._mtmd)
                    embd = np.ctypeslib.as_array(ptr, shape=(n_tok * self.n_embd,)).reshape(n_tok, self.n_embd).copy()
                    new_past = llama_cpp.llama_pos(0)
                    if mtmd_cpp.mtmd_helper_decode_image_chunk(self._mtmd, self._llama.ctx, chunk, ptr, n_past, 0,
                                                               self.cfg.n_batch, ctypes.byref(new_past),
                                                               mtmd_cpp.mtmd_helper_post_decode_callback(), None) != 0:
                        raise ModelError("llama.cpp failed to decode the image embeddings")
                    n_past = new_past.value
            return n_past, embd, ids
        finally:
            mtmd_cpp.mtmd_bitmap_free(bmp)
            mtmd_cpp.mtmd_input_chunks_free(chunks)

    def _clear_memory(self) -> None:
        import llama_cpp

        self._llama.reset()
        mem = llama_cpp.llama_get_memory(self._llama.ctx)
        if mem is not None:
            llama_cpp.llama_memory_clear(mem, True)

    def _decode_tokens(self, toks: list[int], n_past: int) -> int:
        import llama_cpp

        if n_past + len(toks) > self.cfg.n_ctx:
            raise ModelError(f"prompt too long for the context ({n_past + len(toks)} > n_ctx={self.cfg.n_ctx})")
        arr = (llama_cpp.llama_token * len(toks))(*toks)
        batch = llama_cpp.llama_batch_get_one(arr, len(toks))
        if llama_cpp.llama_decode(self._llama.ctx, batch) != 0:
            raise ModelError("llama_decode failed")
        return n_past + len(toks)

    def logits(self) -> np.ndarray:
        """Zero-copy view of the last position's full-vocabulary logits (valid until next decode)."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self._llama.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # ------------------------------------------------------------ generation
    def generate(self, question: str, image: np.ndarray | None = None, max_tokens: int | None = None,
                 logits_hook: LogitsHook | None = None, on_token: Callable[[int, str], None] | None = None) -> Generation:
        """Greedy decode until an end-of-generation token of the model (EOS, EOT, <|im_end|>...),
        or ``max_tokens`` (default ``cfg.max_tokens``) -- then the answer is marked ``truncated``.
        ``logits_hook`` sees each step's full logits before the token is chosen; if it returns a
        ``TokenUncertainty`` (the recorder does), its ``token_id`` -- the argmax of the logits as
        the hook leaves them -- is the greedy choice."""
        max_tokens = self.cfg.max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        t0 = time.perf_counter()
        n_past, embd, ids = self.prefill(question, image)
        t1, c1 = time.perf_counter(), time.thread_time()
        out, pieces, truncated = [], [], True
        for _ in range(max_tokens):
            lg = self.logits()
            seen = logits_hook(lg) if logits_hook is not None else None
            # an UncertaintyRecorder already found the argmax: one pass over the vocabulary saved
            tok = seen.token_id if isinstance(seen, TokenUncertainty) else int(lg.argmax())
            if self.is_eog(tok):
                truncated = False
                break
            if n_past >= self.cfg.n_ctx:
                break  # the context is full: as cut as a max_tokens stop
            out.append(tok)
            pieces.append(self.piece(tok))
            if on_token is not None:
                on_token(tok, pieces[-1])
            n_past = self._decode_tokens([tok], n_past)
        t2, c2 = time.perf_counter(), time.thread_time()
        return Generation("".join(pieces).strip(), out, pieces, embd, len(ids) + (0 if embd is None else len(embd)),
                          t1 - t0, t2 - t1, truncated=truncated, prompt_kind=self.chat.kind, decode_cpu_s=c2 - c1)


def reuse_or_open(runtime: Runtime | None, cfg: RuntimeConfig):
    """A context giving ``runtime`` itself, left open (a caller that already loaded these files
    measures several things on one load), else a new ``Runtime(cfg)`` closed on exit."""
    return nullcontext(runtime) if runtime is not None else Runtime(cfg)


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))
