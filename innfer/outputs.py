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
from pathlib import Path


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
    return path if path.suffix else path.with_name(path.name + ".png")


def output_dir(text: str) -> Path:
    """A folder to write into (made if missing): not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a directory")
    return path
