"""The model registry behind a blob URL (issue 13, item 4): device models uploaded once to the API
reach a worker on another machine, and the version a worker registers reaches the API, through
``<blob_url>/models/`` alone -- no shared folder.  The URL is a ``file://`` bucket that is neither
machine's local root.  Staging (issue 11) stays on the API machine until a model is complete."""
from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloud.registry import ModelRegistry
from device.contracts.config import load_settings
from fake_models import model_files


def in_bucket(bucket: Path) -> list[str]:
    return sorted(str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file())


def test_api_and_worker_share_models_through_the_url(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    url = f"file://{bucket}"
    api = ModelRegistry(tmp_path / "api" / "models", url=url)
    worker = ModelRegistry(tmp_path / "worker" / "models", url=url)
    mid, files = model_files(tmp_path, 0)
    src = tmp_path / "upload"
    src.write_bytes(files["model"].read_bytes())
    assert api.put_role(mid, "model", src, owner="lap") is False  # half a model: staged, local only
    assert not worker.has(mid) and worker.get(mid) is None
    assert in_bucket(bucket) == [] and len(api.stagings("lap")) == 1
    src.write_bytes(files["mmproj"].read_bytes())
    assert api.put_role(mid, "mmproj", src, owner="lap") is True
    assert in_bucket(bucket) == [f"models/{mid}/complete", f"models/{mid}/mmproj.gguf", f"models/{mid}/model.gguf"]
    assert worker.has(mid) and not (worker.root / mid).exists()  # "present" downloads nothing
    got = worker.get(mid)  # fetched into the worker's cache, checked against the id
    assert got is not None and all(got[r].read_bytes() == files[r].read_bytes() for r in files)
    assert got["model"].parent == worker.root / mid
    new, new_files = model_files(tmp_path, 7)  # the version a round registers on the worker
    assert worker.put(new_files) == new
    assert api.has(new) and api.get(new)["model"].read_bytes() == new_files["model"].read_bytes()
    assert set(api.ids()) == {mid, new}
    assert worker.remove(new) > 0
    assert not ModelRegistry(tmp_path / "third", url=url).has(new)  # gone from the bucket
    leftovers = [p.name for r in (api, worker) for p in r.root.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_staging_stays_per_device_and_a_mismatch_publishes_nothing(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    api = ModelRegistry(tmp_path / "api", url=f"file://{bucket}")
    mid, files = model_files(tmp_path, 0)
    _, other = model_files(tmp_path, 3)
    for device, data in (("a", files["model"]), ("b", other["model"])):
        src = tmp_path / f"up-{device}"
        src.write_bytes(data.read_bytes())
        assert api.put_role(mid, "model", src, owner=device) is False
    src = tmp_path / "up-b2"
    src.write_bytes(other["mmproj"].read_bytes())
    with pytest.raises(ValueError, match="hash to"):
        api.put_role(mid, "mmproj", src, owner="b")  # b's bytes are not the model's
    assert in_bucket(bucket) == [] and len(api.stagings("a")) == 1 and api.stagings("b") == []
    src.write_bytes(files["mmproj"].read_bytes())
    assert api.put_role(mid, "mmproj", src, owner="a") is True  # a's staging was left alone
    assert ModelRegistry(tmp_path / "w", url=f"file://{bucket}").get(mid) is not None


def test_a_corrupt_published_model_is_refused(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    mid, files = model_files(tmp_path, 0)
    ModelRegistry(tmp_path / "api", url=f"file://{bucket}").put(files)
    (bucket / "models" / mid / "model.gguf").write_bytes(b"not the bytes")
    worker = ModelRegistry(tmp_path / "worker", url=f"file://{bucket}")
    with pytest.raises(OSError, match="corrupt"):
        worker.get(mid)
    assert list(worker.root.iterdir()) == []


def test_the_api_publishes_uploads_for_workers_elsewhere(tmp_path: Path) -> None:
    """Through the HTTP API and the settings: the API machine and a worker machine have their
    own CDCCA_HOME and one blob_url; gc on either sees and ages the published models."""
    from cloud.gc import collect
    from cloud.server import create_app

    url = f"file://{tmp_path / 'bucket'}"
    settings = load_settings(home=tmp_path / "api-home", blob_url=url)
    app = create_app(settings)
    try:
        token = app.state.store.add_device("lap")
        h = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        mid, files = model_files(tmp_path, 0)
        with TestClient(app) as client:
            for role in ("model", "mmproj"):
                assert client.put(f"/v1/models/{mid}/{role}", content=files[role].read_bytes(),
                                  headers=h).status_code == 200
            assert client.get(f"/v1/models/{mid}", headers=h).json()["present"] is True
        worker_settings = load_settings(home=tmp_path / "worker-home", blob_url=url)
        worker = ModelRegistry.from_settings(worker_settings)
        assert worker.root == tmp_path / "worker-home" / "cloud" / "models"
        assert worker.get(mid)["mmproj"].read_bytes() == files["mmproj"].read_bytes()
        young = collect(settings, app.state.store, dry_run=True)
        assert mid not in young.models  # just published: younger than staging_max_age_s
        old = collect(load_settings(home=tmp_path / "api-home", blob_url=url, staging_max_age_s=1e-6),
                      app.state.store, dry_run=True)
        assert mid in old.models  # no round keeps it: collectable, seen through the bucket
    finally:
        app.state.rounds.shutdown()
        app.state.store.close()
