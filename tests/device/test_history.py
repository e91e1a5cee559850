"""device/history.py: the patch file sizes the faces show and the guarded version switch."""
from __future__ import annotations

import pytest

from device.contracts.config import load_settings
from device.history import patch_file_sizes, switch_version
from device.versions import Version


class Store:
    """A store with versions v0 <- v1 <- v2 (no switch(): only a step back is possible)."""

    def __init__(self, current: str) -> None:
        self.cur = current
        self.vs = [Version("v0", None, "", "t", {}), Version("v1", "v0", "aa11", "t", {}, patch_bytes=7),
                   Version("v2", "v1", "bb22", "t", {}, patch_bytes=9)]

    def current(self) -> Version:
        return next(v for v in self.vs if v.id == self.cur)

    def list(self) -> list[Version]:
        return list(self.vs)

    def rollback(self) -> Version:
        self.cur = self.current().parent
        return self.current()


def test_patch_sizes_are_the_patch_files_bytes(tmp_path):
    s = load_settings(home=tmp_path)
    s.patches_dir.mkdir(parents=True)
    s.patch_path("aa11").write_bytes(b"x" * 44_896)
    sizes = patch_file_sizes(s, Store("v2").list())
    assert sizes == {"v1": 44_896}  # v2's file is gone: the record's figure stays


def test_a_round_id_that_is_not_a_plain_token_never_becomes_a_path(tmp_path):
    s = load_settings(home=tmp_path)
    for bad in ("../x", "a/b", "", "a.b"):
        with pytest.raises(ValueError):
            s.patch_path(bad)
    assert patch_file_sizes(s, [Version("v1", "v0", "../../etc", "t", {})]) == {}


def test_switch_acts_only_on_the_version_the_user_was_shown():
    st = Store("v2")
    with pytest.raises(ValueError, match="now v2, not v1"):
        switch_version(st, "v0", "v1")  # the dialog said "v1 -> v0" but another face made v2
    assert st.cur == "v2"
    assert switch_version(st, "v1", "v2").id == "v1"
    with pytest.raises(ValueError, match="one step"):
        switch_version(st, "v2", "v1")  # forward needs VersionStore.switch
    with pytest.raises(ValueError, match="no version"):
        switch_version(st, "v7", "v1")
