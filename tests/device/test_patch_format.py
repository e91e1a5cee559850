"""The patch file contract: geometry, exact re-quantization, round trip, and refusal of bad files."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from cloud.patch_build import QUANTIZABLE, UnsupportedQuantType, make_patch_from_arrays, quantize_rows
from device.contracts import patch_format as pf
from device.contracts.patch_format import PatchEntry, PatchError, PatchMeta, read_patch, rows_bytes, write_patch

# torch-order shapes ([out, in]); non-square ones catch any ggml/torch order mix-up
LAYOUT = {
    "blk.0.attn_q.weight": ((64, 64), T.F32),
    "blk.0.attn_k.weight": ((64, 64), T.F16),
    "blk.0.attn_v.weight": ((64, 64), T.Q8_0),
    "blk.0.attn_output.weight": ((64, 64), T.Q4_0),
    "blk.0.ffn_up.weight": ((96, 64), T.Q4_1),
    "blk.0.ffn_down.weight": ((64, 96), T.Q5_0),
    "blk.0.ffn_gate.weight": ((96, 64), T.Q5_1),
    "output.weight": ((48, 64), T.BF16),
    "blk.0.attn_norm.weight": ((64,), T.F32),
}


def weights(seed: int = 0) -> dict[str, tuple[np.ndarray, T]]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s).astype(np.float32), t) for n, (s, t) in LAYOUT.items()}


def write_gguf(path: Path, ws: dict[str, tuple[np.ndarray, T]], arch: str = "llama") -> Path:
    """A fresh GGUF the way a converter writes it: quantize the whole tensor with gguf-py."""
    w = GGUFWriter(path, arch)
    for name, (a, t) in ws.items():
        q = quantize(a, t)
        w.add_tensor(name, q, raw_dtype=t if q.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def edit(ws: dict, seed: int = 1) -> tuple[dict, dict]:
    """New weights with a few rows changed per tensor, and the (full array, ranges) DWC would send."""
    rng = np.random.default_rng(seed)
    new, upd = {}, {}
    for name, (a, t) in ws.items():
        b = a.copy()
        if b.ndim == 1:
            b += 0.25
            upd[name] = (b, None)
        else:
            b[3:7] += rng.standard_normal(b[3:7].shape).astype(np.float32)
            b[-1] *= -1
            upd[name] = (b, [(3, 4), (b.shape[0] - 1, 1)])
        new[name] = (b, t)
    return new, upd


def apply_in_place(model: Path, patch: pf.Patch) -> None:
    """The field notes' method: GGUFReader(r+) memmap, write the new bytes into tensor data."""
    r = GGUFReader(model, "r+")
    tensors = {t.name: t for t in r.tensors}
    for e, payload in zip(patch.entries, patch.payloads):
        start = tensors[e.tensor].data_offset + e.byte_offset
        r.data[start:start + e.nbytes] = np.frombuffer(payload, np.uint8)
    r.data.flush()
    del r


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, dict]:
    ws = weights()
    return write_gguf(tmp_path / "base.gguf", ws), ws


# ------------------------------------------------------------ geometry and quantization

def test_rows_bytes_match_reader_layout(base):
    path, ws = base
    for t in GGUFReader(path).tensors:
        shape = tuple(int(x) for x in t.shape)
        assert tuple(reversed(shape)) == ws[t.name][0].shape  # reader shape is ggml order
        raw = t.data.reshape(-1).view(np.uint8)
        n = pf.n_rows(shape)
        off, nbytes = rows_bytes(t.tensor_type, shape, n - 1, 1)
        expect = quantize_rows(ws[t.name][0].reshape(-1, shape[0])[n - 1:], t.tensor_type)
        assert raw[off:off + nbytes].tobytes() == expect
        assert rows_bytes(t.tensor_type, shape, 0, n) == (0, t.n_bytes)


def test_rows_bytes_bounds():
    with pytest.raises(ValueError, match="outside"):
        rows_bytes(T.Q8_0, (64, 10), 8, 3)
    with pytest.raises(ValueError, match="block size"):
        rows_bytes(T.Q4_0, (48, 10), 0, 1)


@pytest.mark.parametrize("t", sorted(QUANTIZABLE, key=int))
def test_quantize_rows_equals_slice_of_whole_tensor(t):
    a = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    whole = np.ascontiguousarray(quantize(a, t)).view(np.uint8).reshape(16, -1)
    assert quantize_rows(a[5:9], t) == whole[5:9].tobytes()


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K, T.IQ2_XXS, T.IQ4_NL])
def test_k_and_iq_quants_are_unsupported(t):
    with pytest.raises(UnsupportedQuantType, match=t.name):
        quantize_rows(np.zeros((1, 256), np.float32), t)


