"""Where commands write: argparse types that check an output path when the command line is
read, before the work - a simulation, a live run, a calibration or a training ran to the
end, then failed with "[Errno 2] No such file or directory" and kept nothing.

Example:
    >>> output_file("/tmp/figures.json")
    PosixPath('/tmp/figures.json')
    >>> png_file("/tmp/timeline")
    PosixPath('/tmp/timeline.png')
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
from pathlib import Path

from runtime.atomic import probe_write


def output_file(text: str) -> Path:
    """A file to write: its folder exists, and it is no folder itself."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name in it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"{path.parent} is not a directory; create it first (mkdir -p {path.parent})"
        )
    return path


def png_file(text: str) -> Path:
    """A PNG to write, as ``output_file``; ".png" added where it has no suffix (matplotlib
    adds it, and the path printed was not the file written)."""
    path = output_file(text)
    if path.suffix and path.suffix.lower() != ".png":  # matplotlib refused it after the work
        raise argparse.ArgumentTypeError(f"{text} is not a .png file; give NAME.png")
    if importlib.util.find_spec("matplotlib") is None:
        # The torch-free install has none: `innfer simulate --plot` simulated every policy,
        # then failed on the import and the figures it printed had no plot.
        raise argparse.ArgumentTypeError(
            f"writing {text} needs matplotlib, which the 'build' extra installs: "
            "pip install 'innfer[build]' (or leave the plot out)"
        )
    return path if path.suffix else path.with_name(path.name + ".png")


def output_dir(text: str) -> Path:
    """A folder to write into: made and written to once here (a file made and removed,
    then the folders this made), so that a path that cannot be written is refused before
    the work - it failed only after the training or calibration it was to keep, minutes of
    `innfer demo` lost to a read-only mount - and an empty one (an unset ``$OUT``) is not
    the working directory (review helper-292). (Root passes ``os.access`` on read-only
    mounts: only a write tells.)"""
    if not text.strip():
        raise argparse.ArgumentTypeError("got an empty path; give a directory (. for this one)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a directory")
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        probe_write(path)
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot write into {text} ({exc.strerror or exc}); give a folder you can write to"
        ) from None
    finally:
        for p in made:  # as it was: the command makes what it writes
            with contextlib.suppress(OSError):
                p.rmdir()
    return path
