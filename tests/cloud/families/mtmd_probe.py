"""Test helper: what libmtmd itself makes of a prompt + image (token ids with -1 at image
positions, and each image chunk's projected embeddings). Used to check the cloud's layout."""
from __future__ import annotations

import ctypes

import numpy as np


def mtmd_chunks(model_gguf, mmproj_gguf, prompt: str, image: np.ndarray | None, add_special: bool = True):
    import llama_cpp
    from llama_cpp import mtmd_cpp

    llm = llama_cpp.Llama(str(model_gguf), n_ctx=512, verbose=False, n_threads=1)
    p = mtmd_cpp.mtmd_context_params_default()
    p.use_gpu, p.print_timings, p.n_threads, p.warmup = False, False, 1, False
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_gguf).encode(), llm.model, p)
    assert ctx, "libmtmd could not load the mmproj"
    ids, embds = [], []
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    text = prompt.encode()
    inp = mtmd_cpp.mtmd_input_text(text, len(text), add_special, True)
    bmps = []
    try:
        if image is not None:
            rgb = np.ascontiguousarray(image, dtype=np.uint8)
            buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
            bmps.append(mtmd_cpp.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], buf))
        arr = (mtmd_cpp.mtmd_bitmap_p_ctypes * max(1, len(bmps)))(*bmps)
        assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), arr, len(bmps)) == 0
        n_embd = llm.n_embd()
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            ch = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(ch) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                ids += [ptr[j] for j in range(n.value)]
            else:
                n_tok = mtmd_cpp.mtmd_input_chunk_get_n_tokens(ch)
                assert mtmd_cpp.mtmd_encode_chunk(ctx, ch) == 0
                e = mtmd_cpp.mtmd_get_output_embd(ctx)
                embds.append(np.ctypeslib.as_array(e, shape=(n_tok * n_embd,)).reshape(n_tok, n_embd).copy())
                ids += [-1] * n_tok
    finally:
        for b in bmps:
            mtmd_cpp.mtmd_bitmap_free(b)
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_free(ctx)
        llm.close()
    return ids, embds
