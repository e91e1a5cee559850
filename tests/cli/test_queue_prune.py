"""`cdcca queue --prune` frees acknowledged payloads (issue 11 item 6) and keeps the accounting."""
import sqlite3

from typer.testing import CliRunner

from cdcca_cli.main import app
from device.contracts.config import load_settings
from device.queue import Queue
from device.contracts.wire import TokenStats, UplinkSample


def sample(i: int) -> UplinkSample:
    return UplinkSample(sample_id=f"{i:032x}", base_model="m" * 16, prompt=f"question {i}?", answer="circle",
                        answer_token_ids=[5, 6], tokens=TokenStats(positions=[1], token_ids=[6], entropy=[0.7]),
                        score=0.5, ood_score=1.5, raw_bytes=10_000)


def test_prune_frees_acknowledged_payloads_only(tmp_path, monkeypatch):
    monkeypatch.setenv("CDCCA_HOME", str(tmp_path))
    path = load_settings().queue_path
    with Queue(path) as q:
        for i in range(3):
            q.add(sample(i))
        q.mark_acknowledged([f"{0:032x}"])
        before = q.stats()
    r = CliRunner().invoke(app, ["queue", "--prune"])
    assert r.exit_code == 0, r.output
    assert "pruned the payloads of 1 acknowledged samples" in r.output
    with Queue(path) as q:
        assert q.stats() == before and len(q.pending()) == 2
    sizes = dict(sqlite3.connect(path).execute("SELECT status, length(payload) FROM samples").fetchall())
    assert sizes["acknowledged"] == 0 and sizes["pending"] > 0
