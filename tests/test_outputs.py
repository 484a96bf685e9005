"""Output paths checked when the command line is read (innfer/outputs.py), before any work."""

from __future__ import annotations

import argparse
import errno
import time

import pytest

from innfer.cli import main
from innfer.outputs import output_dir


def test_an_output_folder_is_written_once_and_left_as_it_was(tmp_path):
    assert output_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []  # the folders it made to try are gone
    (tmp_path / "c").mkdir()
    output_dir(str(tmp_path / "c"))
    assert list((tmp_path / "c").iterdir()) == []  # the probe file is gone


@pytest.mark.parametrize("text", ["", "  "])
def test_an_empty_output_folder_is_refused(text):
    # an unset $OUT wrote the INN, its checkpoint and report into the working directory
    # (review helper-292)
    with pytest.raises(argparse.ArgumentTypeError, match="got an empty path"):
        output_dir(text)


def test_a_read_only_output_folder_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    # `innfer demo --repository /read-only/x` trained the whole model, then failed and kept
    # nothing; `calibrate --out` spent its budget first (review helper-292). As root,
    # os.access says yes on a read-only mount: only a write tells - made to fail here.
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(argparse.ArgumentTypeError, match=r"cannot write into .*Read-only"):
        output_dir(str(tmp_path / "out"))
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    start = time.monotonic()
    with pytest.raises(SystemExit) as refused:  # argparse's usage error
        main(["train", "--model", "digits_mlp", "--epochs", "1",
              "--out", str(tmp_path / "file" / "sub")])  # fmt: skip
    assert refused.value.code == 2 and time.monotonic() - start < 20  # no epoch trained first
    assert "cannot write into" in capsys.readouterr().err


def test_a_plot_without_matplotlib_is_refused_before_the_simulation(tmp_path, monkeypatch, capsys):
    # `innfer simulate --plot` on the torch-free install simulated every policy, then
    # failed importing matplotlib (session 71's noticed list).
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec: not installed
    start = time.monotonic()
    with pytest.raises(SystemExit) as refused:  # argparse's usage error, before any work
        main(["simulate", str(tmp_path / "no-model"), "--plot", str(tmp_path / "t.png")])
    assert refused.value.code == 2 and time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "innfer[build]" in err
    assert not (tmp_path / "t.png").exists()
