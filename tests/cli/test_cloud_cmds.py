"""cdcca cloud: add-device prints a working token, devices lists them, serve wires the runner."""
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


def test_serve_runner_uses_the_servers_model_registry(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """No server is started: serve() is captured, and the runner's run_round is stubbed."""
    import cloud.round_job as round_job
    import cloud.server as server

    captured: dict[str, Any] = {}
    monkeypatch.setattr(server, "serve", lambda settings, host, port, round_runner:
                        captured.update(settings=settings, host=host, port=port, runner=round_runner))
    monkeypatch.setattr(round_job.CloudAssets, "embedded",
                        classmethod(lambda cls, model_dir: captured.setdefault("model_dir", model_dir)))
    monkeypatch.setattr(round_job, "run_round",
                        lambda ctx, registry, assets: captured.update(registry=registry) or {})
    result = runner.invoke(app, ["cloud", "serve", "--host", "0.0.0.0", "--port", "9999",
                                 "--model-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (captured["host"], captured["port"], captured["model_dir"]) == ("0.0.0.0", 9999, tmp_path)
    captured["runner"](object())
    api = server.create_app(captured["settings"])
    try:
        assert captured["registry"].root == api.state.registry.root
        assert api.state.registry.root == captured["settings"].cloud_dir / "models"
    finally:
        api.state.rounds.shutdown()
        api.state.store.close()
