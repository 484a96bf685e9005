"""Open Inference Protocol edges against Triton's answers (review 186), through the real
server and the stock tritonclient: RepositoryIndex tells a model never loaded from one
unloaded, ModelStatistics for every model ("") ignores the version, and ModelReady refuses
a malformed version."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import tritonclient.grpc as tc
from serverutil import ServerThread, build_repository
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """'tiny' loaded at start-up; 'wide' in the repository, not loaded (explicit control)."""
    root = build_repository(tmp_path_factory.mktemp("repository"))
    srv = ServerThread(
        {"repository": str(root), "model_control": "explicit", "models": ["tiny"]}
    ).start()
    client = tc.InferenceServerClient(srv.address)
    yield client
    client.close()
    srv.stop()


def _index(client) -> dict[str, dict]:
    return {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}


def test_the_index_lists_a_model_never_loaded_by_name_and_says_unloaded(served):
    """Triton lists a model with no lifecycle yet by its name alone, and an unloaded one
    UNAVAILABLE with reason "unloaded"; innfer gave both version 1, UNAVAILABLE, no reason."""
    index = _index(served)
    assert index["wide"] == {"name": "wide"}
    assert index["tiny"] == {"name": "tiny", "version": "1", "state": "READY"}
    served.unload_model("tiny")
    try:
        assert _index(served)["tiny"] == {
            "name": "tiny", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"
        }  # fmt: skip
    finally:
        served.load_model("tiny")
    assert _index(served)["tiny"] == {"name": "tiny", "version": "1", "state": "READY"}
    served.load_model("wide")
    try:
        assert _index(served)["wide"]["state"] == "READY"
    finally:
        served.unload_model("wide")
    assert _index(served)["wide"]["reason"] == "unloaded"


def test_a_model_being_loaded_is_loading_not_unknown(served, monkeypatch):
    """While a RepositoryModelLoad ran, the index said "unloaded" (or the name alone) and
    calls got NOT_FOUND "not loaded; load it first"; Triton says LOADING and UNAVAILABLE,
    which a retry policy retries (review helper-235)."""
    from server.model_runtime import ModelRuntime

    started, release = threading.Event(), threading.Event()
    warm_up = ModelRuntime.warm_up

    def held(self, *args, **kwargs):  # (in the server's executor: the loop runs on)
        started.set()
        release.wait(30)
        return warm_up(self, *args, **kwargs)

    monkeypatch.setattr(ModelRuntime, "warm_up", held)
    loader = threading.Thread(target=served.load_model, args=("wide",))
    loader.start()
    try:
        assert started.wait(30)
        assert _index(served)["wide"] == {"name": "wide", "version": "1", "state": "LOADING"}
        with pytest.raises(InferenceServerException, match=r"is loading; retry shortly") as e:
            served.get_model_metadata("wide")
        assert e.value.status() == "StatusCode.UNAVAILABLE"

        # a typo's load, waiting behind it, is no model loading: its calls NOT_FOUND, and
        # the index does not list it (it was LOADING, "retry shortly"; review helper-242)
        def load_typo():
            with contextlib.suppress(InferenceServerException):  # (NOT_FOUND, once its turn)
                served.load_model("wyde")

        typo = threading.Thread(target=load_typo)
        typo.start()
        time.sleep(0.3)
        assert "wyde" not in _index(served)
        with pytest.raises(InferenceServerException, match="unknown model 'wyde'") as e:
            served.get_model_metadata("wyde")
        assert e.value.status() == "StatusCode.NOT_FOUND"
    finally:
        release.set()
        loader.join(30)
        typo.join(30)
    try:
        assert _index(served)["wide"] == {"name": "wide", "version": "1", "state": "READY"}
    finally:
        served.unload_model("wide")


def test_statistics_of_every_model_ignore_the_version(served):
    every = served.get_inference_statistics("", "2", as_json=True)["model_stats"]
    assert [s["name"] for s in every] == ["tiny"]
    with pytest.raises(InferenceServerException, match="has no version '2'"):
        served.get_inference_statistics("tiny", "2")


def test_model_ready_refuses_a_malformed_version(served):
    for version in ("abc", "-1"):
        with pytest.raises(InferenceServerException) as err:
            served.is_model_ready("tiny", version)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", version
    assert served.is_model_ready("tiny", "1") and served.is_model_ready("tiny")
    assert not served.is_model_ready("tiny", "2")  # a version it lacks: not ready
    assert not served.is_model_ready("nope")
