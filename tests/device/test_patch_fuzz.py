"""Fuzz the device's downlink: >= 10,000 mutated real patches through verify/apply (issue 11).

A seeded generator mutates a genuine patch for the device's own model: truncations, bit flips,
byte overwrites in the header, digit edits inside the entry table, and well-formed patches with
wrong fields written by the real writer (other rows, tensors, types, roles, base hashes).  Each
goes through the parse/verify path in-process (``read_patch`` + ``plan_patch``, the first half of
``VersionStore.apply_patch``) and through the signature check; a sample goes through the store's
full ``apply_patch``.  Zero crashes (only the one-line PatchError / SignatureError), zero state
changes (the store is byte-identical), and no mutant ever verifies under the signature.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from device.contracts.config import load_settings
from device.contracts.patch_format import PatchError, read_patch, write_patch
from device.contracts.signing import SignatureError, public_key_b64, sign_patch, verify_patch
from device.models import open_device_model
from device.patch import plan_patch
from device.versions import VersionError
from fakecloud import RID, real_patch

N_BYTES = 9_000  # byte-level mutants through the in-process verify path
N_SEMANTIC = 1_000  # well-formed patches with wrong fields (written by the real writer)
N_STORE = 150  # of all mutants, this many also go through VersionStore.apply_patch


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def byte_mutant(rng: random.Random, data: bytes, header_end: int) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # truncation
        return bytes(b[:rng.randrange(len(b))])
    if kind == 1:  # bit flips anywhere
        for _ in range(rng.randint(1, 8)):
            k = rng.randrange(len(b))
            b[k] ^= 1 << rng.randrange(8)
    elif kind == 2:  # header bytes overwritten (counts, lengths, types, keys)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(header_end)] = rng.randrange(256)
    elif kind == 3:  # digits inside the entry table / hashes edited in place
        digits = [m.start() for m in re.finditer(rb"[0-9]", bytes(b[:header_end]))]
        for _ in range(rng.randint(1, 3)):
            b[rng.choice(digits)] = ord(str(rng.randrange(10)))
    else:  # garbage appended or spliced
        k = rng.randrange(len(b))
        b[k:k] = rng.randbytes(rng.randint(1, 64))
    return bytes(b)


def semantic_mutant(rng: random.Random, patch, other_tensors: list[tuple[str, T, tuple]], out: Path) -> Path:
    entries, payloads = list(patch.entries), list(patch.payloads)
    i = rng.randrange(len(entries))
    e, meta = entries[i], patch.meta
    kind = rng.randrange(5)
    if kind == 0 and other_tensors:  # another tensor (same or other geometry)
        name, typ, shape = rng.choice(other_tensors)
        e = dataclasses.replace(e, tensor=name)
    elif kind == 1:  # the mmproj file instead of the model
        e = dataclasses.replace(e, role="mmproj")
    elif kind == 2:  # another base hash
        meta = dataclasses.replace(meta, base_hash=rng.randbytes(32).hex())
    elif kind == 3:  # another type, payload resized to match
        typ = rng.choice([t for t in (T.F16, T.Q8_0, T.Q4_0, T.F32) if t != e.ggml_type])
        try:
            e = type(e).for_rows(e.role, e.tensor, typ, e.shape, e.row_start, e.row_count)
        except ValueError:
            e = dataclasses.replace(e, tensor=e.tensor + ".x")
        payloads[i] = rng.randbytes(e.nbytes)
    else:  # shape that does not match the device's tensor
        shape = tuple(d * rng.choice((2, 3)) for d in e.shape)
        e = type(e).for_rows(e.role, e.tensor, e.ggml_type, shape, e.row_start, e.row_count)
        payloads[i] = rng.randbytes(e.nbytes)
    entries[i] = e
    write_patch(out, list(zip(entries, payloads)), dataclasses.replace(meta, target_hash=""))
    return out


def verify_refuses(path: Path, files: dict, key: str, signature: str, sha_signed: str, model_id: str) -> str:
    """One mutant through the device's checks: the genuine patch's signature replayed on it, and
    the parse/verify path.  Returns which one refused; any other exception fails the test."""
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        verify_patch(key, signature, sha, RID, model_id)
        signed = True
    except SignatureError:
        signed = False
    assert not signed or sha == sha_signed  # no changed byte ever verifies
    try:
        plan_patch(read_patch(path), files)
    except PatchError as e:
        assert "\n" not in str(e)
        return "verify"
    return "signature only"  # a harmless field (note, parent) changed: the signature refuses it


def test_ten_thousand_mutated_patches_never_crash_or_change_state(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CDCCA_CLOUD_KEY", raising=False)
    settings = load_settings()
    model = open_device_model(settings)
    store, files = model.store, model.files()
    good = real_patch(model.model, tmp_path / "good.gguf")
    patch = read_patch(tmp_path / "good.gguf")
    header_end = good.index(patch.payloads[0][:16]) if patch.payloads[0][:16] in good else len(good) // 2
    key = Ed25519PrivateKey.generate()
    sha_good = hashlib.sha256(good).hexdigest()
    sig_good = sign_patch(key, sha_good, RID, model.id)
    pub = public_key_b64(key)
    from gguf import GGUFReader

    others = [(t.name, t.tensor_type, tuple(int(x) for x in t.shape)) for t in GGUFReader(model.model).tensors]
    before = tree(store.dir)
    rng = random.Random(20261202)
    outcomes: dict[str, int] = {}
    store_checked = 0
    path = tmp_path / "mutant.gguf"
    t0 = time.perf_counter()
    total = N_BYTES + N_SEMANTIC
    for i in tqdm(range(total), desc="patch fuzz", unit="patch", mininterval=5):
        if i < N_BYTES:
            path.write_bytes(byte_mutant(rng, good, header_end))
        else:
            semantic_mutant(rng, patch, others, path)
        how = verify_refuses(path, files, pub, sig_good, sha_good, model.id)
        outcomes[how] = outcomes.get(how, 0) + 1
        if i % (total // N_STORE) == 0 and how == "verify":
            with pytest.raises((PatchError, VersionError)):
                store.apply_patch(path)
            store_checked += 1
    elapsed = time.perf_counter() - t0
    print(f"\n{total} mutants in {elapsed:.1f} s ({elapsed / total * 1e3:.2f} ms each): {outcomes}; "
          f"{store_checked} through VersionStore.apply_patch")
    assert sum(outcomes.values()) >= 10_000 and store_checked >= N_STORE // 2
    assert tree(store.dir) == before  # zero state changes
    assert store.current().id == "v0" and [v.id for v in store.list()] == ["v0"]
    store.apply_patch(tmp_path / "good.gguf")  # and the genuine patch still applies afterwards
    assert store.current().id == "v1"
