"""Can a round use this sample?  One check, asked twice: at the door (``POST /v1/samples``
refuses with 422 naming the field) and again when a round loads its samples (it skips and
reports any it cannot use, so one poisoned sample never wedges a device's rounds; issue 11,
item 2).

Non-finite numbers are refused earlier still, by the wire schema (``allow_inf_nan=False``);
this module checks what a schema cannot: that the image decodes and that the arrays agree.
"""
from __future__ import annotations

import io

from PIL import Image

from device.contracts.image import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from device.contracts.wire import UplinkSample

_DTYPE_BYTES = {"f16": 2, "q8": 1}
_PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def image_problem(data: bytes, declared: str | None) -> str | None:
    """Why ``data`` is not an image the round can decode (None when it is)."""
    if len(data) > MAX_IMAGE_BYTES:
        return f"image is {len(data)} bytes, over the {MAX_IMAGE_BYTES >> 20} MiB limit"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                return f"image is {im.width}x{im.height}, over the {MAX_IMAGE_PIXELS} pixel limit"
            if declared is not None and im.format != _PIL_FORMATS[declared]:
                return f"image_format says {declared} but the bytes are {im.format or 'unknown'}"
            im.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt input
        first = str(exc).splitlines()[0][:80] if str(exc) else "corrupt"
        return f"not a decodable image ({type(exc).__name__}: {first})"
    return None


def sample_problem(sample: UplinkSample) -> tuple[str, str] | None:
    """(field, reason) for the first thing a round could not use, or None."""
    if sample.image is not None:
        reason = image_problem(bytes(sample.image), sample.image_format)
        if reason is not None:
            return "image", reason
    vt = sample.visual_tokens
    if vt is not None:
        want = len(vt.indices) * vt.dim * _DTYPE_BYTES[vt.dtype]
        if len(vt.data) != want:
            return "visual_tokens.data", f"{len(vt.data)} bytes, expected {want} for the indices and dim"
        if any(i < 0 or i >= vt.n_total for i in vt.indices):
            return "visual_tokens.indices", f"an index is outside 0..{vt.n_total - 1}"
        if vt.dtype == "q8" and len(vt.scale) != len(vt.indices):
            return "visual_tokens.scale", "q8 needs one scale per kept token"
    t = sample.tokens
    if not len(t.positions) == len(t.token_ids) == len(t.entropy):
        return "tokens", "positions, token_ids and entropy differ in length"
    return None


def round_problem(sample: UplinkSample) -> str | None:
    """The reason a round skips ``sample`` (as stored in ``samples.skipped``), or None."""
    found = sample_problem(sample)
    return None if found is None else f"{found[0]}: {found[1]}"
