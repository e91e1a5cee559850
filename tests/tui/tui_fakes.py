"""A scripted backend for the snapshot tests: the device's own result types, fixed numbers, no
model, no clock, no network -- so screenshots are identical on every run and machine.
(The pilot tests in test_pilot.py drive the real device and a real loopback cloud instead.)"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from device.contracts.round_metrics import STAGES
from device.queue import QueueStats
from device.session import Turn
from device.sync import SyncReport
from device.uncertainty import TokenUncertainty
from device.uplink import CloudUnavailable, UploadResult
from device.uts import UTSDecision
from device.versions import Version

ANSWERS = [
    (["two", " red", " circles"], [0.05, 0.42, 1.31]),
    (["a", " blue", " square", " on", " grey"], [0.02, 0.95, 1.62, 0.30, 2.10]),
    (["yes"], [0.11]),
]


def accuracy(base: float) -> dict:
    doms = {"source": base + 0.30, "texture": base + 0.10, "noise": base, "combo": base + 0.05, "rotate": base + 0.15}
    return {"vqa": sum(doms.values()) / len(doms), "domains": {d: {"vqa": v, "caption_f1": 0.5} for d, v in doms.items()}}


class FakeBackend:
    cloud_url = "http://127.0.0.1:8765"

    def __init__(self, online: bool = True, pause_at: str | None = None, token_ok: bool | None = True,
                 drop: bool = False) -> None:
        self.online = online
        self.token_ok = token_ok
        self.drop = drop  # rounds lower the accuracy
        self.pause_at = pause_at  # stop the round at this stage until ``resume`` is set
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.asked = 0
        self.pending: list[int] = []
        self.acked = 0
        self.shipped = self.raw = 0
        self.rounds = 0
        self.versions_: list[Version] = [Version("v0", None, "", "2024-06-01T12:00:00+00:00", {})]
        self.current = "v0"
        self.closed = False

    def open(self) -> str:
        return "default-q4_0"

    def load_image(self, path):
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{p}: no such image file")
        return p.read_bytes(), np.asarray(Image.open(p).convert("RGB"))

    def ask(self, question, image, image_data, on_token):
        pieces, ents = ANSWERS[self.asked % len(ANSWERS)]
        toks = [TokenUncertainty(h, 0.5, 0.1, i) for i, h in enumerate(ents)]
        for p, t in zip(pieces, toks):
            on_token(p, t)
        kept = sum(ents) / len(ents) > 0.5
        shipped = 1480 + 10 * self.asked if kept else 0
        raw = 40_000
        decision = UTSDecision(kept, "entropy above the adaptive threshold" if kept else "confident answer",
                               None, 0.7, sum(ents) / len(ents), 0.2, raw, shipped)
        if kept:
            self.pending.append(shipped)
            self.shipped += shipped
        self.raw += raw if kept else 0
        self.asked += 1
        return Turn(question, "".join(pieces), pieces, toks, decision, kept, None, Path(image) if image else None)

    def queue_stats(self) -> QueueStats:
        return QueueStats(len(self.pending), 0, self.acked, sum(self.pending), self.shipped, self.raw)

    def health(self):
        if not self.online:
            raise CloudUnavailable(f"cloud at {self.cloud_url} is unreachable after 3 tries: ConnectError")
        from tui.backend import CloudCheck

        return CloudCheck("0.1.0", self.token_ok)

    def upload(self) -> UploadResult:
        self.health()
        ids = [f"s{i}" for i in range(len(self.pending))]
        self.acked += len(ids)
        self.pending = []
        return UploadResult(accepted=ids)

    def sync(self, on_stage, cancel) -> SyncReport:
        self.health()
        n = len(self.pending)
        before = accuracy(0.20 + 0.1 * self.rounds)
        for stage in STAGES:
            on_stage(stage, 0.0, f"{stage}...")
            if stage == self.pause_at:
                on_stage(stage, 0.4, "step 20/50")
                self.paused.set()
                while not (self.resume.is_set() or cancel.is_set()):
                    self.resume.wait(0.05)
            if cancel.is_set():
                raise InterruptedError("sync cancelled")
            if stage == "upload":
                self.upload()
            on_stage(stage, 1.0, f"{stage} done")
        self.rounds += 1
        after = accuracy(0.10 if self.drop else 0.30 + 0.1 * self.rounds)
        rid = f"r{self.rounds:02d}c0ffee1234"
        parent = self.current
        self.current = f"v{len(self.versions_)}"
        self.versions_.append(Version(self.current, parent, rid, f"2024-06-0{1 + self.rounds}T12:00:00+00:00",
                                      {}, patch_bytes=61_440 + 1024 * self.rounds))
        rep = SyncReport(round_id=rid, uploaded=n, uplink_bytes=1500 * n, uplink_raw_bytes=40_000 * n,
                         downlink_bytes=61_440 + 1024 * self.rounds, full_gguf_bytes=4_200_000,
                         full_fp16_delta_bytes=2_100_000, tensors_patched=7 + self.rounds, rows_patched=90,
                         version_before=parent, version_after=self.current, apply_seconds=0.012,
                         reload_seconds=0.05, round_seconds=3.0, accuracy_before=before, accuracy_after=after)
        rep.samples_learned = n  # (a field of SyncReport; set after, so the fake fits older ones too)
        return rep

    def versions(self):
        return list(self.versions_), self.current

    def patch_sizes(self) -> dict[str, int]:
        return {v.id: v.patch_bytes for v in self.versions_ if v.parent}

    def disk_version(self) -> str | None:
        return self.current

    def follow_disk(self) -> str | None:
        return None

    def switch(self, target: str, expected_current: str) -> Version:
        if expected_current != self.current:
            raise ValueError(f"the device model is now {self.current}, not {expected_current}")
        self.current = target
        return next(v for v in self.versions_ if v.id == target)

    def close(self) -> None:
        self.closed = True
