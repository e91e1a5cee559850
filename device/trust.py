"""What the device keeps secret or trusts: private folders, the token file, the pinned cloud key.

The device folder holds the user's images and prompts (queue.sqlite) and the credential that
speaks for the device, so it is 0700 and its files 0600.  A token typed on the command line
shows in ``ps``; the environment (``CDCCA_DEVICE_TOKEN``) or ``<device_dir>/token`` (0600) do not.

The cloud's patch-signing key is pinned in ``<device_dir>/cloud_key.pub``: given explicitly
(``CDCCA_CLOUD_KEY``, printed by ``cdcca cloud add-device``), or trusted on first use from the
cloud's ``/v1/health`` when nothing was given.  Once pinned, a different key is refused: a
cloud that changed keys must be re-pinned by a person (delete the file), never by the network.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from device.contracts.atomic import write_bytes_atomic
from device.contracts.signing import SignatureError, parse_public_key

TOKEN_FILE = "token"
PINNED_KEY_FILE = "cloud_key.pub"
KEY_ENV = "CDCCA_CLOUD_KEY"


def private_dir(path: Path) -> Path:
    """Create ``path`` (0700) or tighten it, if it is ours and not a shared sticky dir (/tmp)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.getuid() and not st.st_mode & stat.S_ISVTX and stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Atomic write of a 0600 file (tmp + fsync + rename + dir fsync): readers see old or new,
    and the temp file is 0600 from its creation."""
    path = Path(path)
    private_dir(path.parent)
    write_bytes_atomic(path, data, mode=0o600)


def read_token(device_dir: Path, given: str | None = None) -> str | None:
    """The device token: ``given`` (flag or CDCCA_DEVICE_TOKEN via Settings) wins, else the
    token file.  A token file readable by others is refused rather than silently used."""
    if given:
        return given.strip()
    path = Path(device_dir) / TOKEN_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"{path}: token file is readable by others; run `chmod 600 {path}`")
    return path.read_text().strip() or None


def save_token(device_dir: Path, token: str) -> Path:
    path = Path(device_dir) / TOKEN_FILE
    write_private(path, token.strip().encode() + b"\n")
    return path


def pinned_key(device_dir: Path) -> str | None:
    path = Path(device_dir) / PINNED_KEY_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        parse_public_key(text)
    except SignatureError as e:
        raise SignatureError(f"{path}: {e}") from None
    return text


def pin_key(device_dir: Path, key: str) -> str:
    """Pin ``key`` unless another one is pinned already (then refuse, one line)."""
    key = key.strip()
    parse_public_key(key)
    current = pinned_key(device_dir)
    if current is not None and current != key:
        raise SignatureError(f"the cloud's signing key differs from the one pinned in "
                             f"{Path(device_dir) / PINNED_KEY_FILE}; if the cloud really changed "
                             "its key, delete that file and pin the new one")
    if current is None:
        write_private(Path(device_dir) / PINNED_KEY_FILE, key.encode() + b"\n")
    return key


def trusted_key(device_dir: Path, announced: str | None, configured: str | None = None) -> str | None:
    """The key patches must be signed with: the configured one (pinned now if new), else the
    pinned one, else the cloud's announced one pinned on first use; None if nobody has a key."""
    configured = configured if configured is not None else os.environ.get(KEY_ENV)
    if configured:
        return pin_key(device_dir, configured)
    current = pinned_key(device_dir)
    if current is not None:
        return current
    return pin_key(device_dir, announced) if announced else None
