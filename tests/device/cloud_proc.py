"""A real cloud server process for the restart tests: ``python cloud_proc.py HOME PORT [ROUND_S [nan]]``.

The API is the real one (cloud.server.create_app under uvicorn); only the round runner is a
stand-in that takes ROUND_S seconds (reporting progress) and then writes a genuine patch for
the device's uploaded model with the real patch builder, so the device verifies and applies it
(with ``nan``: a genuine, signed patch full of NaN, which the device's smoke test must refuse).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def runner_for(round_s: float, nan: bool = False):
    from cloud.registry import ModelRegistry
    from device.contracts.config import load_settings
    from fakecloud import real_patch

    def run(ctx) -> dict:
        t0 = time.monotonic()
        while (left := round_s - (time.monotonic() - t0)) > 0:
            ctx.progress("distil", min(0.99, 1 - left / round_s), f"pid {os.getpid()}")
            time.sleep(min(0.1, left))
        files = ModelRegistry(load_settings().cloud_dir / "models").get(ctx.base_model)
        real_patch(files["model"], Path(ctx.patch_path), round_id=ctx.round_id, nan=nan)
        return {"samples": len(ctx.samples)}

    return run


def main() -> None:
    import uvicorn

    home, port = sys.argv[1], int(sys.argv[2])
    round_s = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
    os.environ["CDCCA_HOME"] = home
    from cloud.server import create_app
    from device.contracts.config import load_settings

    app = create_app(load_settings(), runner_for(round_s, nan="nan" in sys.argv[4:]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