# ------------------------------------------------------------ build / write / read

def test_make_patch_then_apply_is_byte_identical_to_fresh_file(base, tmp_path):
    path, ws = base
    new, upd = edit(ws)
    fresh = write_gguf(tmp_path / "fresh.gguf", new)
    build = make_patch_from_arrays(path, upd, tmp_path / "p.gguf", round_id="r7", parent_version="v0",
                                   note="test", data_hashes=True)
    patch = read_patch(build.path)
    assert patch.meta.round_id == "r7" and patch.meta.parent_version == "v0" and patch.meta.note == "test"
    assert set(patch.meta.base_data_hashes) == {"model"}
    assert patch.payload_bytes == build.payload_bytes < os.path.getsize(path) // 4
    model = Path(shutil.copy(path, tmp_path / "model.gguf"))
    apply_in_place(model, patch)
    assert model.read_bytes() == fresh.read_bytes()
    assert pf.sha256_concat(patch.payloads) == patch.meta.target_hash


def test_unchanged_rows_are_dropped(base, tmp_path):
    path, ws = base
    a = ws["blk.0.attn_v.weight"][0].copy()
    a[10] += 1.0  # rows 8..11 selected, only row 10 changes
    build = make_patch_from_arrays(path, {"blk.0.attn_v.weight": (a, [(8, 4)])}, tmp_path / "p.gguf", round_id="r")
    assert [(e.row_start, e.row_count) for e in build.entries] == [(10, 1)] and build.unchanged_rows == 3
    nothing = make_patch_from_arrays(path, {"blk.0.attn_v.weight": (ws["blk.0.attn_v.weight"][0], None)},
                                     tmp_path / "q.gguf", round_id="r")
    assert nothing.path is None and not (tmp_path / "q.gguf").exists()


def test_new_array_must_be_in_torch_order(base, tmp_path):
    path, ws = base
    a = ws["blk.0.ffn_up.weight"][0]
    with pytest.raises(ValueError, match="torch order"):
        make_patch_from_arrays(path, {"blk.0.ffn_up.weight": (a.T.copy(), None)}, tmp_path / "p.gguf", round_id="r")


