"""The durable uplink queue: idempotent adds, status moves, stats, and surviving SIGKILL."""
from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device.contracts.wire import TokenStats, UplinkSample
from device.queue import QUEUE_FILE, Queue, QueueStats

REPO = Path(__file__).resolve().parents[2]


def sample(i: int, score: float = 0.5, raw: int = 10_000, tag: str | None = None) -> UplinkSample:
    return UplinkSample(sample_id=f"{i:032x}", base_model="m" * 16, prompt=f"question {i}?", answer="circle",
                        answer_token_ids=[5, 6], tokens=TokenStats(positions=[1], token_ids=[6], entropy=[0.7]),
                        score=score, ood_score=1.5, raw_bytes=raw, tag=tag)


@pytest.fixture
def q(tmp_path):
    with Queue(tmp_path / "q.sqlite") as queue:
        yield queue


def test_add_is_idempotent_and_payload_round_trips(q):
    s = sample(1, tag="noise")
    assert q.add(s) is True
    assert q.add(s) is False and q.add(sample(1, score=9.0)) is False  # same id: first write wins
    (row,) = q.pending()
    assert row.sample() == s and row.payload == s.model_dump_json().encode()
    assert (row.sample_id, row.status, row.score, row.tag, row.shipped_bytes) == (s.sample_id, "pending", 0.5, "noise",
                                                                                   len(row.payload))
    assert q.stats().total == 1


def test_status_transitions(q):
    for i in range(5):
        q.add(sample(i))
    ids = [f"{i:032x}" for i in range(5)]
    assert q.mark_sent(ids[:3]) == 3
    assert [s.sample_id for s in q.pending()] == ids[3:]
    assert q.mark_sent(ids[:3]) == 0  # already sent
    assert q.mark_acknowledged([ids[0], ids[3], "f" * 32]) == 2  # sent and pending ids; unknown ignored
    assert q.mark_sent([ids[0]]) == 0  # acknowledged never goes back
    assert (q.status_of(ids[0]), q.status_of(ids[1]), q.status_of("0" * 31 + "z")) == ("acknowledged", "sent", None)
    assert q.reset_sent_to_pending() == 2
    assert [s.sample_id for s in q.pending()] == [ids[1], ids[2], ids[4]]  # insertion order
    assert [s.sample_id for s in q.pending(limit=1)] == [ids[1]]
    assert q.add(sample(0)) is False  # an acknowledged id stays a no-op


def test_stats(q):
    assert q.stats() == QueueStats(0, 0, 0, 0, 0, 0) and q.stats().ratio == 0.0
    sizes = [len(sample(i, raw=1000 * (i + 1)).model_dump_json()) for i in range(4)]
    for i in range(4):
        q.add(sample(i, raw=1000 * (i + 1)))
    q.add(sample(9), shipped_bytes=123)
    q.mark_sent([f"{1:032x}"])
    q.mark_acknowledged([f"{2:032x}"])
    st = q.stats()
    assert (st.pending, st.sent, st.acknowledged, st.total) == (3, 1, 1, 5)
    assert st.pending_bytes == sizes[0] + sizes[3] + 123
    assert st.shipped_bytes == sum(sizes) + 123 and st.raw_bytes == 10_000 + 10_000
    assert st.ratio == pytest.approx(st.shipped_bytes / 20_000)
    assert q.prune_acknowledged() == 1 and q.stats() == st  # payload freed, accounting kept


def test_pragmas_and_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CDCCA_HOME", str(tmp_path / "home"))
    with Queue() as q:
        assert q.path == tmp_path / "home" / "device" / QUEUE_FILE
        assert q._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    con = sqlite3.connect(tmp_path / "home" / "device" / QUEUE_FILE)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
    con.close()


