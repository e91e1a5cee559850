"""Patch signatures: the one definition of what the cloud signs and how the device checks it.

A sha256 over plain HTTP proves only that the bytes arrived as the sender sent them; anyone on
the path can send other bytes with their own hash.  So the cloud signs every patch with an
Ed25519 key whose public half the device pinned when it was registered, and the device applies
a patch only if the signature verifies over (patch sha256, round id, base model id).  Binding the
round and the base model keeps a genuine patch from being replayed onto another round or model.

Ed25519 comes from ``cryptography`` (pyca), not from our own code: signatures are not a place
for home-made maths.  HTTPS is still the deployment default; the signature is what makes a
patch trustworthy even where TLS ends early (proxies) or is misconfigured.
"""
from __future__ import annotations

import base64
import binascii
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SIGNATURE_HEADER = "X-Patch-Signature"
_CONTEXT = b"cdcca-patch-signature-v1"
_KEY_B64 = re.compile(r"^[A-Za-z0-9+/]{43}=$")  # 32 raw bytes
_SIG_B64 = re.compile(r"^[A-Za-z0-9+/]{86}==$")  # 64 raw bytes


class SignatureError(ValueError):
    """A patch signature is missing, malformed or wrong; one line, safe to print."""


def patch_message(sha256: str, round_id: str, base_model: str) -> bytes:
    """The signed bytes.  Fields are newline-separated and none may contain a newline (they
    are patterned ids), so two different triples can never produce the same message."""
    for name, value in (("sha256", sha256), ("round_id", round_id), ("base_model", base_model)):
        if not value or "\n" in value:
            raise SignatureError(f"cannot sign a patch with an empty or multi-line {name}")
    return b"\n".join((_CONTEXT, sha256.encode(), round_id.encode(), base_model.encode()))


def sign_patch(key: Ed25519PrivateKey, sha256: str, round_id: str, base_model: str) -> str:
    """Base64 signature, as sent in the ``X-Patch-Signature`` header."""
    return base64.b64encode(key.sign(patch_message(sha256, round_id, base_model))).decode()


def public_key_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    text = text.strip()
    if not _KEY_B64.match(text):
        raise SignatureError("not an Ed25519 public key (expected 44 base64 characters)")
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text))


def verify_patch(public_key: str, signature: str | None, sha256: str, round_id: str,
                 base_model: str) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is the pinned key's over this patch."""
    if not signature:
        raise SignatureError(f"patch of round {round_id} is unsigned, and this device pinned a "
                             "cloud key: refusing it")
    signature = signature.strip()
    if not _SIG_B64.match(signature):
        raise SignatureError(f"patch of round {round_id} has a malformed signature: refusing it")
    try:
        raw = base64.b64decode(signature, validate=True)
        parse_public_key(public_key).verify(raw, patch_message(sha256, round_id, base_model))
    except (InvalidSignature, binascii.Error):
        raise SignatureError(f"patch of round {round_id} is not signed by the pinned cloud key: "
                             "refusing it") from None