def test_unsupported_tensor_type_raises_or_is_skipped(tmp_path):
    w = GGUFWriter(tmp_path / "k.gguf", "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 144), np.uint8), raw_dtype=T.Q4_K)  # 4 rows x 256
    w.add_tensor("blk.0.attn_k.weight", quantize(np.ones((4, 64), np.float32), T.F16))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    upd = {"blk.0.attn_q.weight": (np.ones((4, 256), np.float32), None),
           "blk.0.attn_k.weight": (np.full((4, 64), 2.0, np.float32), [(1, 2)])}
    with pytest.raises(UnsupportedQuantType, match="Q4_K"):
        make_patch_from_arrays(tmp_path / "k.gguf", upd, tmp_path / "p.gguf", round_id="r")
    build = make_patch_from_arrays(tmp_path / "k.gguf", upd, tmp_path / "p.gguf", round_id="r",
                                   skip_unsupported=True)
    assert build.skipped == ("model:blk.0.attn_q.weight (Q4_K)",) and len(build.entries) == 1


def test_write_read_round_trip(tmp_path):
    e1 = PatchEntry.for_rows("model", "blk.0.attn_v.weight", T.Q8_0, (64, 64), 2, 3)
    e2 = PatchEntry.for_rows("mmproj", "v.blk.0.attn_q.weight", T.F16, (64, 32), 0, 1)
    assert (e1.byte_offset, e1.nbytes) == (2 * 68, 3 * 68)
    items = [(e1, bytes(range(256))[:e1.nbytes]), (e2, b"\x07" * e2.nbytes)]
    meta = write_patch(tmp_path / "p.gguf", items, PatchMeta(round_id="r1", base_hash="ab" * 32, note="n"))
    p = read_patch(tmp_path / "p.gguf")
    assert p.meta == meta and p.entries == (e1, e2) and p.payloads == tuple(b for _, b in items)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file


def test_write_refuses_bad_input(tmp_path):
    e = PatchEntry.for_rows("model", "x", T.F32, (8, 8), 0, 2)
    meta = PatchMeta(round_id="r", base_hash="00" * 32)
    with pytest.raises(PatchError, match="expected 64"):
        write_patch(tmp_path / "p.gguf", [(e, b"\0" * 63)], meta)
    overlap = PatchEntry.for_rows("model", "x", T.F32, (8, 8), 1, 2)
    with pytest.raises(PatchError, match="overlapping"):
        write_patch(tmp_path / "p.gguf", [(e, b"\0" * 64), (overlap, b"\0" * 64)], meta)
    lie = dataclasses.replace(e, byte_offset=4)
    with pytest.raises(PatchError, match="do not match rows"):
        write_patch(tmp_path / "p.gguf", [(lie, b"\0" * 64)], meta)
    with pytest.raises(PatchError, match="no entries"):
        write_patch(tmp_path / "p.gguf", [], meta)


# ------------------------------------------------------------ refusing foreign / corrupt files

def craft(path: Path, entries: list[dict], payloads: list[bytes], **keys) -> Path:
    """Write a patch-shaped GGUF by hand, bypassing write_patch's checks (to feed read_patch lies)."""
    w = GGUFWriter(path, keys.pop("arch", pf.ARCH))
    w.add_uint32(pf.K_VERSION, keys.pop("version", 1))
    vals = {pf.K_ROUND: "r", pf.K_PARENT: "", pf.K_BASE_HASH: "00" * 32,
            pf.K_TARGET_HASH: pf.sha256_concat(payloads), pf.K_DATA_HASHES: "{}", pf.K_NOTE: "",
            pf.K_ENTRIES: json.dumps(entries), **keys}
    for k, v in vals.items():
        if v is not None:
            w.add_key_value(k, v, GGUFValueType.STRING)
    for i, b in enumerate(payloads):
        w.add_tensor(f"p.{i}", np.frombuffer(b, np.int8))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    return path


GOOD = PatchEntry.for_rows("model", "blk.0.attn_v.weight", T.Q8_0, (64, 64), 0, 2).to_json()


@pytest.mark.parametrize("case, match", [
    ("empty", "not a readable GGUF"),
    ("random", "not a readable GGUF"),
    ("model_gguf", "not a cdcca patch"),
    ("version", "format version 2"),
    ("missing_key", "missing key cdcca.patch.base_hash"),
    ("bad_json", "corrupt patch"),
    ("rows_out_of_bounds", "outside"),
    ("offset_lie", "do not match rows"),
    ("payload_short", "expected 136"),
    ("payload_flipped", "do not match target_hash"),
    ("no_op", "changes nothing"),
    ("unknown_type", "unknown ggml type"),
])
def test_read_patch_refuses(tmp_path, base, case, match):
    p = tmp_path / "bad.gguf"
    good = bytes(136)
    if case == "empty":
        p.write_bytes(b"")
    elif case == "random":
        p.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "model_gguf":
        p = base[0]
    elif case == "version":
        craft(p, [GOOD], [good], version=2)
    elif case == "missing_key":
        craft(p, [GOOD], [good], **{pf.K_BASE_HASH: None})
    elif case == "bad_json":
        craft(p, [GOOD], [good], **{pf.K_ENTRIES: "[{"})
    elif case == "rows_out_of_bounds":
        craft(p, [{**GOOD, "row_start": 63}], [good])
    elif case == "offset_lie":
        craft(p, [{**GOOD, "byte_offset": 4}], [good])
    elif case == "payload_short":
        craft(p, [GOOD], [good[:-2]])
    elif case == "payload_flipped":
        craft(p, [GOOD], [good], **{pf.K_TARGET_HASH: pf.sha256_concat([b"x"])})
    elif case == "no_op":
        craft(p, [GOOD], [good], **{pf.K_BASE_HASH: pf.sha256_concat([good])})
    elif case == "unknown_type":
        craft(p, [{**GOOD, "type": "Q9_9"}], [good])
    with pytest.raises(PatchError, match=match) as err:
        read_patch(p)
    assert "\n" not in str(err.value) and str(p) in str(err.value)


def test_every_truncation_is_refused(tmp_path, base):
    path, ws = base
    _, upd = edit(ws)
    built = make_patch_from_arrays(path, upd, tmp_path / "p.gguf", round_id="r").path
    good = built.read_bytes()
    last = GGUFReader(built).tensors[-1]
    end = last.data_offset + last.n_bytes  # bytes after this are alignment padding only
    cut = tmp_path / "cut.gguf"
    for n in sorted({*range(0, 64, 7), *range(64, end, max(1, end // 97)), end - 1}):
        cut.write_bytes(good[:n])
        with pytest.raises(PatchError) as err:
            read_patch(cut)
        assert "\n" not in str(err.value)
