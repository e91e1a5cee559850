"""device/session.py's refusals: checked before any model work, one line each (bug 4)."""
from __future__ import annotations

import pytest

from device.session import check_question, looks_like_path


def test_a_vision_model_refuses_a_question_without_an_image():
    with pytest.raises(ValueError, match="about an image"):
        check_question("what colour is the circle?", has_vision=True, has_image=False)
    assert check_question(" what colour? ", has_vision=True, has_image=True) == "what colour?"
    assert check_question("hello", has_vision=False, has_image=False) == "hello"  # text-only model


def test_an_image_path_typed_as_the_question_is_refused(tmp_path):
    img = tmp_path / "shot"
    img.write_bytes(b"x")
    for q in ("photo.png", "'~/pics/cat.JPG'", str(img)):
        assert looks_like_path(q), q
        with pytest.raises(ValueError, match="looks like an image path"):
            check_question(q, has_vision=True, has_image=True)
    assert not looks_like_path("is the circle in photo.png red?")
    with pytest.raises(ValueError, match="empty"):
        check_question("  ", True, True)
