"""Quantize float32 rows to any GGUF type the device may hold, with ggml's own quantizer.

gguf-py quantizes only the simple types (F16, Q8_0, Q4_0 ...); the files people download are
Q4_K_M / Q5_K_M mixes of Q4_K, Q5_K and Q6_K. Rather than re-implement K-quant search, we call
``ggml_quantize_chunk`` in the ``libggml-base`` shared library that the llama-cpp-python wheel
already ships (ctypes, RTLD_GLOBAL): the same code llama-quantize runs, so the bytes equal what
llama-quantize would write for those weights (measured identical on every tensor of a Q4_K_M).

IQ types (and anything whose ggml quantizer wants an importance matrix) are refused by name: DWC
has no imatrix, and an imatrix-free IQ re-quantization would silently degrade the rows it touches.
Torch-free (numpy + ctypes). ggml aborts the whole process on a bad argument (GGML_ASSERT), so
every argument is checked here first.
"""
from __future__ import annotations

import ctypes
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
# the types re-quantized here; every one needs no importance matrix in ggml
SUPPORTED: frozenset[GGMLQuantizationType] = frozenset({
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
})
_MIN_ROWS_PER_THREAD = 64


class QuantError(ValueError):
    """This type or shape cannot be quantized here; the message (one line) names the type."""


def _lib_path() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise QuantError("llama-cpp-python is not installed: its libggml-base holds the quantizer")
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib / name).is_file():
            return lib / name
    raise QuantError(f"{lib}: no libggml-base shared library in the llama-cpp-python wheel")


@lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_lib_path()), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    for t in SUPPORTED:  # the enum must mean the same in gguf-py and this build of ggml
        name = lib.ggml_type_name(int(t)).decode()
        if name.lower() != t.name.lower():
            raise QuantError(f"ggml type {int(t)} is {name!r} in libggml-base but {t.name} in gguf-py")
    return lib


def supported(ggml_type: GGMLQuantizationType | int) -> bool:
    return GGMLQuantizationType(ggml_type) in SUPPORTED


def check_type(ggml_type: GGMLQuantizationType | int) -> GGMLQuantizationType:
    t = GGMLQuantizationType(ggml_type)
    if t in SUPPORTED:
        return t
    if t.name.startswith("IQ"):
        raise QuantError(f"{t.name} is an importance-matrix type: cdcca refuses to re-quantize it without one "
                         "(ship the rows as another type, or quantize the device model to a K-quant)")
    raise QuantError(f"cannot re-quantize {t.name} rows (supported: {', '.join(sorted(x.name for x in SUPPORTED))})")


def row_size(ggml_type: GGMLQuantizationType | int, n_per_row: int) -> int:
    """Bytes of one row, as ggml computes it."""
    t = check_type(ggml_type)
    block = GGML_QUANT_SIZES[t][0]
    if n_per_row <= 0 or n_per_row % block:
        raise QuantError(f"{t.name} rows need a multiple of {block} values, got {n_per_row}")
    return int(_ggml().ggml_row_size(int(t), n_per_row))


def quantize(rows: np.ndarray, ggml_type: GGMLQuantizationType | int, threads: int = 1) -> bytes:
    """Quantize ``rows`` ([..., n_per_row] floats) to ``ggml_type`` bytes, row after row.

    Every ggml block lies inside one row, so rows quantize independently: a subset of rows gives
    the same bytes as the whole tensor sliced. ``threads`` splits rows over threads (ctypes drops
    the GIL during the call)."""
    t = check_type(ggml_type)
    src = np.ascontiguousarray(rows, dtype=np.float32)
    n_per_row = int(src.shape[-1]) if src.ndim else 0
    per_row = row_size(t, n_per_row)
    src = src.reshape(-1, n_per_row)
    nrows = src.shape[0]
    dst = np.empty(nrows * per_row, dtype=np.uint8)
    lib = _ggml()

    def run(a: int, b: int) -> None:
        got = lib.ggml_quantize_chunk(int(t), src[a:b].ctypes.data, dst[a * per_row:].ctypes.data, 0, b - a,
                                      n_per_row, None)
        if got != (b - a) * per_row:
            raise QuantError(f"ggml_quantize_chunk wrote {got} bytes for {b - a} {t.name} rows, expected {(b - a) * per_row}")

    n_workers = max(1, min(threads, nrows // _MIN_ROWS_PER_THREAD))
    if n_workers == 1:
        run(0, nrows)
    else:
        cuts = np.linspace(0, nrows, n_workers + 1).astype(int)
        with ThreadPoolExecutor(n_workers) as pool:
            list(pool.map(run, cuts[:-1], cuts[1:]))
    return dst.tobytes()


quantize.supports = SUPPORTED  # what make_patch_from_arrays asks a quantizer before using it
