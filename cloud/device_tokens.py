"""Devices and their bearer tokens, as part of the store (``Store`` inherits it).

Tokens are stored only as SHA-256 hashes: a leaked database does not leak credentials.  A
revoked device keeps its samples and rounds (its hash is NULL); rotating re-admits it.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from device.contracts.wire import DEVICE_NAME_PATTERN as _NAME

from .schema import devices, utcnow

DEVICE_NAME_PATTERN = re.compile(_NAME)


def aware(value: datetime | None) -> datetime | None:
    """SQLite drops tzinfo on the way back; every timestamp we write is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class DeviceRow:
    name: str
    created_at: datetime
    revoked: bool = False


def _device_row(row) -> DeviceRow:
    return DeviceRow(row.name, aware(row.created_at), revoked=row.token_sha256 is None)


class DeviceTokens:
    """Mixin over ``self.engine`` (see cloud.store.Store)."""

    def add_device(self, name: str) -> str:
        """Register a device and return its bearer token; the token is shown once, never stored."""
        if not DEVICE_NAME_PATTERN.match(name):
            raise ValueError(f"invalid device name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
        token = secrets.token_urlsafe(32)
        row = {"name": name, "token_sha256": hash_token(token), "created_at": utcnow()}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(devices).values(**row))
        except IntegrityError:
            raise ValueError(f"device {name!r} already exists") from None
        return token

    def rotate_token(self, name: str) -> str:
        """A new token for ``name``; the old one (or a revoked state) stops working at once."""
        token = secrets.token_urlsafe(32)
        self._set_token(name, hash_token(token))
        return token

    def revoke(self, name: str) -> None:
        """The device's token stops working; its samples and rounds stay (rotate to re-admit)."""
        self._set_token(name, None)

    def _set_token(self, name: str, digest: str | None) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(update(devices).where(devices.c.name == name)
                                .values(token_sha256=digest)).rowcount
        if done != 1:
            raise ValueError(f"no device {name!r}; see `cdcca cloud devices`")

    def device_for_token(self, token: str) -> str | None:
        """The device owning ``token``.  The lookup is by hash, so its timing reveals nothing
        useful; the final equality is still checked in constant time."""
        if not token:
            return None
        digest = hash_token(token)
        with self.engine.connect() as conn:
            row = conn.execute(
                select(devices.c.name, devices.c.token_sha256).where(devices.c.token_sha256 == digest)
            ).first()
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            return None
        return row.name

    def get_device(self, name: str) -> DeviceRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(devices).where(devices.c.name == name)).first()
        return None if row is None else _device_row(row)

    def list_devices(self) -> list[DeviceRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(devices).order_by(devices.c.name)).all()
        return [_device_row(r) for r in rows]
