"""The round queue that workers claim from, as part of the store (``Store`` inherits it): the
API and the workers agree through the database alone, no broker.

claim (oldest queued round, atomically) -> heartbeat (extend the lease, learn of a cancel) ->
complete or fail (``Store.complete_round`` / ``Store.transition`` with ``owner``); a lease that
runs out puts the round back in line (``expire_leases``), or fails it after too many tries.
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from .schema import rounds, utcnow


class RoundQueue:
    """Mixin over ``self.engine`` (see cloud.store.Store)."""

    def claim_round(self, worker: str, lease_s: float) -> str | None:
        """Atomically take the oldest queued round (all devices, by creation time: fair by age,
        since each device has at most one).  PostgreSQL locks the candidate row with
        ``FOR UPDATE SKIP LOCKED`` so concurrent workers pick different rows; SQLite has one
        writer at a time and the compare-and-set update settles any race."""
        skip_locked = self.engine.dialect.name == "postgresql"
        for _ in range(20):
            now = utcnow()
            with self.engine.begin() as conn:
                query = (select(rounds.c.id).where(rounds.c.state == "queued")
                         .order_by(rounds.c.created_at, rounds.c.id).limit(1))
                if skip_locked:
                    query = query.with_for_update(skip_locked=True)
                rid = conn.execute(query).scalar()
                if rid is None:
                    return None
                won = conn.execute(update(rounds).where(
                    rounds.c.id == rid, rounds.c.state == "queued").values(
                    state="running", worker=worker, lease_until=now + timedelta(seconds=lease_s),
                    attempts=rounds.c.attempts + 1, started_at=now, stage="loading samples",
                    progress=0.0)).rowcount
            if won == 1:
                return rid
        return None

    def heartbeat(self, round_id: str, worker: str, lease_s: float) -> bool | None:
        """Extend the lease.  Returns whether the device asked to cancel, or None if the round
        is no longer this worker's (its lease expired and it was re-queued or failed)."""
        until = utcnow() + timedelta(seconds=lease_s)
        with self.engine.begin() as conn:
            if conn.execute(update(rounds).where(
                    rounds.c.id == round_id, rounds.c.worker == worker,
                    rounds.c.state == "running").values(lease_until=until)).rowcount != 1:
                return None
            return bool(conn.execute(select(rounds.c.cancel_requested)
                                     .where(rounds.c.id == round_id)).scalar())

    def request_cancel(self, round_id: str) -> bool:
        return self.update_round(round_id, cancel_requested=True, message="cancel requested")

    def expire_leases(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Running rounds whose worker stopped heartbeating: re-queue them (oldest first keeps
        their place) until ``max_attempts`` tries, then fail them with the reason."""
        now = utcnow()
        with self.engine.connect() as conn:
            stale = conn.execute(select(rounds.c.id, rounds.c.attempts, rounds.c.worker).where(
                rounds.c.state == "running", rounds.c.lease_until < now)).all()
        requeued, failed = [], []
        for rid, attempts, worker in stale:
            lost = f"its worker {worker} stopped heartbeating"
            with self.engine.begin() as conn:
                guard = [rounds.c.id == rid, rounds.c.state == "running", rounds.c.lease_until < now]
                if attempts < max_attempts and not self._cancel_flag(conn, rid):
                    values = dict(state="queued", worker=None, lease_until=None, stage="queued",
                                  progress=0.0, message=f"re-queued: {lost}")
                    target = requeued
                else:
                    values = dict(state="failed", lease_until=None, finished_at=now,
                                  message=f"failed: {lost} (attempt {attempts} of {max_attempts})")
                    target = failed
                if conn.execute(update(rounds).where(*guard).values(**values)).rowcount == 1:
                    target.append(rid)
        return requeued, failed

    @staticmethod
    def _cancel_flag(conn, rid: str) -> bool:
        return bool(conn.execute(select(rounds.c.cancel_requested).where(rounds.c.id == rid)).scalar())
