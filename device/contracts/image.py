"""Image loading shared by device and cloud: any file -> RGB uint8 at the model's input size.

Both sides resize with the same Pillow call, so libmtmd receives an image that is already
``image_size`` square (it then skips its own resampler) and the cloud's torch twin sees the same
pixels.  Errors are one line naming the file.
"""
from __future__ import annotations

import io
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
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ImageError(f"{path}: image is {size} bytes, over the {MAX_IMAGE_BYTES >> 20} MiB limit")
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    return decode_image(read_image_bytes(path), image_size, str(path))


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
