"""What the TUI shows, as plain data: updated from the device's objects (Turns, QueueStats,
UploadResults, stage callbacks, SyncReports, Versions) and read by the widgets, which only draw it.

Everything here is pure (no Textual, no threads, no clocks), so it is tested without a UI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from device.contracts.round_metrics import STAGES, accuracy_drop, as_accuracy

RECENT_TURNS = 20  # the uncertainty histogram covers this many recent chats
HIST_MAX = 3.0  # nats; the histogram's last bin also holds everything above


# --- formatting (one place, so every panel writes numbers the same way) ------------------------
def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def percent(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.{digits}f}%"


def one_line(error: BaseException | str) -> str:
    """A user-facing one-line message for any error (the device's errors already are one line)."""
    text = str(error).strip()
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text.splitlines()[0][:300] if text else "unknown error"


def short_error(error: BaseException | str) -> str:
    """For a small panel: 'cloud unreachable' instead of the client's full retry story."""
    from device.uplink import CloudUnavailable

    return "cloud unreachable" if isinstance(error, CloudUnavailable) else one_line(error)


# --- chat ----------------------------------------------------------------------------------------
@dataclass
class ChatTurn:
    question: str
    image: str | None = None
    pieces: list[str] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    done: bool = False
    kept: bool | None = None  # None: no UTS decision (no queue)
    reason: str = ""
    shipped_bytes: int = 0
    raw_bytes: int = 0
    truncated: bool = False  # the answer stopped at max tokens, not because the model ended it
    error: str | None = None

    @property
    def answer(self) -> str:
        return "".join(self.pieces)

    @property
    def mean_entropy(self) -> float:
        return sum(self.entropies) / len(self.entropies) if self.entropies else 0.0


# --- uplink / cloud ------------------------------------------------------------------------------
@dataclass
class UplinkView:
    pending: int = 0
    sent: int = 0
    acknowledged: int = 0
    pending_bytes: int = 0
    shipped_bytes: int = 0
    raw_bytes: int = 0
    ratio: float = 0.0
    last_upload: str = "none yet"
    last_ok: bool | None = None
    busy: bool = False


@dataclass
class CloudView:
    url: str = ""
    online: bool | None = None  # None: not checked yet
    token_ok: bool | None = None  # None: not checked (no token, or the cloud is down)
    message: str = "not checked yet"


# --- the round -----------------------------------------------------------------------------------
@dataclass
class StageRow:
    name: str
    status: str = "pending"  # pending | running | done | failed | cancelled
    fraction: float = 0.0
    started: float | None = None  # the caller's clock (the state itself reads none)
    elapsed: float = 0.0

    def eta(self) -> float | None:
        """Seconds left at the current rate; None until there is a rate to go by."""
        if self.status != "running" or self.fraction <= 0.02 or self.elapsed < 0.5:
            return None
        return self.elapsed * (1.0 - self.fraction) / self.fraction


def _fresh_stages() -> list[StageRow]:
    return [StageRow(s) for s in STAGES]


@dataclass
class RoundProgress:
    running: bool = False
    cancelling: bool = False
    outcome: str = ""  # "" | done | failed | cancelled
    message: str = "F5 runs a round"
    error: str | None = None
    warning: str | None = None  # e.g. the round lowered the device's accuracy
    stages: list[StageRow] = field(default_factory=_fresh_stages)

    def stage(self, name: str) -> StageRow:
        return next(s for s in self.stages if s.name == name)


@dataclass
class RoundRow:
    """One finished round as the downlink panel lists it."""

    round_id: str
    samples_learned: int
    uploaded: int
    uplink_bytes: int
    uplink_ratio: float
    downlink_bytes: int
    downlink_ratio: float
    full_gguf_bytes: int
    fp16_delta_bytes: int
    tensors_patched: int
    apply_seconds: float
    reload_seconds: float
    version_before: str | None
    version_after: str | None
    vqa_before: float | None
    vqa_after: float | None
    domains_before: dict[str, float]
    domains_after: dict[str, float]


def _vqa(acc: Any) -> tuple[float | None, dict[str, float]]:
    a = as_accuracy(acc)
    return (None, {}) if a is None else (a.overall, a.vqa_by_domain())


def round_row(report: Any) -> RoundRow:
    """From a ``device.sync.SyncReport`` (duck-typed: only its fields are read)."""
    vb, db = _vqa(report.accuracy_before)
    va, da = _vqa(report.accuracy_after)
    learned = getattr(report, "samples_learned", 0) or report.uploaded
    return RoundRow(report.round_id, learned, report.uploaded, report.uplink_bytes, report.uplink_ratio,
                    report.downlink_bytes, report.downlink_ratio, report.full_gguf_bytes,
                    report.full_fp16_delta_bytes, report.tensors_patched, report.apply_seconds,
                    report.reload_seconds, report.version_before, report.version_after, vb, va, db, da)


@dataclass
class VersionRow:
    id: str
    parent: str | None
    round_id: str
    patch_bytes: int  # the patch file's size (the same figure the round reported as downlink)
    created: str
    current: bool


# --- the whole screen ----------------------------------------------------------------------------
@dataclass
class TuiState:
    model_name: str = "loading model..."
    model_ready: bool = False
    model_error: str | None = None
    chat_busy: bool = False
    turns: list[ChatTurn] = field(default_factory=list)
    uplink: UplinkView = field(default_factory=UplinkView)
    cloud: CloudView = field(default_factory=CloudView)
    round: RoundProgress = field(default_factory=RoundProgress)
    rounds: list[RoundRow] = field(default_factory=list)
    versions: list[VersionRow] = field(default_factory=list)
    can_rollback: bool = False

    @property
    def current_version(self) -> str | None:
        return next((v.id for v in self.versions if v.current), None)

    @property
    def model_label(self) -> str:
        v = self.current_version if self.model_ready else None
        return f"{self.model_name} {v}" if v else self.model_name

    # chat
    def start_turn(self, question: str, image: str | None) -> ChatTurn:
        turn = ChatTurn(question, image)
        self.turns.append(turn)
        self.chat_busy = True
        return turn

    def add_token(self, piece: str, entropy: float) -> ChatTurn:
        turn = self.turns[-1]
        turn.pieces.append(piece)
        turn.entropies.append(float(entropy))
        return turn

    def finish_turn(self, turn: Any) -> ChatTurn:
        """From a ``device.session.Turn``: its pieces/entropies replace the streamed ones."""
        t = self.turns[-1]
        t.pieces = list(turn.pieces)
        t.entropies = [float(x.entropy) for x in turn.tokens[: len(turn.pieces)]]
        d = turn.decision
        if d is not None:
            # what the queue did, not what UTS wanted: a repeat of a queued sample is not "kept"
            t.kept, t.reason = bool(turn.queued), d.reason
            if getattr(turn, "duplicate", False):
                t.reason = "already queued or uploaded (same image and question)"
            t.shipped_bytes, t.raw_bytes = int(d.shipped_bytes), int(d.raw_bytes)
        t.truncated = bool(getattr(turn, "truncated", False))
        t.done, self.chat_busy = True, False
        return t

    def fail_turn(self, error: BaseException | str) -> ChatTurn:
        t = self.turns[-1]
        t.error, t.done, self.chat_busy = one_line(error), True, False
        return t

    # uplink and cloud
    def set_queue(self, stats: Any) -> None:
        u = self.uplink
        u.pending, u.sent, u.acknowledged = stats.pending, stats.sent, stats.acknowledged
        u.pending_bytes, u.shipped_bytes, u.raw_bytes = stats.pending_bytes, stats.shipped_bytes, stats.raw_bytes
        u.ratio = stats.ratio

    def upload_started(self) -> bool:
        """False when an upload is already running."""
        if self.uplink.busy:
            return False
        self.uplink.busy = True
        return True

    def upload_done(self, result: Any) -> None:
        n, dup = len(result.accepted), len(result.duplicates)
        self.uplink.last_upload = f"{n} sent" + (f", {dup} already there" if dup else "")
        self.uplink.last_ok, self.uplink.busy = True, False

    def upload_failed(self, error: BaseException | str) -> None:
        self.uplink.last_upload = "failed: " + short_error(error)
        self.uplink.last_ok, self.uplink.busy = False, False

    def cloud_up(self, version: str, token_ok: bool | None = None) -> None:
        """``token_ok``: the device's own token was tried on an authenticated endpoint."""
        c = self.cloud
        c.online, c.token_ok = True, token_ok
        c.message = "token rejected" if token_ok is False else (
            f"online (v{version})" if token_ok else f"online (v{version}), no token set")

    def cloud_down(self, error: BaseException | str) -> None:
        self.cloud.online, self.cloud.token_ok, self.cloud.message = False, None, one_line(error)

    # the round
    def round_started(self) -> None:
        self.round = RoundProgress(running=True, message="checking the token and the queue...")

    def on_stage(self, name: str, fraction: float, message: str, now: float | None = None) -> None:
        """``run_sync``'s stage callback; an unknown cloud stage name counts as distillation.
        ``now`` (seconds, any monotonic clock) gives each stage its elapsed time and ETA."""
        r = self.round
        if name not in STAGES:
            message = f"{name}: {message}" if message else name
            name = "distil"
        idx = STAGES.index(name)
        for s in r.stages[:idx]:
            if s.status != "done":
                s.status, s.fraction = "done", 1.0
        cur = r.stages[idx]
        if now is not None:
            if cur.started is None:
                cur.started = now
            cur.elapsed = now - cur.started
        cur.fraction = max(0.0, min(1.0, float(fraction)))
        cur.status = "done" if cur.fraction >= 1.0 else "running"
        if message:
            r.message = message
        if name == "upload" and cur.status == "done" and message:
            self.uplink.last_upload, self.uplink.last_ok = f"in round: {message}", True

    @property
    def running_stage(self) -> StageRow | None:
        return next((s for s in self.round.stages if s.status == "running"), None)

    def round_done(self, report: Any) -> RoundRow:
        r = self.round
        for s in r.stages:
            s.status, s.fraction = "done", 1.0
        row = round_row(report)
        self.rounds.append(row)
        r.running, r.cancelling, r.outcome = False, False, "done"
        r.message = f"round {short_id(row.round_id)}: {row.version_before} -> {row.version_after}"
        drop = accuracy_drop(as_accuracy(report.accuracy_before), as_accuracy(report.accuracy_after))
        if drop is not None:
            r.warning = (f"VQA fell {percent(row.vqa_before, 1)} -> {percent(row.vqa_after, 1)}; "
                         f"F9 rolls back to {row.version_before}")
        self.uplink.last_upload = f"{report.uploaded} sent in round {short_id(row.round_id)}"
        self.uplink.last_ok = True
        return row

    def _stop(self, outcome: str, message: str, error: str | None) -> None:
        r = self.round
        for s in r.stages:
            if s.status == "running":
                s.status = outcome
        r.running, r.cancelling, r.outcome, r.message, r.error = False, False, outcome, message, error

    def round_failed(self, error: BaseException | str) -> None:
        self._stop("failed", "round failed; the device model is unchanged", short_error(error))

    def round_cancelled(self) -> None:
        self._stop("cancelled", "round cancelled; the device model is unchanged", None)

    def cancel_requested(self) -> bool:
        if not self.round.running:
            return False
        self.round.cancelling, self.round.message = True, "cancelling..."
        return True

    # versions
    def set_versions(self, versions: Iterable[Any], current: str | None,
                     patch_sizes: dict[str, int] | None = None) -> None:
        """``patch_sizes``: version id -> its patch file's bytes (the backend reads the files)."""
        sizes = patch_sizes or {}
        self.versions = [VersionRow(v.id, v.parent, v.round_id, sizes.get(v.id, v.patch_bytes), v.created,
                                    v.id == current) for v in versions]
        cur = next((v for v in self.versions if v.current), None)
        self.can_rollback = cur is not None and cur.parent is not None

    def version_changed(self, on_disk: str | None) -> bool:
        """True when the store's CURRENT names another version than the one shown (another face,
        e.g. `cdcca sync` in a second terminal, switched it)."""
        return on_disk is not None and self.current_version is not None and on_disk != self.current_version

    def switch_question(self, target: str | None = None) -> tuple[str, str, str] | None:
        """(current, target, question) for the confirmation dialog, from the versions as last
        read from disk; target defaults to the current version's parent.  None: nothing to do."""
        cur = next((v for v in self.versions if v.current), None)
        if cur is None:
            return None
        if target is None or target == cur.id:  # the highlighted row is the current one: go back
            target = cur.parent
        if target is None or all(v.id != target for v in self.versions):
            return None
        verb = "Roll back" if _number(target) < _number(cur.id) else "Switch"
        return cur.id, target, f"{verb} the device model from {cur.id} to {target}?"

    # derived series for the plots
    def accuracy_series(self) -> dict[str, tuple[list[int], list[float]]]:
        """VQA accuracy per domain over rounds: x=0 is before the first round, x=k after round k."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for k, row in enumerate(self.rounds, start=1):
            points = ([(0, row.domains_before)] if k == 1 else []) + [(k, row.domains_after)]
            for x, doms in points:
                for d, v in doms.items():
                    xs, ys = out.setdefault(d, ([], []))
                    xs.append(x)
                    ys.append(v)
        return out

    def recent_entropies(self, last: int = RECENT_TURNS) -> list[float]:
        return [h for t in self.turns[-last:] if t.done and not t.error for h in t.entropies]

    def entropy_histogram(self, bins: int = 6, hi: float = HIST_MAX) -> tuple[list[str], list[int]]:
        """Token-entropy counts of recent chats in ``bins`` equal bins over [0, hi]; the last bin
        also takes everything above ``hi`` (its label ends in '+')."""
        width = hi / bins
        counts = [0] * bins
        for h in self.recent_entropies():
            counts[min(bins - 1, max(0, int(h / width)))] += 1
        labels = [f"{i * width:.1f}" for i in range(bins)]
        labels[-1] += "+"
        return labels, counts


def _number(version_id: str) -> int:
    digits = version_id.lstrip("v")
    return int(digits) if digits.isdigit() else -1


def short_id(round_id: str, n: int = 8) -> str:
    return round_id[:n] if round_id else "-"
