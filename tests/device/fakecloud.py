"""A scriptable fake cloud: a real HTTP server on 127.0.0.1 (stdlib http.server in a thread).

It speaks just enough of the API for ``run_sync`` to reach the downlink, and answers whatever a
test scripts -- hostile round ids, absurd sizes, wrong hashes, forged or missing signatures --
so the device's defences are exercised over a real socket, not a mocked client.
"""
from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gguf import GGMLQuantizationType, GGUFReader

from cloud.patch_build import make_patch_from_arrays
from device.contracts.signing import public_key_b64, sign_patch

RID = "0123456789abcdef"
NOW = datetime.now(timezone.utc).isoformat()


def round_status(round_id: str = RID, state: str = "done", base_model: str = "", **kw: Any) -> dict:
    return {"round_id": round_id, "state": state, "stage": "done", "progress": 1.0, "message": "",
            "base_model": base_model, "n_samples": 3, "created_at": NOW, **kw}


def real_patch(model_file: Path, out: Path, round_id: str = RID, nan: bool = False) -> bytes:
    """A genuine patch for ``model_file`` built with the real builder: one F32 tensor scaled
    by 1.01 (harmless), or filled with NaN (hash-valid, and breaks every answer)."""
    reader = GGUFReader(model_file, "r")
    t = next(t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.F32)
    arr = np.array(t.data, dtype=np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
    new = np.full_like(arr, np.nan) if nan else arr * 1.01 + 0.01
    del reader
    make_patch_from_arrays(model_file, {t.name: (new, None)}, out, round_id=round_id)
    return out.read_bytes()


class FakeCloud:
    """``with FakeCloud() as cloud: cloud.script[...] = ...; cloud.url``.

    ``script`` keys: ``create`` (POST /v1/rounds body), ``status`` (GET /v1/rounds/{id} body),
    ``rid`` (the round id), ``patch`` (bytes), ``patch_headers`` (dict, overrides), ``sign_with`` (a private key, or None
    for no signature), ``announce`` (public key in /v1/health), ``endless`` (stream forever).
    """

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.script: dict[str, Any] = {"sign_with": self.key, "announce": public_key_b64(self.key)}
        self.requests: list[str] = []
        self.base_model = ""
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                cloud.requests.append(f"GET {self.path}")
                cloud.handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                cloud.requests.append(f"POST {self.path}")
                if self.path == "/v1/rounds":
                    cloud.base_model = json.loads(body)["base_model"]
                cloud.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ------------------------------------------------------------------ answers
    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path, s = h.path, self.script
        if path == "/v1/health":
            return self.json(h, {"ok": True, "version": "fake", "max_upload_bytes": 1 << 20,
                                 "signing_key": s.get("announce")})
        if path == "/v1/me":
            return self.json(h, {"name": "laptop", "created_at": NOW, "samples": {"total": 3, "unused": 3}})
        if path.startswith("/v1/models/"):
            return self.json(h, {"model_id": path.rsplit("/", 1)[1], "present": True})
        if path == "/v1/rounds" and method == "GET":
            return self.json(h, s.get("list", []))
        if path == "/v1/rounds" and method == "POST":
            return self.json(h, s.get("create", round_status(s.get("rid", RID), state="queued",
                                                             base_model=self.base_model)), 202)
        if path.endswith("/patch"):
            return self.patch(h)
        if path.endswith("/release"):
            return self.json(h, {"detail": "released"})
        if path.startswith("/v1/rounds/"):
            return self.json(h, s.get("status", round_status(s.get("rid", RID), base_model=self.base_model)))
        return self.json(h, {"detail": "no such route"}, 404)

    def patch(self, h: BaseHTTPRequestHandler) -> None:
        s = self.script
        data: bytes = s.get("patch", b"")
        sha = hashlib.sha256(data).hexdigest()
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data)),
                   "X-Patch-SHA256": sha}
        if s.get("sign_with") is not None:
            rid = h.path.split("/")[3]
            headers["X-Patch-Signature"] = sign_patch(s["sign_with"], sha, rid, s.get("signed_base", self.base_model))
        headers.update(s.get("patch_headers", {}))
        if s.get("endless"):
            headers.pop("Content-Length", None)
            headers["Transfer-Encoding"] = "chunked"
        h.send_response(200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        try:
            if s.get("endless"):
                chunk = b"\0" * (1 << 16)
                for _ in range(1 << 14):  # 1 GiB at most, far past any cap
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                h.wfile.write(b"0\r\n\r\n")
            else:
                h.wfile.write(data[: s.get("send_bytes", len(data))])
        except (BrokenPipeError, ConnectionResetError):
            pass
        h.close_connection = True

    @staticmethod
    def json(h: BaseHTTPRequestHandler, body: Any, status: int = 200) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "FakeCloud":
        self.thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
