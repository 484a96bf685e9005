"""runtime/atomic.py: a file written whole or not at all, and a failure that names it."""

from __future__ import annotations

import errno
import os

import pytest

from runtime import atomic
from runtime.atomic import write_json


def test_a_full_volume_is_said_with_the_file_meant(tmp_path, monkeypatch):
    # A write's ENOSPC names no file: `innfer build` said "[Errno 28] No space left on
    # device" alone (review helper-146). The temporary file is not left behind either.
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    path = tmp_path / "m" / "profile.json"
    with pytest.raises(OSError) as e:
        write_json(path, {"x": 1})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert str(path) in str(e.value)
    assert list(path.parent.iterdir()) == []


def test_a_refused_open_names_the_file_not_its_temporary_name(tmp_path, monkeypatch):
    real = open

    def refused(file, *args, **kwargs):
        if str(file).endswith(".tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refused)
    path = tmp_path / "tier.json"
    with pytest.raises(PermissionError) as e:
        write_json(path, {})
    assert e.value.filename == str(path)


def test_a_read_only_volume_is_said_with_the_file_meant(tmp_path, monkeypatch):
    # The temporary file's unlink fails on a read-only volume as well (EROFS, not ENOENT),
    # and its error replaced the one naming the target (review helper-147).
    from pathlib import Path

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    monkeypatch.setattr("builtins.open", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    path = tmp_path / "auto_tiers.json"
    with pytest.raises(OSError) as e:
        write_json(path, {})
    assert e.value.errno == errno.EROFS and e.value.filename == str(path)
