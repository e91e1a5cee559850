"""The version history as the faces show and drive it (CLI `cdcca versions`, the TUI).

Two things the store itself does not know: the size of the patch *file* that made each version
(the one "patch" figure: the bytes the round downloaded, kept under ``Settings.patches_dir``), and
"switch only if the current version is still the one the user was shown" -- another face may have
moved CURRENT since (a dialog that says "v3 -> v0" must never act on v4).
"""
from __future__ import annotations

from typing import Any, Iterable

from device.contracts.config import Settings


def patch_file_sizes(settings: Settings, versions: Iterable[Any]) -> dict[str, int]:
    """Version id -> bytes of its patch file, for versions whose patch file is still on disk."""
    out: dict[str, int] = {}
    for v in versions:
        if not v.parent or not v.round_id:
            continue
        try:
            path = settings.patch_path(v.round_id)
        except ValueError:  # a round id that is not a plain token never becomes a path
            continue
        if path.is_file():
            out[v.id] = path.stat().st_size
    return out


def switch_version(store: Any, target: str, expected_current: str) -> Any:
    """Make ``target`` current if ``expected_current`` still is; any version, back or forward."""
    cur = store.current()
    if cur.id != expected_current:
        raise ValueError(f"the device model is now {cur.id}, not {expected_current} (changed by another "
                         "cdcca); nothing switched")
    if target == cur.id:
        raise ValueError(f"{target} is already the current version")
    if all(v.id != target for v in store.list()):
        known = ", ".join(v.id for v in store.list())
        raise ValueError(f"no version {target!r}; this model has {known}")
    if hasattr(store, "switch"):
        return store.switch(target)
    if target == cur.parent:  # stores without switch() can still go one step back
        return store.rollback()
    raise ValueError(f"this store can only roll back one step (to {cur.parent or 'nothing'}), not to {target}")
