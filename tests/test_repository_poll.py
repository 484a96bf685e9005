"""``model_control: poll`` (server/repository_poll.py) on a real server: an edited or rebuilt
model is reloaded and a new folder loaded, without a restart and without a failed request;
a model under a running build waits for it; a broken edit keeps the served version; a
folder that goes is served on."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time

import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from serverutil import ServerThread

from runtime.build.lock import LOCK_FILE
from server.repository_poll import build_running, fingerprint

POLL_S = 0.2


def _until(what, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)


def _edit(path, **changes) -> None:
    spec = yaml.safe_load(path.read_text())
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec))


def _infer(client, model: str) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    i = tc.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    assert client.infer(model, [i]).as_numpy("logits").shape == (1, 10)


@pytest.fixture
def polled(tmp_path, model_repository):
    root = tmp_path / "repo"
    shutil.copytree(model_repository, root, ignore=shutil.ignore_patterns("linked"))
    s = ServerThread({"repository": str(root), "model_control": "poll",
                      "repository_poll_s": POLL_S}).start()  # fmt: skip
    c = tc.InferenceServerClient(s.address)
    yield s, c, root
    c.close()
    s.stop()


def test_an_edited_model_is_reloaded_and_a_new_folder_loaded(polled, caplog):
    s, c, root = polled
    models = s.server.plane.models
    old = models["tiny"]
    _edit(root / "tiny" / "model.yaml", default_latency_budget_ms=250)
    _until(lambda: models["tiny"] is not old)
    assert models["tiny"].config.default_latency_budget_ms == 250
    _infer(c, "tiny")

    shutil.copytree(root / "tiny", root / "tiny2")
    _until(lambda: "tiny2" in models)
    _infer(c, "tiny2")

    with caplog.at_level(logging.WARNING, logger="innfer.poll"):
        shutil.rmtree(root / "tiny2")
        time.sleep(6 * POLL_S)
    assert "tiny2" in models  # served on, said once
    _infer(c, "tiny2")
    assert caplog.text.count("model tiny2's folder (or model.yaml) is gone") == 1


def test_a_model_under_a_running_build_is_left_until_the_build_is_done(polled):
    s, _, root = polled
    models = s.server.plane.models
    old = models["tiny"]
    fd = os.open(root / "tiny" / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as `innfer build` holds it
        assert build_running(root / "tiny")
        _edit(root / "tiny" / "model.yaml", default_latency_budget_ms=300)
        time.sleep(6 * POLL_S)
        assert models["tiny"] is old  # a half-written model is never loaded
    finally:
        os.close(fd)
    assert not build_running(root / "tiny")
    _until(lambda: models["tiny"] is not old)
    assert models["tiny"].config.default_latency_budget_ms == 300


def test_a_broken_edit_keeps_the_served_version_until_it_is_mended(polled):
    s, c, root = polled
    models = s.server.plane.models
    old = models["tiny"]
    path = root / "tiny" / "model.yaml"
    good = path.read_text()
    path.write_text(good + "\nmax_batch: -3\n")  # a config that does not load
    _until(lambda: "tiny" in s.server.plane.reload_failed)
    assert models["tiny"] is old
    _infer(c, "tiny")  # the loaded version serves on
    time.sleep(4 * POLL_S)
    assert models["tiny"] is old  # tried once per change, not at every poll
    path.write_text(good)
    _until(lambda: models["tiny"] is not old)
    _infer(c, "tiny")


def test_the_fingerprint_leaves_out_what_the_server_writes(tmp_path):
    d = tmp_path / "m"
    (d / "tiers" / "w100").mkdir(parents=True)
    (d / "model.yaml").write_text("x")
    (d / "tiers" / "w100" / "tier.json").write_text("{}")
    before = fingerprint(d)
    (d / "engines" / "k").mkdir(parents=True)  # the server builds engines here
    (d / "engines" / "k" / "model.onnx").write_text("e")
    (d / LOCK_FILE).write_text("")  # the build lock
    (d / "auto_tiers.json").write_text("{}")  # auto-tiering's own choice
    assert fingerprint(d) == before
    (d / "tiers" / "w100" / "tier.json").write_text('{"onnx_sha256": "new"}')  # a rebuild
    assert fingerprint(d) != before
