"""Every docstring example in the project's packages runs as a test: they state the units
and the arithmetic (quantiles, interpolation, the turned-away integral) that the rest of the
code relies on, and an example that no longer runs misleads whoever copies it. Modules are
found by their examples (``>>>``), so a new one is covered without a list to keep."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "sim", "runtime", "innfer")


def _modules_with_examples() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "proto_gen" in path.parts or ">>>" not in path.read_text():
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    assert {"server.scheduling.scheduler", "sim.simulator", "runtime.inn.continuous"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    if result.attempted == 0:
        # Every example is marked +SKIP (it needs a trained model, a server or a GPU): the
        # module is reported as skipped, not as a test that passed with nothing run.
        pytest.skip(f"{name}: every docstring example is marked +SKIP; none ran")
    assert result.failed == 0
