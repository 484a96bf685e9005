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
    with pytest.raises(Exception, match="loads what changes in its repository"):
        c.load_model("tiny")  # the mode's own advice, not "model control is disabled"

    gone = "model tiny2's folder (or model.yaml) is gone"
    with caplog.at_level(logging.WARNING, logger="innfer.poll"):
        shutil.rmtree(root / "tiny2")
        _until(lambda: gone in caplog.text)  # (a fixed 6 polls' sleep: a loaded CI core)
        time.sleep(6 * POLL_S)  # polls after the first: not said again
    assert "tiny2" in models  # served on, said once
    _infer(c, "tiny2")
    assert caplog.text.count(gone) == 1


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


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_a_server_started_during_a_build_loads_the_model_once_it_is_done(
    tmp_path, model_repository, mode, caplog
):
    # Started while `innfer build` held the folder: the load failed on the half-written
    # tiers and was kept as the model's failure ("run `innfer build`", the build running)
    # until a restart; in poll mode the folder was said gone, then reloaded for no change
    # (review helper-278).
    root = tmp_path / "repo"
    shutil.copytree(model_repository, root, ignore=shutil.ignore_patterns("linked"))
    fd = os.open(root / "tiny" / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as `innfer build` holds it
    cfg = {"repository": str(root), "models": ["tiny"], "model_control": mode,
           "repository_poll_s": POLL_S}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="innfer"):
        s = ServerThread(cfg).start()
        try:
            time.sleep(1.0)
            plane = s.server.plane
            assert "tiny" not in plane.models and "tiny" not in plane.broken
            said = "models not loaded: tiny (waiting for its `innfer build` to end)"
            assert plane.not_ready_reason() == said
            os.close(fd)  # the build is done
            _until(lambda: "tiny" in plane.models)
            time.sleep(6 * POLL_S)
            c = tc.InferenceServerClient(s.address)
            _infer(c, "tiny")
            assert c.is_server_ready()
            c.close()
        finally:
            s.stop()
    assert "is gone" not in caplog.text and "model tiny not loaded" not in caplog.text, caplog.text
    assert caplog.text.count("model tiny ready: tiers") == 1, caplog.text  # loaded once


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


def _model_folder(tmp_path):
    """A model folder of a model.yaml and one tier's tier.json."""
    d = tmp_path / "m"
    (d / "tiers" / "w100").mkdir(parents=True)
    (d / "model.yaml").write_text("x")
    (d / "tiers" / "w100" / "tier.json").write_text("{}")
    return d


def test_the_fingerprint_leaves_out_what_the_server_writes(tmp_path):
    d = _model_folder(tmp_path)
    before = fingerprint(d)
    (d / "engines" / "k").mkdir(parents=True)  # the server builds engines here
    (d / "engines" / "k" / "model.onnx").write_text("e")
    (d / LOCK_FILE).write_text("")  # the build lock
    (d / "auto_tiers.json").write_text("{}")  # auto-tiering's own choice
    (d / "inn.json").write_text("{}")  # a calibration's record: a rebuild follows it
    (d / "frontier.png").write_text("a plot")  # innfer tiers frontier's
    (d / "model.yaml~").write_text("x")  # an editor's backup
    (d / "tiers" / "w100.old-1a2b3c4d").mkdir()  # a swap's leftover: the load sweeps it
    (d / "tiers" / "w100.old-1a2b3c4d" / "tier.json").write_text("{}")
    assert fingerprint(d) == before
    (d / "tiers" / "w100" / "tier.json").write_text('{"onnx_sha256": "new"}')  # a rebuild
    assert fingerprint(d) != before
    before = fingerprint(d)
    (d / "tiers" / "w100" / "model.onnx").write_text("net")  # a copy's last file
    assert fingerprint(d) != before


def test_the_fingerprint_sees_a_mode_fix_and_a_model_yaml_that_is_no_file(tmp_path):
    # A chmod that makes a tier's file readable changed no stamp: the model that failed on
    # it stayed failed after the fix; and a model.yaml linked to nothing (a ConfigMap not
    # mounted) read as no model - its failure forgotten, readiness back (review helper-271).
    d = _model_folder(tmp_path)
    before = fingerprint(d)
    os.chmod(d / "tiers" / "w100" / "tier.json", 0o600)
    assert fingerprint(d) != before
    (d / "model.yaml").unlink()
    (d / "model.yaml").symlink_to(tmp_path / "nowhere.yaml")
    linked = fingerprint(d)
    assert linked is not None and linked != before
    (d / "model.yaml").unlink()
    assert fingerprint(d) is None  # gone: no model here


