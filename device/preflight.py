"""Before any slow work of a sync: one authenticated request says whether the token is good and
whether a round would have anything new to learn from.

Its own small module (httpx + SQLite, no llama.cpp, no gguf) so `cdcca sync` can run it before
importing the rest of the round driver: a wrong token or an empty queue then fails in about the
time Python takes to start, not after the on-device measurement (seconds to minutes).
"""
from __future__ import annotations

from device.contracts.config import Settings
from device.queue import Queue
from device.uplink import CloudClient, CloudError


class NothingToLearn(ValueError):
    """The queue is empty and the cloud holds no unused sample: a round would learn nothing."""


def preflight(settings: Settings, client: CloudClient) -> int:
    """Raise a one-line error for a rejected token or nothing to learn from; else return how many
    queued samples the sync will upload."""
    try:
        info = client.me()
    except CloudError as e:
        if e.status in (401, 403):
            raise CloudError(f"the cloud rejected this device's token ({e.status}); check CDCCA_DEVICE_TOKEN "
                             "or ask the cloud for a new one (`cdcca cloud add-device NAME`)", e.status) from None
        raise
    with Queue(settings.queue_path) as q:
        st = q.stats()
    pending = st.pending + st.sent  # "sent" rows are reset to pending before the upload
    if pending == 0 and info.samples.unused == 0:
        raise NothingToLearn("nothing new to learn from: the queue is empty and the cloud has used every sample "
                             "of this device; chat about some images first (UTS keeps the uncertain ones)")
    return pending
