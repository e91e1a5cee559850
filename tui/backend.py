"""The device calls the TUI makes, behind one small object the app's workers call.

Every method blocks and is meant to run in a worker thread.  This is the same glue
``cdcca chat`` / ``cdcca sync`` use: the cloud is reached only through ``device.uplink``'s
client.  ``ChatSession`` is not thread-safe, so every use of it (ask, reload after a patch or a
rollback) holds one lock.  Tests substitute a scripted backend with the same methods.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from device.contracts.config import Settings

ImageData = tuple[bytes, np.ndarray]
OnToken = Callable[[str, Any], None]  # (piece, TokenUncertainty)
OnStage = Callable[[str, float, str], None]


@dataclass
class CloudCheck:
    """The cloud answered; ``token_ok`` says whether it accepted this device's token (None: no
    token to try).  /health is unauthenticated, so "online" alone proves nothing about the token."""

    version: str
    token_ok: bool | None


class Backend(Protocol):
    cloud_url: str

    def open(self) -> str: ...  # loads the model; returns its name
    def load_image(self, path: str | Path) -> ImageData: ...
    def ask(self, question: str, image: str | Path | None, image_data: ImageData | None,
            on_token: OnToken) -> Any: ...
    def queue_stats(self) -> Any: ...
    def health(self) -> CloudCheck: ...
    def upload(self) -> Any: ...
    def sync(self, on_stage: OnStage, cancel: threading.Event) -> Any: ...
    def versions(self) -> tuple[list[Any], str | None]: ...
    def patch_sizes(self) -> dict[str, int]: ...
    def disk_version(self) -> str | None: ...  # the store's CURRENT, read cheaply
    def follow_disk(self) -> str | None: ...  # reload if CURRENT moved; the new version or None
    def switch(self, target: str, expected_current: str) -> Any: ...
    def close(self) -> None: ...


class DeviceBackend:
    """The real device: versioned model + llama.cpp chat session + SQLite queue + cloud client."""

    def __init__(self, settings: Settings, quant: str | None = None, sync_options: Any = None,
                 health_timeout: float = 3.0, retries: int | None = None) -> None:
        """``retries=None``: the client's time budget (rides out a cloud restart mid-sync); the
        health probe never retries, so a down cloud shows at once."""
        self.settings = settings
        self.quant = quant
        self.sync_options = sync_options
        self.cloud_url = settings.cloud_url
        self._health_timeout = health_timeout
        self._retries = retries
        self._lock = threading.Lock()  # one ChatSession call at a time
        self._session: Any = None
        self._queue: Any = None

    @property
    def queue_path(self) -> Path:
        return self.settings.queue_path

    def _client(self, **kw: Any):
        from device.uplink import CloudClient

        kw.setdefault("retries", self._retries)
        return CloudClient(self.settings.cloud_url, self.settings.device_token, **kw)

    def _model(self):
        from device.models import open_device_model

        return open_device_model(self.settings, quant=self.quant)

    @staticmethod
    def _name(model: Any) -> str:
        return model.store.name if model.store is not None else Path(model.model).name

    # --- chat ------------------------------------------------------------------------------
    def open(self) -> str:
        from device.queue import Queue
        from device.session import ChatSession

        s = self.settings
        model = self._model()
        self.queue_path.parent.mkdir(parents=True, exist_ok=True)
        self._queue = Queue(self.queue_path)
        with self._lock:
            self._session = ChatSession.open(model, s.threads, s.n_ctx, self._queue, max_tokens=s.max_tokens)
        return self._name(model)

    def _need_session(self) -> Any:
        if self._session is None:
            raise RuntimeError("the device model is not loaded")
        return self._session

    def load_image(self, path: str | Path) -> ImageData:
        with self._lock:
            return self._need_session().load_image(path)

    def ask(self, question: str, image: str | Path | None, image_data: ImageData | None,
            on_token: OnToken) -> Any:
        with self._lock:
            session = self._need_session()
            self._follow_locked()  # never answer with weights another face has replaced
            return session.ask(question, image=image, image_data=image_data, on_token=on_token)

    # --- the store's CURRENT, shared with every other face ----------------------------------
    def _store(self) -> Any:
        """The store the chat model came from (the active user model or the embedded one)."""
        session = self._session
        if session is not None and session.model.store is not None:
            return session.model.store
        return self._model().store

    def disk_version(self) -> str | None:
        store = self._store()
        return store.current().id if store is not None and store.installed() else None

    def _follow_locked(self) -> str | None:
        if self._session is None or self._session.model.store is None:
            return None
        on_disk = self.disk_version()
        if on_disk is None or on_disk == self._session.model.version:
            return None
        self._session.reload(self._model())
        return on_disk

    def follow_disk(self) -> str | None:
        """Reload the chat model if another process switched CURRENT; returns the new version."""
        with self._lock:
            return self._follow_locked()

    def reload(self, model: Any) -> float:
        """Swap the live chat model (after a patch or a rollback); waits for a running answer."""
        with self._lock:
            if self._session is None:
                return 0.0
            return self._session.reload(model)

    def _need_token(self) -> None:
        if not self.settings.device_token:
            raise ValueError("no device token: run `cdcca cloud add-device NAME` on the cloud "
                             "and set CDCCA_DEVICE_TOKEN (or pass --token)")

    # --- uplink ----------------------------------------------------------------------------
    def queue_stats(self) -> Any:
        from device.queue import Queue

        if self._queue is not None:
            return self._queue.stats()
        self.queue_path.parent.mkdir(parents=True, exist_ok=True)
        with Queue(self.queue_path) as q:
            return q.stats()

    def health(self) -> CloudCheck:
        from device.uplink import CloudError

        with self._client(timeout=self._health_timeout, retries=0) as c:
            version = c.health().version
            if not self.settings.device_token:
                return CloudCheck(version, None)
            try:
                c.me()  # authenticated: proves the token, not just the socket
            except CloudError as e:
                if e.status in (401, 403):
                    return CloudCheck(version, False)
                raise
            return CloudCheck(version, True)

    def upload(self) -> Any:
        from device.queue import Queue
        from device.queue_sync import sync_queue

        self._need_token()
        with self._client() as c, Queue(self.queue_path) as q:
            try:
                return sync_queue(q, c)
            except BaseException:
                q.reset_sent_to_pending()  # nothing is in flight any more: count them as waiting
                raise

    # --- rounds and versions ---------------------------------------------------------------
    def sync(self, on_stage: OnStage, cancel: threading.Event) -> Any:
        from device.sync import run_sync

        self._need_token()
        with self._client() as c:
            return run_sync(self.settings, c, self.sync_options, quant=self.quant, on_stage=on_stage,
                            cancel=cancel, reload=self.reload)

    def versions(self) -> tuple[list[Any], str | None]:
        store = self._model().store
        if store is None:
            return [], None
        return store.list(), store.current().id

    def patch_sizes(self) -> dict[str, int]:
        """Version id -> bytes of the patch file that made it (the downlink figure of its round)."""
        from device.history import patch_file_sizes

        store = self._store()
        return patch_file_sizes(self.settings, store.list()) if store is not None and store.installed() else {}

    def switch(self, target: str, expected_current: str) -> Any:
        """Make ``target`` current, but only if ``expected_current`` (what the dialog named) still
        is: another face may have moved CURRENT while the dialog was open."""
        from device.history import switch_version

        model = self._model()
        if model.store is None:
            raise ValueError("this model was given as files; it has no versions to switch between")
        with self._lock:  # the store writes the live (memory-mapped) files in place: no answer meanwhile
            version = switch_version(model.store, target, expected_current)
            if self._session is not None:
                self._session.reload(self._model())
        return version

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None
        if self._queue is not None:
            self._queue.close()
            self._queue = None