def test_an_edit_of_the_same_size_within_one_clock_tick_is_seen(tmp_path):
    # The fingerprint was (inode, mtime_ns, size) per file: an in-place edit of model.yaml
    # to the same size within the file system's timestamp tick (a jiffy, ~4 ms, on ext4)
    # after a poll had looked was never loaded - nothing else would change again.
    d = tmp_path / "m"
    (d / "tiers" / "w100").mkdir(parents=True)
    config, record = d / "model.yaml", d / "tiers" / "w100" / "tier.json"
    config.write_text("max_batch: 8\n")
    record.write_text('{"a": 1}')
    before = fingerprint(d)
    for path, text in ((config, "max_batch: 4\n"), (record, '{"a": 2}')):
        st = path.stat()
        with path.open("r+") as f:  # in place: the same inode
            f.write(text)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # within the same tick
        after = fingerprint(d)
        assert path.stat().st_ino == st.st_ino and after != before, path.name
        before = after


def test_a_model_copied_in_loads_once_its_last_file_lands_and_a_failed_one_that_goes_is_forgotten(
    polled,
):
    # Its tiers' networks came after the rest (a sync tool's big files last): the first try
    # failed and nothing ever tried again, the fingerprint seeing tier.json only; and a
    # folder that failed and went stayed "not ready" for good (review 207).
    s, c, root = polled
    plane = s.server.plane
    shutil.copytree(root / "tiny", root / "late",
                    ignore=shutil.ignore_patterns("model.onnx", "engines"))  # fmt: skip
    _until(lambda: "late" in plane.broken)
    for tier in ("w100", "w050"):
        shutil.copyfile(root / "tiny" / "tiers" / tier / "model.onnx",
                        root / "late" / "tiers" / tier / "model.onnx")  # fmt: skip
    _until(lambda: "late" in plane.models)
    _infer(c, "late")

    shutil.copytree(root / "tiny", root / "oops", ignore=shutil.ignore_patterns("model.onnx"))
    _until(lambda: "oops" in plane.broken)
    shutil.rmtree(root / "oops")
    _until(lambda: "oops" not in plane.broken)
    text = plane.metrics.registry.get_sample_value("innfer_model_ready", {"model": "oops"})
    assert text is None  # its not-ready series went with it


def test_a_poll_reload_answers_the_whole_queue_and_one_folder_it_cannot_read_stops_nothing(
    tmp_path, monkeypatch
):
    # An operator's unload drains 0.5 s; the poll's own reload answers the queue (35 of 50
    # queued requests of a slow model were failed UNAVAILABLE), and a folder it may not
    # read stopped the look at every model (review 207). A stand-in plane: the wiring.
    import asyncio

    from server import repository_poll

    loads = []

    async def load(name, drain_s="default"):
        loads.append((name, drain_s))

    poller = _stand_in_poller(tmp_path, load)
    real = repository_poll.fingerprint

    def fingerprint(d):
        if d.name == "a":
            raise PermissionError(13, "Permission denied", str(d))
        return real(d)

    monkeypatch.setattr(repository_poll, "fingerprint", fingerprint)

    async def body():
        await poller.baseline()
        (tmp_path / "b" / "model.yaml").write_text("b, edited")
        await poller._load_changed(poller._look({"a", "b"}))

    asyncio.run(body())
    assert loads == [("b", None)]


def test_a_slow_drain_does_not_hold_up_another_models_reload(tmp_path):
    # The poller awaited each load to the end of its replaced version's drain - a model
    # with 20 s budgets stalled every other model's reload that long (review 209).
    import asyncio

    started, a_drained = [], None

    async def load(name, drain_s="default"):
        started.append(name)
        if name == "a":
            await a_drained.wait()  # its old version's queue still being answered

    poller = _stand_in_poller(tmp_path, load)

    async def body():
        nonlocal a_drained
        a_drained = asyncio.Event()
        await poller.baseline()
        for name in ("a", "b"):
            (tmp_path / name / "model.yaml").write_text(name + " edited")
        await poller._load_changed(poller._look({"a", "b"}))
        await asyncio.sleep(0.05)
        assert started == ["a", "b"]  # b's reload began while a's drain went on
        (tmp_path / "a" / "model.yaml").write_text("a edited again")
        await poller._load_changed(poller._look({"a", "b"}))
        await asyncio.sleep(0.05)
        assert started == ["a", "b"]  # one load per model at a time: a's is not done
        a_drained.set()
        await asyncio.sleep(0.05)
        await poller._load_changed(poller._look({"a", "b"}))
        await asyncio.sleep(0.05)
        assert started == ["a", "b", "a"]  # its later change, once the first load is done

    asyncio.run(body())


def _stand_in_poller(root, load):
    """A poller over models 'a' and 'b' in ``root`` (both served, the server serving every
    model) whose plane's only behaviour is ``load(name, drain_s)``: the poller's wiring."""
    import asyncio
    from types import SimpleNamespace

    from server import repository_poll

    for name in ("a", "b"):
        (root / name).mkdir()
        (root / name / "model.yaml").write_text(name)
    plane = SimpleNamespace(
        repo=SimpleNamespace(root=root, names=lambda: ["a", "b"]),
        config=SimpleNamespace(models=()), models={"a": 1, "b": 1}, broken={},
        expected={"a", "b"}, closing=asyncio.Event(), load=load,
    )  # fmt: skip
    return repository_poll.RepositoryPoller(plane, period_s=0.01)
