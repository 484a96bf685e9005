"""Where every benchmark's figures go: one JSON, one PNG, and the table on stdout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def publish(
    results: dict, out: Path, stem: str, plot: Callable[[dict, Path], None], summary: str
) -> None:
    """Write ``out/<stem>.json`` and ``out/<stem>.png``, then print ``summary`` and the paths.

    Example:
        >>> publish(results, Path("bench/results"), "calibration", plot, text)  # doctest: +SKIP
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"{stem}.png")
    print(summary)
    print(f"\nwrote {out / stem}.json and {stem}.png ({results['wall_seconds']:.0f} s)")
