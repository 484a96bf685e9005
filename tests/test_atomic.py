"""runtime/atomic.py: a file written whole or not at all, and a failure that names it."""

from __future__ import annotations

import errno
import os
import stat

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


def test_an_output_through_a_link_or_to_a_pipe_is_written_there_not_replaced(tmp_path):
    # `report --json` renamed a temporary file over what the user named: a link became a
    # file (its target left empty), a FIFO's reader got nothing, /dev/full was replaced by
    # a regular file as root (review 176).
    import threading

    from runtime.atomic import write_output

    (tmp_path / "real").mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "real" / "out.json")  # its target not there yet
    write_output(link, b'{"a": 1}')
    assert link.is_symlink() and (tmp_path / "real" / "out.json").read_bytes() == b'{"a": 1}'

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_output(fifo, b"[1, 2]")
    reader.join(10)
    assert got == [b"[1, 2]"] and stat.S_ISFIFO(fifo.stat().st_mode)

    plain = tmp_path / "plain.json"
    write_output(plain, b"x")  # a new file: written whole, as before
    assert plain.read_bytes() == b"x" and not list(tmp_path.glob(".plain.json.*"))


@pytest.mark.parametrize("into", ["pipe", "file"])
def test_an_output_to_dev_stdout_is_appended_where_stdout_goes(tmp_path, into):
    # /dev/stdout is a link to a pipe (whose target has no file name: FileNotFoundError)
    # or to the shell's file (renamed over: what the command printed after was lost);
    # review 179.
    import subprocess
    import sys

    script = tmp_path / "out.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {os.getcwd()!r})\n"
        "from runtime.atomic import write_output\n"
        "print('table')\n"
        "write_output('/dev/stdout', b'{}\\n')\n"
        "print('after')\n"
    )
    if into == "pipe":
        out = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60)
        got = out.stdout
    else:
        with open(tmp_path / "all.txt", "wb") as f:
            out = subprocess.run([sys.executable, str(script)], stdout=f,
                                 stderr=subprocess.PIPE, timeout=60)  # fmt: skip
        got = (tmp_path / "all.txt").read_bytes()
    assert out.returncode == 0, out.stderr
    assert got == b"table\n{}\nafter\n"
