"""Image loading shared by device and cloud: any file -> RGB uint8 at the model's input size.

Both sides resize with the same Pillow call, so libmtmd receives an image that is already
``image_size`` square (it then skips its own resampler) and the cloud's torch twin sees the same
pixels.  Errors are one line naming the file.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 64_000_000


class ImageError(ValueError):
    pass


def decode_image(data: bytes, image_size: int, name: str = "<bytes>") -> np.ndarray:
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{name}: image is {len(data)} bytes, over the {MAX_IMAGE_BYTES >> 20} MiB limit")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{name}: image is {im.width}x{im.height}, over the {MAX_IMAGE_PIXELS} pixel limit")
            im = im.convert("RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image (unknown format or corrupt file)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None


def read_image_bytes(path: str | Path) -> bytes:
    """Bytes of a *regular* file, at most MAX_IMAGE_BYTES.  A path can name a FIFO (open would
    block forever), a device (``/dev/zero`` never ends) or a symlink to either, so: open with
    O_NONBLOCK, check the opened file itself with fstat (no race with a swapped path), check the
    size, then read at most the cap plus one byte (a file growing under us is still capped)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot open ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{path}: is a directory, not an image")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{path}: is a {_kind(st.st_mode)}, not a regular image file")
        if st.st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"{path}: image is {st.st_size} bytes, over the {MAX_IMAGE_BYTES >> 20} MiB limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{path}: image grew over the {MAX_IMAGE_BYTES >> 20} MiB limit while being read")
    return data


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    return decode_image(read_image_bytes(path), image_size, str(path))


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
