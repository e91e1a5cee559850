"""A hostile cloud (a real HTTP server on 127.0.0.1) cannot write outside CDCCA_HOME, cannot
change the device's model store, and every refusal is one line (issue 11, item 1)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.contracts.config import load_settings
from device.models import open_device_model
from device.resume import load_inflight
from device.sync import SyncOptions, run_sync
from device.trust import PINNED_KEY_FILE
from device.uplink import CloudClient
from fakecloud import RID, FakeCloud, real_patch, round_status

RID2 = "fedcba9876543210"


def tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under ``root`` (but ``skip``) by content hash: the 'byte-identical' check."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file() and not p.is_symlink() and p.name != ".lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A device at v0 whose home is three folders deep, so '../..' has somewhere to land."""
    home = tmp_path / "a" / "b" / "home"
    monkeypatch.setenv("CDCCA_HOME", str(home))
    monkeypatch.delenv("CDCCA_CLOUD_KEY", raising=False)
    settings = load_settings()
    model = open_device_model(settings)
    return settings, model, tmp_path


def sync(settings, url: str):
    with CloudClient(url, "t", retries=0) as client:
        return run_sync(settings, client, SyncOptions(evaluate=False))


def attack(device, script: dict, match: str) -> None:
    settings, model, root = device
    store_before = tree(model.store.dir)
    outside_before = tree(root, skip=settings.home)
    with FakeCloud() as cloud:
        cloud.script.update(script)
        with pytest.raises(Exception) as err:
            sync(settings, cloud.url)
    message = str(err.value)
    assert "\n" not in message and match in message, message
    assert tree(model.store.dir) == store_before  # the store is byte-identical
    assert tree(root, skip=settings.home) == outside_before  # nothing written outside CDCCA_HOME
    assert not (root / "x").exists() and not (root / "a" / "x").exists()
    assert not any((settings.device_dir / "patches").glob("*")) if (settings.device_dir / "patches").exists() else True
    assert open_device_model(settings).version == "v0"


def test_round_id_with_dot_dot_is_refused(device) -> None:
    attack(device, {"create": round_status("../../x", state="queued")}, "invalid answer to POST /v1/rounds")


def test_round_id_naming_the_committed_model_is_refused(device) -> None:
    _, model, _ = device
    evil = "../models/default-q4_0/v0/model"
    attack(device, {"status": round_status(evil), "patch": model.model.read_bytes()},
           "invalid answer to GET /v1/rounds/{id}")


def test_model_bytes_served_as_a_patch_are_refused(device) -> None:
    """The committed model's own bytes, with a correct sha256 and a valid signature."""
    _, model, _ = device
    attack(device, {"patch": model.model.read_bytes()}, "not a cdcca patch")


def test_absurd_declared_size_is_refused_before_reading(device) -> None:
    attack(device, {"patch": b"GGUF" + b"\0" * 100, "patch_headers": {"Content-Length": str(1 << 40)},
                    "send_bytes": 104}, "over the")


def test_endless_patch_stream_is_cut_at_the_cap(device) -> None:
    attack(device, {"patch": b"", "endless": True}, "limit: refusing it")


def test_wrong_hash_is_refused(device) -> None:
    settings, model, root = device
    patch = real_patch(model.model, root / "p.gguf")
    attack(device, {"patch": patch, "patch_headers": {"X-Patch-SHA256": "0" * 64}}, "corrupt")


def test_unsigned_patch_is_refused_when_a_key_is_pinned(device) -> None:
    settings, model, root = device
    patch = real_patch(model.model, root / "p.gguf")
    attack(device, {"patch": patch, "sign_with": None}, "unsigned")


def test_forged_signature_and_swapped_key_are_refused(device) -> None:
    settings, model, root = device
    patch = real_patch(model.model, root / "p.gguf")
    with FakeCloud() as first:  # first contact pins the genuine cloud's key...
        first.script.update({"patch": patch})
        assert sync(settings, first.url).version_after == "v1"
    model = open_device_model(settings)
    patch2 = real_patch(model.model, root / "p2.gguf", round_id=RID2)
    pinned = (settings.device_dir / PINNED_KEY_FILE).read_text()
    forger = Ed25519PrivateKey.generate()
    # ...then an impostor announces its own key and signs with it: refused, key unchanged
    attack_v1(device, {"rid": RID2, "patch": patch2, "sign_with": forger, "announce": None}, "not signed by the pinned")
    from device.contracts.signing import public_key_b64

    attack_v1(device, {"rid": RID2, "patch": patch2, "sign_with": forger,
                         "announce": public_key_b64(forger)},
              "not signed by the pinned")
    assert (settings.device_dir / PINNED_KEY_FILE).read_text() == pinned


def test_signature_binds_round_and_base_model(device) -> None:
    settings, model, root = device
    patch = real_patch(model.model, root / "p.gguf")
    attack(device, {"patch": patch, "signed_base": "f" * 64}, "not signed by the pinned")


def attack_v1(device, script: dict, match: str) -> None:
    settings, _, root = device
    store = open_device_model(settings).store
    before = tree(store.dir)
    with FakeCloud() as cloud:
        cloud.script.update(script)
        with pytest.raises(Exception) as err:
            sync(settings, cloud.url)
    assert "\n" not in str(err.value) and match in str(err.value), str(err.value)
    assert tree(store.dir) == before and store.current().id == "v1"


def test_genuine_signed_patch_applies(device) -> None:
    """The positive control: the same path accepts a genuine patch (so the refusals above are
    refusals, not a broken pipeline), and names its file itself, then removes it."""
    settings, model, root = device
    patch = real_patch(model.model, root / "p.gguf")
    with FakeCloud() as cloud:  # with garbage metrics, which only the report would have shown
        cloud.script.update({"patch": patch, "status": round_status(
            metrics={"dwc": "not a dict", "samples": -1e300, "accuracy": [1, 2]})})
        cloud.script["status"]["base_model"] = model.id
        rep = sync(settings, cloud.url)
    assert rep.version_after == "v1" and rep.round_id == RID and rep.downlink_bytes == len(patch)
    assert (settings.device_dir / PINNED_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert load_inflight(settings.device_dir) is None
    assert not any((settings.device_dir / "patches").iterdir())