def test_threads_and_reopen(tmp_path):
    path = tmp_path / "q.sqlite"
    with Queue(path) as q:
        workers = [threading.Thread(target=lambda k=k: [q.add(sample(k * 100 + i)) for i in range(25)]) for k in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    with Queue(path) as q:
        assert q.stats().pending == 100 and q.integrity_check() == "ok"


CHILD = """
import sys
from device.contracts.wire import TokenStats, UplinkSample
from device.queue import Queue
q = Queue(sys.argv[1])
i = int(sys.argv[2])
while True:
    sid = f"{i:032x}"
    q.add(UplinkSample(sample_id=sid, base_model="m", prompt="p" * (50 + i % 500), answer="a",
                       tokens=TokenStats(positions=[0], token_ids=[1], entropy=[0.5]), score=0.5, raw_bytes=9))
    print(sid, flush=True)
    if i % 3 == 0:
        q.mark_sent([sid])
    if i % 7 == 0:
        q.reset_sent_to_pending()
    i += 1
"""


def test_sigkill_never_corrupts_or_loses_a_committed_row(tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "crash.sqlite"
    committed: list[str] = []
    for round_ in range(5):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(round_ * 1_000_000)], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = child.stdout.readline()  # the child is up and writing
        assert first.endswith("\n"), child.stderr.read()
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        lines = (first + out).split("\n")
        committed += [line for line in lines[:-1]]  # the last piece has no newline: not reported
    assert len(committed) >= 5
    with Queue(path) as q:
        assert q.integrity_check() == "ok"
        with_rows = {r[0] for r in q._db.execute("SELECT sample_id FROM samples")}
        assert set(committed) <= with_rows
        q.reset_sent_to_pending()
        assert q.stats().pending == len(with_rows)


def test_queue_files_are_private(tmp_path: Path) -> None:
    """The queue holds the user's images and prompts: 0600 files in a 0700 folder, and an old
    0644 database is tightened on the next open (issue 11, item 9)."""
    import stat

    folder = tmp_path / "device"
    with Queue(folder / "queue.sqlite") as q:
        q.add(sample(1))
        names = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert names and all(m == 0o600 for n, m in names.items() if n.startswith("queue.sqlite")), names
    (folder / "queue.sqlite").chmod(0o644)
    Queue(folder / "queue.sqlite").close()
    assert stat.S_IMODE((folder / "queue.sqlite").stat().st_mode) == 0o600


def test_queue_file_carries_a_schema_version(tmp_path) -> None:
    """Issue 13, item 5: queue.sqlite is stamped (PRAGMA user_version); a newer one is refused."""
    import sqlite3

    from device.queue import SCHEMA_VERSION, Queue

    path = tmp_path / "queue.sqlite"
    Queue(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="newer than this cdcca"):
        Queue(path)


def test_adaptive_window_is_per_model(tmp_path) -> None:
    """Issue 15, item 3: one model's recent UTS scores never seed another model's window."""
    from device.queue import Queue

    with Queue(tmp_path / "queue.sqlite") as q:
        for i in range(5):
            q.note_seen(100, 0.1 * i, None, "store:default-q4_0")
            q.note_seen(100, 5.0 + i, 1.0, "store:mine")
        assert q.recent_scores(3, "store:default-q4_0") == [(0.2, None), (0.30000000000000004, None), (0.4, None)]
        assert [h for h, _ in q.recent_scores(10, "store:mine")] == [5.0, 6.0, 7.0, 8.0, 9.0]
        assert q.recent_scores(10, "id:other") == []
        assert q.stats().chats_seen == 10


def test_window_trim_keeps_each_models_newest(tmp_path, monkeypatch) -> None:
    import device.queue as dq

    monkeypatch.setattr(dq, "RECENT_KEEP", 3)
    with dq.Queue(tmp_path / "queue.sqlite") as q:
        for i in range(6):
            q.note_seen(1, float(i), None, "a")
            if i < 2:
                q.note_seen(1, 10.0 + i, None, "b")
        assert [h for h, _ in q.recent_scores(10, "a")] == [3.0, 4.0, 5.0]
        assert [h for h, _ in q.recent_scores(10, "b")] == [10.0, 11.0]  # another model's trim spares them


def test_version_1_queue_migrates_and_keeps_its_samples(tmp_path) -> None:
    """A queue written before scores were filed per model (schema 1) opens, keeps every row, and
    its old scores (model unknown) seed no model's window."""
    import sqlite3

    from device.queue import SCHEMA_VERSION, Queue

    path = tmp_path / "queue.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE recent (id INTEGER PRIMARY KEY, entropy REAL NOT NULL, ood REAL)")
    db.executemany("INSERT INTO recent (entropy, ood) VALUES (?, ?)", [(1.0, None), (2.0, 0.5)])
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Queue(path) as q:
        assert q.recent_scores(10, "store:default-q4_0") == []
        assert q.recent_scores(10, "") == [(1.0, None), (2.0, 0.5)]
        q.note_seen(1, 3.0, None, "store:default-q4_0")
        assert q.recent_scores(10, "store:default-q4_0") == [(3.0, None)]
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
