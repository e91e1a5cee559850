"""Issue 14, "data of a round flows forward once", on the cloud: one real round (cloud.round_job
.run_round on the shipped default's Q4_0 pair: teacher labels, AKD, Fisher, DWC, the patch applied
through the device's verification path, device-measured before / after) counting every read of
a GGUF file, every llama.cpp load and every file copy, by wrapping the readers.

What each count is and why it is what it is:

* cdcca's own gguf-py parses: ONE per base file (``DeviceFiles.open``) and one of the patch (the
  device's ``read_patch`` verifying it); none of the new version's files (the patched twin is the
  base twin with the verified rows written in).  Before: 11 (model) + 4 (mmproj) + 7 of the copy.
* transformers' GGUF loader opens the base text model three times inside ``from_pretrained``
  (config, weights, tokenizer); it takes a path, not a reader, so those stay -- once per round.
* ``gguf_index.read_index`` (the device's own header reader, ~0.1 s even for a real vocabulary):
  ``plan_patch`` reads each patched file of the new version once, as the device does, and
  ``Runtime`` reads each loaded mmproj once for its image geometry.
* llama.cpp: one load per version (fidelity and accuracy share it; before: two), one vocab-only
  load of the base (the twin's tokenizer, exactly the device's).
* copies: one clone per file of the new version, straight into the registry (before: a scratch
  copy, then a registration copy).
"""
from __future__ import annotations

import collections
import inspect
import shutil
from pathlib import Path

import gguf
import llama_cpp
import pytest
import torch

import cloud.dwc
import device.patch
from cloud.registry import ModelRegistry
from cloud.round_job import HFAssets, run_round
from device.contracts import gguf_index
from device.contracts.dataset import read_llava
from device.contracts.feature_stats import FeatureStats
from device.contracts.model_id import model_id
from device.contracts.wire import RoundOptions
from device.models import DeviceModel
from device.queue import Queue
from device.session import ChatSession


class _Ctx:
    """What run_round reads from a cloud.rounds.RoundContext."""

    def __init__(self, base_model, samples, work: Path):
        self.round_id, self.base_model, self.samples = "r1", base_model, samples
        self.options = RoundOptions(seed=0, steps=6)
        self.patch_path, self.work_dir = work / "patch.gguf", work

    def progress(self, *_):
        pass

    def cancelled(self):
        return False


@pytest.fixture(scope="module")
def samples(assets, tmp_path_factory):
    """What UTS keeps from device chats on drifted images (the shipped Q4_0 pair)."""
    files = {"model": assets / "student-q4_0.gguf", "mmproj": assets / "mmproj-f32.gguf"}
    dm = DeviceModel(files["model"], files["mmproj"], model_id(files), FeatureStats.load(assets / "feature_stats.npz"),
                     None, None)
    drifted = [q for q in read_llava(assets / "data" / "eval.json") if q.meta.get("domain") in ("noise", "texture")]
    with Queue(tmp_path_factory.mktemp("queue") / "q.sqlite") as q:
        sess = ChatSession.open(dm, 1, 512, q)
        for s in drifted[:24]:
            sess.ask(s.question, image=s.image)
        sess.close()
        kept = [r.sample() for r in q.pending()]
    assert kept, "UTS kept nothing to learn from"
    return files, kept


def _where(path, registry: ModelRegistry, base: Path) -> str:
    """'base:model', 'new:mmproj', 'patch' ... for a path the round opened."""
    p = Path(str(path)).resolve()
    if p.parent == base.resolve():
        return f"base:{p.stem}"
    if p.parent.parent == registry.root.resolve():
        return f"new:{p.stem}"
    return p.name


@pytest.mark.timeout(600)
def test_one_round_parses_each_input_file_once(samples, assets, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    files, kept = samples
    registry = ModelRegistry(tmp_path / "registry")
    base_id = registry.put(files)
    base = registry.get(base_id)["model"].parent
    seen = collections.Counter()
    where = lambda p: _where(p, registry, base)  # noqa: E731

    reader_init = gguf.GGUFReader.__init__

    def counting_reader(self, path, *a, **k):
        caller = inspect.currentframe().f_back.f_globals.get("__name__", "")
        seen["transformers" if caller.startswith("transformers") else "cdcca", where(path)] += 1
        return reader_init(self, path, *a, **k)

    read_index = gguf_index.read_index

    def counting_index(path):
        seen["read_index", where(path)] += 1
        return read_index(path)

    llama_init = llama_cpp.Llama.__init__

    def counting_llama(self, *a, **k):
        path = a[0] if a else k["model_path"]
        seen["llama_vocab" if k.get("vocab_only") else "llama_load", where(path)] += 1
        return llama_init(self, *a, **k)

    clone = device.patch.clone_file

    def counting_clone(src, dst):
        seen["clone", where(src)] += 1
        return clone(src, dst)

    copyfile = shutil.copyfile

    def counting_copy(src, dst, *a, **k):
        seen["copyfile", where(src)] += 1
        return copyfile(src, dst, *a, **k)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting_reader)
    monkeypatch.setattr(gguf_index, "read_index", counting_index)
    monkeypatch.setattr(device.patch, "read_index", counting_index)
    monkeypatch.setattr(llama_cpp.Llama, "__init__", counting_llama)
    monkeypatch.setattr(cloud.dwc, "clone_file", counting_clone)
    monkeypatch.setattr(shutil, "copyfile", counting_copy)

    assets_ = HFAssets.embedded(assets)
    assets_.eval_limit, assets_.probe_n, assets_.replay_limit = 6, 4, 64
    m = run_round(_Ctx(base_id, kept, tmp_path), registry, assets_, threads=1)
    got = dict(seen)  # the round's counts (the checks below read files themselves)
    print(f"one round: {dict(sorted(got.items()))}")

    patched_roles = {e.role for e in device.patch.read_patch(tmp_path / "patch.gguf").entries}
    cdcca = {k[1]: n for k, n in got.items() if k[0] == "cdcca"}
    assert cdcca == {"base:model": 1, "base:mmproj": 1, "patch.gguf": 1}
    assert {k[1]: n for k, n in got.items() if k[0] == "transformers"} == {"base:model": 3}
    assert {k[1]: n for k, n in got.items() if k[0] == "read_index"} == \
        {"base:mmproj": 1, "new:mmproj": 1} | {f"new:{r}": 1 + (r == "mmproj") for r in patched_roles}
    assert {k: n for k, n in got.items() if k[0].startswith("llama")} == \
        {("llama_load", "base:model"): 1, ("llama_load", "new:model"): 1, ("llama_vocab", "base:model"): 1}
    assert {k: n for k, n in got.items() if k[0] in ("clone", "copyfile")} == \
        {("clone", "base:model"): 1, ("clone", "base:mmproj"): 1}

    new = registry.get(m["new_model"])  # the draft became the new version: no draft left behind
    assert new is not None and m["new_model"] != base_id and model_id(new) == m["new_model"]
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".")]
    acc = m["accuracy"]
    assert acc["measured_on"] == "device" and acc["before"]["vqa"] >= 0 and acc["after"]["vqa"] >= 0
    assert m["fidelity"]["base"]["n"] == m["fidelity"]["patched"]["n"] == 4
