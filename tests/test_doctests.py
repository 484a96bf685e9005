"""The docstring examples of the scheduling policy and the simulators run as tests: they
state the units and the arithmetic (quantiles, interpolation, the turned-away integral)
that the rest of the code relies on."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "server.model_runtime",
    "runtime.repository.records",
    "server.apart",
    "runtime.engines.base",
    "runtime.engines.tensorrt",
    "server.codec",
    "server.limits",
    "server.scheduling.device",
    "server.scheduling.latency",
    "server.scheduling.plan",
    "server.scheduling.policy",
    "server.scheduling.request",
    "server.scheduling.scheduler",
    "sim.engine_time",
    "sim.simulator",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
