"""The device calls the TUI makes, behind one small object the app's workers call.

Every method blocks and is meant to run in a worker thread.  This is the same glue
``cdcca chat`` / ``cdcca sync`` use: the cloud is reached only through ``device.uplink``'s
client.  ``ChatSession`` is not thread-safe, so every use of it (ask, reload after a patch or a
rollback) holds one lock.  Tests substitute a scripted backend with the same methods.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from device.contracts.config import Settings

ImageData = tuple[bytes, np.ndarray]
OnToken = Callable[[str, Any], None]  # (piece, TokenUncertainty)
OnStage = Callable[[str, float, str], None]


class Backend(Protocol):
    cloud_url: str

    def open(self) -> str: ...  # loads the model; returns its name
    def load_image(self, path: str | Path) -> ImageData: ...
    def ask(self, question: str, image: str | Path | None, image_data: ImageData | None,
            on_token: OnToken) -> Any: ...
    def queue_stats(self) -> Any: ...
    def health(self) -> Any: ...
    def upload(self) -> Any: ...
    def sync(self, on_stage: OnStage, cancel: threading.Event) -> Any: ...
    def versions(self) -> tuple[list[Any], str | None]: ...
    def rollback(self) -> Any: ...
    def close(self) -> None: ...


class DeviceBackend:
    """The real device: versioned model + llama.cpp chat session + SQLite queue + cloud client."""

    def __init__(self, settings: Settings, quant: str | None = None, sync_options: Any = None,
                 health_timeout: float = 3.0, retries: int = 2) -> None:
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
        return self.settings.device_dir / "queue.sqlite"

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
            return self._need_session().ask(question, image=image, image_data=image_data, on_token=on_token)

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

    def health(self) -> Any:
        with self._client(timeout=self._health_timeout, retries=0) as c:
            return c.health()

    def upload(self) -> Any:
        from device.queue import Queue
        from device.uplink import sync_queue

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

    def rollback(self) -> Any:
        model = self._model()
        if model.store is None:
            raise ValueError("this model was given as files; it has no versions to roll back")
        version = model.store.rollback()
        self.reload(self._model())
        return version

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None
        if self._queue is not None:
            self._queue.close()
            self._queue = None
