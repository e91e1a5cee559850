"""device.contracts.signing: the signature binds sha256, round and base model; anything else fails."""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.contracts.signing import (
    SignatureError, parse_public_key, patch_message, public_key_b64, sign_patch, verify_patch,
)

SHA, RID, BASE = "ab" * 32, "0123456789abcdef", "cd" * 16


def test_round_trip_and_every_field_is_bound() -> None:
    key = Ed25519PrivateKey.generate()
    pub, sig = public_key_b64(key), sign_patch(key, SHA, RID, BASE)
    verify_patch(pub, sig, SHA, RID, BASE)
    for args in ((("ba" * 32), RID, BASE), (SHA, "fedcba9876543210", BASE), (SHA, RID, "dc" * 16)):
        with pytest.raises(SignatureError, match="not signed by the pinned"):
            verify_patch(pub, sig, *args)


def test_other_key_missing_and_malformed_signatures_are_one_line_refusals() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pub = public_key_b64(key)
    cases = {sign_patch(other, SHA, RID, BASE): "not signed by the pinned", None: "unsigned",
             "": "unsigned", "not base64!": "malformed", "A" * 86 + "==": "not signed by the pinned"}
    for sig, match in cases.items():
        with pytest.raises(SignatureError, match=match) as err:
            verify_patch(pub, sig, SHA, RID, BASE)
        assert "\n" not in str(err.value)


def test_message_fields_cannot_be_spliced() -> None:
    with pytest.raises(SignatureError):
        patch_message(SHA, RID + "\n" + BASE, BASE)
    with pytest.raises(SignatureError):
        patch_message(SHA, "", BASE)
    with pytest.raises(SignatureError, match="not an Ed25519 public key"):
        parse_public_key("../../etc/passwd")
