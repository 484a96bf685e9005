"""Log levels in any case (journey review 28): `innfer demo --model minilm` built the model,
then stopped with "Unknown level: 'info'" before it served; `innfer serve --log-level info`
failed the same way."""

from __future__ import annotations

import logging

import pytest

from innfer.cli import build_parser
from server.app import setup_logging


def test_setup_logging_takes_a_level_in_any_case_and_names_the_choices():
    root, ours = logging.getLogger(), logging.getLogger("innfer")
    before = (root.level, root.handlers[:], ours.level)
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
        ours.setLevel(before[2])


def test_debug_is_innfers_own_and_the_libraries_stay_at_info():
    # --log-level debug logged one grpc line per call ("Loaded running loop") and nothing
    # of innfer's; server.allocator / loop_idle / gpu_load were outside innfer.* too
    # (review helper-153).
    import server.allocator
    import server.gpu_load
    import server.loop_idle

    root, ours = logging.getLogger(), logging.getLogger("innfer")
    before = (root.level, root.handlers[:], ours.level)
    try:
        setup_logging("debug")
        assert logging.getLogger("innfer.model").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("grpc._cython.cygrpc").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("grpc._cython.cygrpc").isEnabledFor(logging.INFO)
        for module in (server.allocator, server.gpu_load, server.loop_idle):
            assert module.log.name.startswith("innfer."), module.log.name
            assert module.log.isEnabledFor(logging.DEBUG)
        setup_logging("error")
        assert not logging.getLogger("innfer.model").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("grpc").isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(before[0])
        root.handlers[:] = before[1]
        ours.setLevel(before[2])


def test_serve_takes_log_level_in_any_case():
    args = build_parser().parse_args(["serve", "--repository", "x", "--log-level", "debug"])
    assert args.log_level == "DEBUG"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--repository", "x", "--log-level", "loud"])


def test_the_minilm_demo_reaches_its_server_after_the_build(tmp_path, monkeypatch, capsys):
    # The build and the server are stubbed (minutes of CPU; tests/test_text_*.py run them):
    # this is the glue between them, which crashed.
    import server.app
    from innfer import cli
    from runtime.build import pipeline
    from runtime.demo import minilm_demo

    served = []

    async def serve(config):
        served.append((config, logging.getLogger().level))

    monkeypatch.setattr(minilm_demo, "reusable", lambda *a: True)
    monkeypatch.setattr(minilm_demo, "write_files", lambda *a: None)
    monkeypatch.setattr(pipeline, "build_model", lambda repo, name: None)
    monkeypatch.setattr(cli, "_print_build", lambda *a: None)
    monkeypatch.setattr(server.app, "serve", serve)
    root, ours = logging.getLogger(), logging.getLogger("innfer")
    before = (root.level, root.handlers[:], ours.level)
    try:
        assert cli.main(["demo", "--model", "minilm", "--repository", str(tmp_path)]) == 0
    finally:
        root.setLevel(before[0])
        root.handlers[:] = before[1]
        ours.setLevel(before[2])
    [(config, level)] = served
    assert list(config.models) == ["minilm"] and config.repository == tmp_path
    assert level == logging.INFO
