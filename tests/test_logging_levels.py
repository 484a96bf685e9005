"""Log levels in any case (journey review 28): `innfer demo --model minilm` built the model,
then stopped with "Unknown level: 'info'" before it served; `innfer serve --log-level info`
failed the same way."""

from __future__ import annotations

import logging

import pytest

from innfer.cli import build_parser
from server.app import setup_logging


def test_setup_logging_takes_a_level_in_any_case_and_names_the_choices():
    root = logging.getLogger()
    before = (root.level, root.handlers[:])
    try:
        setup_logging("info")
        assert root.level == logging.INFO
        setup_logging("Warning")
        assert root.level == logging.WARNING
        with pytest.raises(ValueError, match=r"unknown log level 'loud'; choose one of DEBUG"):
            setup_logging("loud")
    finally:
        root.setLevel(before[0])
        root.handlers[:] = before[1]


def test_serve_takes_log_level_in_any_case():
    args = build_parser().parse_args(["serve", "--repository", "x", "--log-level", "debug"])
    assert args.log_level == "DEBUG"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--repository", "x", "--log-level", "loud"])
