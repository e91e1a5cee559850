"""cdcca cloud: add-device prints a working token, devices lists them, revoke/rotate, token files,
serve starts workers, worker wires the runner, gc."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cdcca_cli.main import app
from device.contracts.config import load_settings

runner = CliRunner()


def add_device(name: str) -> str:
    result = runner.invoke(app, ["cloud", "add-device", name])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("export CDCCA_DEVICE_TOKEN=")
    token = last.split("=", 1)[1]
    assert result.output.count(token) == 1  # shown once
    return token


def test_add_device_token_authenticates_and_devices_lists_it() -> None:
    token = add_device("laptop")
    from cloud.server import create_app

    api = create_app(load_settings())
    try:
        client = TestClient(api)
        r = client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["name"] == "laptop"
    finally:
        api.state.rounds.shutdown()
        api.state.store.close()

    listed = runner.invoke(app, ["cloud", "devices"])
    assert listed.exit_code == 0 and "laptop" in listed.output
    assert token not in listed.output


def test_devices_empty_and_duplicate_name_is_one_line_error() -> None:
    empty = runner.invoke(app, ["cloud", "devices"])
    assert empty.exit_code == 0 and "no devices yet" in empty.output
    add_device("lap")
    again = runner.invoke(app, ["cloud", "add-device", "lap"])
    assert again.exit_code == 1 and "already exists" in again.output
    assert "Traceback" not in again.output
    bad = runner.invoke(app, ["cloud", "add-device", "no spaces"])
    assert bad.exit_code == 1 and "invalid device name" in bad.output


def test_serve_help() -> None:
    result = runner.invoke(app, ["cloud", "serve", "--help"])
    assert result.exit_code == 0
    assert "--host" in result.output and "--port" in result.output


def test_worker_runner_uses_the_servers_model_registry(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    """No worker loop is run: run_worker() is captured, and the runner's run_round is stubbed."""
    import cloud.round_job as round_job
    import cloud.server as server
    import cloud.worker as worker

    captured: dict[str, Any] = {}
    monkeypatch.setattr(worker, "run_worker", lambda settings, runner, stop:
                        captured.update(settings=settings, runner=runner))
    from device.contracts.config import DEFAULT_MODEL_DIR

    monkeypatch.setattr(round_job.HFAssets, "embedded",
                        classmethod(lambda cls, model_dir: captured.setdefault("model_dir", model_dir)))
    monkeypatch.setattr(round_job, "run_round", lambda ctx, registry, assets, akd, launch:
                        captured.update(registry=registry, akd=akd, launch=launch) or {})
    result = runner.invoke(app, ["cloud", "worker", "--model-dir", str(DEFAULT_MODEL_DIR)])
    assert result.exit_code == 0, result.output
    assert captured["model_dir"] == DEFAULT_MODEL_DIR
    captured["runner"](object())
    assert captured["launch"].in_process  # the default: train in the worker's own process
    assert captured["akd"].kd and captured["akd"].feat  # the settings' AKD terms reach the runner
    api = server.create_app(captured["settings"])
    try:
        assert captured["registry"].root == api.state.registry.root
        assert api.state.registry.root == captured["settings"].cloud_dir / "models"
    finally:
        api.state.rounds.shutdown()
        api.state.store.close()


def test_serve_starts_local_workers_and_never_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    import cloud.server as server
    from cdcca_cli import cloud_cmds

    started: list[list[str]] = []

    class FakeProc:  # records the command; the real worker is covered by tests/cloud/test_worker*
        def __init__(self, cmd):
            started.append(cmd)

        def terminate(self):
            started.append(["terminated"])

        def wait(self, timeout=None):
            return 0

    captured: dict[str, Any] = {}
    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setattr(server, "serve", lambda settings, host, port, accept_rounds:
                        captured.update(host=host, port=port, accept=accept_rounds))
    result = runner.invoke(app, ["cloud", "serve", "--host", "0.0.0.0", "--port", "9999",
                                 "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert captured == {"host": "0.0.0.0", "port": 9999, "accept": True}
    assert started[:2] == [cloud_cmds.worker_command(None)] * 2 and started[2:] == [["terminated"]] * 2
    assert started[0][3:] == ["cloud", "worker", "--exit-with-parent", "--nice", "10"]


def test_revoke_rotate_and_token_file(tmp_path: Path) -> None:
    from cloud.store import Store

    old = add_device("lap")
    r = runner.invoke(app, ["cloud", "revoke", "lap"])
    assert r.exit_code == 0 and "revoked" in r.output
    store = Store(load_settings())
    try:
        assert store.device_for_token(old) is None
        listed = runner.invoke(app, ["cloud", "devices"])
        assert "revoked" in listed.output
        token_file = tmp_path / "lap.token"
        r = runner.invoke(app, ["cloud", "rotate", "lap", "--token-file", str(token_file)])
        assert r.exit_code == 0, r.output
        token = token_file.read_text().strip()
        assert token not in r.output and token_file.stat().st_mode & 0o777 == 0o600
        assert store.device_for_token(token) == "lap"
        r = runner.invoke(app, ["cloud", "add-device", "phone", "--token-file", str(tmp_path / "p")])
        assert r.exit_code == 0 and store.device_for_token((tmp_path / "p").read_text().strip()) == "phone"
    finally:
        store.close()
    bad = runner.invoke(app, ["cloud", "rotate", "ghost"])
    assert bad.exit_code == 1 and "no device 'ghost'" in bad.output and "Traceback" not in bad.output


def test_gc_reports_and_removes_stale_staging(tmp_path: Path) -> None:
    settings = load_settings()
    staging = settings.cloud_dir / "models" / ".stage-0123456789abcdef-abab"
    staging.mkdir(parents=True)
    (staging / "model.gguf").write_bytes(b"x")
    import os as _os
    _os.utime(staging, (0, 0))
    dry = runner.invoke(app, ["cloud", "gc", "--dry-run"])
    assert dry.exit_code == 0 and "would have removed 1 stale staging" in dry.output
    assert staging.exists()
    r = runner.invoke(app, ["cloud", "gc"])
    assert r.exit_code == 0 and "removed 1 stale staging" in r.output, r.output
    assert not staging.exists()
