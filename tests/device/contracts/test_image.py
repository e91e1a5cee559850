"""device.contracts.image: only regular files are read, size-capped, with one-line errors."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from device.contracts import image as img
from device.contracts.image import ImageError, encode_png, load_image, read_image_bytes


def test_fifo_is_refused_at_once_not_hung_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    done = threading.Event()
    errors: list[str] = []

    def read() -> None:
        try:
            read_image_bytes(fifo)
        except ImageError as e:
            errors.append(str(e))
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(5), "reading a named pipe hung"
    assert errors == [f"{fifo}: is a named pipe, not a regular image file"]


def test_symlink_to_dev_zero_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "zero.png"
    link.symlink_to("/dev/zero")
    with pytest.raises(ImageError, match="is a character device, not a regular image file") as err:
        load_image(link, 32)
    assert "\n" not in str(err.value)


def test_symlink_to_a_regular_image_still_works(tmp_path: Path) -> None:
    real = tmp_path / "real.png"
    real.write_bytes(encode_png(np.full((8, 8, 3), 7, np.uint8)))
    link = tmp_path / "link.png"
    link.symlink_to(real)
    assert load_image(link, 8).shape == (8, 8, 3)


def test_size_cap_is_checked_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(1 << 20)  # sparse: costs no disk
    monkeypatch.setattr(img, "MAX_IMAGE_BYTES", 1 << 10)
    with pytest.raises(ImageError, match="over the"):
        read_image_bytes(big)


def test_missing_directory_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such image file"):
        read_image_bytes(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        read_image_bytes(tmp_path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(junk, 8)
