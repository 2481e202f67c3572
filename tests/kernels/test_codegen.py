"""The generated-kernel cache: a private per-user folder, since its files are imported as code."""
from __future__ import annotations

import os
import stat

import pytest

import surgeon
from surgeon.kernels import codegen

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX ownership and modes")


def test_the_default_folder_is_per_user_under_the_cache_home_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("SURGEON_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = codegen.cache_dir()
    assert path == tmp_path / "cache" / "surgeon" / "kernels"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert path.stat().st_uid == os.getuid()


def test_the_environment_variable_overrides_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_KERNEL_CACHE", str(tmp_path / "mine"))
    assert codegen.cache_dir() == tmp_path / "mine"
    module = codegen.load("VALUE = 42\n", "region.q_proj")
    assert module.VALUE == 42 and os.path.dirname(module.__file__) == str(tmp_path / "mine")


def test_a_folder_others_may_write_to_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)    # as /tmp/<anything> made by another tool would be
    monkeypatch.setenv("SURGEON_KERNEL_CACHE", str(shared))
    with pytest.raises(surgeon.KernelError, match="writable by others"):
        codegen.cache_dir()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a folder to another user")
def test_a_folder_another_user_owns_is_refused(tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 12345, 12345)
    monkeypatch.setenv("SURGEON_KERNEL_CACHE", str(theirs))
    with pytest.raises(surgeon.KernelError, match="belongs to user id 12345"):
        codegen.cache_dir()
