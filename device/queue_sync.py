"""Queue sync: send every pending sample of the device's queue, acknowledge what the cloud kept.

The queue (``device.queue``) and the client (``device.uplink``) meet here, and only here: rows
go pending -> sent -> acknowledged exactly as the cloud confirms them, batch by batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from device.cloud_errors import CloudError
from device.contracts.wire import UplinkSample
from device.uplink import CloudClient, UploadResult


class QueueRow(Protocol):
    """A queued row carrying the sample's wire JSON (``pending`` may also hand back parsed
    :class:`UplinkSample` objects directly; both are accepted)."""

    sample_id: str
    payload: bytes


class UplinkQueue(Protocol):
    """The slice of ``device.queue`` that syncing needs (pending -> sent -> acknowledged)."""

    def reset_sent_to_pending(self) -> Any: ...
    def pending(self, limit: int) -> Sequence[QueueRow | UplinkSample]: ...
    def mark_sent(self, ids: Sequence[str]) -> Any: ...
    def mark_acknowledged(self, ids: Sequence[str]) -> Any: ...


def sync_queue(queue: UplinkQueue, client: CloudClient, batch_size: int = 32,
               progress: bool = False) -> UploadResult:
    """Send every pending sample; acknowledge exactly what the cloud confirmed.

    Rows marked 'sent' by a crashed earlier run are reset to pending first and simply re-sent:
    uploads are idempotent on ``sample_id``, so the cloud answers them as duplicates.  If the
    cloud fails mid-way the error propagates, confirmed batches stay acknowledged and the rest
    wait for the next sync.
    """
    queue.reset_sent_to_pending()
    total = UploadResult()
    seen: set[str] = set()
    while rows := list(queue.pending(batch_size)):
        ids = [row.sample_id for row in rows]
        if seen.issuperset(ids):
            break  # the queue keeps handing back rows it was told about: do not spin
        seen.update(ids)
        samples = [_parse_row(row) for row in rows]
        queue.mark_sent(ids)
        wanted = set(ids)
        result = client.upload(samples, batch_size=batch_size, progress=progress,
                               on_ack=lambda acked: queue.mark_acknowledged(
                                   [i for i in acked if i in wanted]))
        total.accepted += result.accepted
        total.duplicates += result.duplicates
    return total


def _parse_row(row: QueueRow | UplinkSample) -> UplinkSample:
    if isinstance(row, UplinkSample):
        return row
    try:
        return UplinkSample.model_validate_json(row.payload)
    except ValueError as exc:
        raise CloudError(f"queued sample {row.sample_id} is not a valid UplinkSample: "
                         f"{str(exc).splitlines()[0]}") from exc
