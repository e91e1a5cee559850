"""Resumable syncs (issue 11, item 5): a real cloud server process is killed (SIGKILL) in the
middle of a round and restarted on the same port; the device's sync finishes by itself, and a
sync that did break off resumes the saved round instead of orphaning it.

The outage lasts CDCCA_TEST_RESTART_S seconds (default 3, to keep the suite fast); the client's
retry budget is 90 s, and the 30 s case is measured with CDCCA_TEST_RESTART_S=30.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from device.contracts.config import load_settings
from device.contracts.wire import TokenStats, UplinkSample
from device.models import open_device_model
from device.queue import Queue
from device.resume import load_inflight
from device.sync import SyncOptions, run_sync
from device.uplink import CloudClient, CloudUnavailable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOWN_S = float(os.environ.get("CDCCA_TEST_RESTART_S", "3"))


class CloudProcess:
    """The real API in its own process (tests/device/cloud_proc.py), restartable on one port."""

    def __init__(self, home: Path, round_s: float = 3.0, nan: bool = False) -> None:
        self.home, self.round_s, self.extra = home, round_s, ["nan"] if nan else []
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # a short worker lease: a round whose process was killed is re-queued seconds after restart
        env = {**os.environ, "CDCCA_HOME": str(self.home), "PYTHONPATH": f"{REPO}:{HERE}",
               "CDCCA_ROUND_LEASE_S": "3"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "cloud_proc.py"), str(self.home),
                                      str(self.port), str(self.round_s), *self.extra], env=env, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("cloud process did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def rounds(self, token: str) -> list[dict]:
        return httpx.get(f"{self.url}/v1/rounds", headers={"Authorization": f"Bearer {token}"}).json()


def samples_for(model_id: str, n: int = 3) -> list[UplinkSample]:
    return [UplinkSample(sample_id=f"{i:016x}", base_model=model_id, prompt=f"what is in picture {i}?",
                         answer="a circle", tokens=TokenStats(positions=[0], token_ids=[3], entropy=[1.5]),
                         score=1.5, raw_bytes=2048) for i in range(1, n + 1)]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    monkeypatch.delenv("CDCCA_CLOUD_KEY", raising=False)
    from cloud.store import Store

    cloud_home = tmp_path / "cloud-home"
    store = Store(load_settings(home=cloud_home))
    token = store.add_device("laptop")
    store.close()
    settings = load_settings()
    model = open_device_model(settings)
    with Queue(settings.queue_path) as q:
        for s in samples_for(model.id):
            q.add(s)
    cloud = CloudProcess(cloud_home, nan=getattr(request, "param", False))
    cloud.start()
    yield settings, token, cloud
    if cloud.proc is not None and cloud.proc.poll() is None:
        cloud.proc.terminate()
        cloud.proc.wait(10)


def wait_running(cloud: CloudProcess, token: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [r for r in cloud.rounds(token) if r["state"] == "running"]
        if live:
            return live[0]["round_id"]
        time.sleep(0.05)
    raise AssertionError("no round started running")


def test_sync_rides_out_a_cloud_kill_and_restart(world) -> None:
    settings, token, cloud = world
    result: dict = {}

    def sync() -> None:
        with CloudClient(cloud.url, token) as client:  # default: the 90 s retry budget
            try:
                result["report"] = run_sync(settings, client, SyncOptions(evaluate=False))
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                result["error"] = e

    t = threading.Thread(target=sync, daemon=True)
    t.start()
    rid = wait_running(cloud, token)
    assert load_inflight(settings.device_dir).round_id == rid  # persisted before it ran
    assert (settings.device_dir / "round.json").stat().st_mode & 0o777 == 0o600
    assert settings.device_dir.stat().st_mode & 0o777 == 0o700
    cloud.kill()
    time.sleep(DOWN_S)
    cloud.start()
    t.join(120)
    assert not t.is_alive(), "the sync did not finish by itself"
    assert "error" not in result, result.get("error")
    rep = result["report"]
    assert rep.version_after == "v1" and open_device_model(settings).version == "v1"
    assert load_inflight(settings.device_dir) is None
    done = [r for r in cloud.rounds(token) if r["state"] == "done"]
    assert [r["round_id"] for r in done] == [rep.round_id]


def test_a_broken_off_sync_resumes_the_saved_round(world) -> None:
    settings, token, cloud = world
    with CloudClient(cloud.url, token, retries=0) as client:
        def kill_when_running() -> None:
            wait_running(cloud, token)
            cloud.kill()

        killer = threading.Thread(target=kill_when_running, daemon=True)
        killer.start()
        with pytest.raises(CloudUnavailable) as err:
            run_sync(settings, client, SyncOptions(evaluate=False))
        killer.join(60)
    assert "\n" not in str(err.value)
    saved = load_inflight(settings.device_dir)
    assert saved is not None and open_device_model(settings).version == "v0"
    cloud.start()
    with CloudClient(cloud.url, token) as client:
        rep = run_sync(settings, client, SyncOptions(evaluate=False))
    assert rep.resumed and rep.version_after == "v1"
    assert load_inflight(settings.device_dir) is None
    rounds = cloud.rounds(token)
    # the cloud kept the round (re-queued after its lost lease) or lost it (then exactly one new
    # round was started); either way no round is left queued or running, and one is done
    assert [r["state"] for r in rounds].count("done") == 1
    assert all(r["state"] in ("done", "failed") for r in rounds)
    if saved.round_id in {r["round_id"] for r in rounds if r["state"] == "done"}:
        assert rep.round_id == saved.round_id


@pytest.mark.parametrize("world", [True], indirect=True, ids=["nan-patch"])
def test_samples_of_a_refused_round_become_usable_again(world) -> None:
    """The real cloud serves a genuine, signed patch full of NaN: the device rolls back, releases
    the round, and the cloud counts the round's samples as unused again."""
    from device.sync import PatchRefused

    settings, token, cloud = world
    with CloudClient(cloud.url, token) as client:
        with pytest.raises(PatchRefused, match="failed the smoke test"):
            run_sync(settings, client, SyncOptions(evaluate=False))
        counts = client.sample_counts()
    assert counts.total == 3 and counts.unused == 3
    assert open_device_model(settings).version == "v0" and load_inflight(settings.device_dir) is None
    (done,) = [r for r in cloud.rounds(token) if r["state"] == "done"]
    assert done["message"].startswith("released by the device")
