"""The repository volume as operators meet it (review helper-146): folders this process may
not read, a read-only or full volume. The server serves what it can and says, for the rest,
what to fix - the volume, not a rebuild.

The tests run as root here, which no file mode stops, so a folder of mode 000 is simulated
where it must be: ``Path.is_file`` / ``Path.read_text`` raise PermissionError for it as they
do for another user (the errno and message are the kernel's: EACCES)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import grpc
import pytest
from serverutil import ServerThread, build_repository

from runtime.repository import Repository
from server.dataplane import _advice
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as rpc


@pytest.fixture
def forbidden(monkeypatch):
    """``forbid(folder)``: this process may no longer look into ``folder``."""
    denied: list[Path] = []
    is_file, read_text = Path.is_file, Path.read_text

    def check(p: Path) -> None:
        if any(p == d or d in p.parents for d in denied):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))

    monkeypatch.setattr(Path, "is_file", lambda p: check(p) or is_file(p))
    monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: check(p) or read_text(p, *a, **k))
    return denied.append


def test_a_folder_this_process_may_not_read_is_listed_and_the_others_served(tmp_path, forbidden):
    # One such folder made the listing raise: the server refused to start, serving
    # nothing, and RepositoryIndex answered INTERNAL while it ran.
    repo = build_repository(tmp_path / "repo")
    forbidden(repo / "wide")
    assert Repository(repo).names() == ["tiny", "wide"]
    s = ServerThread({"repository": str(repo)}).start()
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = rpc.GRPCInferenceServiceStub(ch)
            index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
            assert index["tiny"].state == "READY"
            assert index["wide"].state == "UNAVAILABLE"
            assert "Permission denied" in index["wide"].reason
            assert "securityContext" in index["wide"].reason  # the volume's fix, not a rebuild
            assert "innfer build" not in index["wide"].reason
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.EACCES, "may not read or write it"),
        (errno.EROFS, "the repository is read-only here"),
        (errno.ENOSPC, "the volume is full"),
    ],
)
def test_a_volume_error_is_answered_with_the_volumes_fix(code, says):
    exc = OSError(code, os.strerror(code), "/models/v1/m/engines/ab12")
    assert says in _advice(exc)
    assert "rebuild" not in _advice(exc)
    wrapped = RuntimeError("cannot build the engine")
    wrapped.__cause__ = exc
    assert says in _advice(wrapped)


def test_folders_that_are_no_model_are_said_at_start(tmp_path, caplog):
    # Serving every model of the repository, a folder named "bad name" (or a link) was
    # passed over without a word; `innfer build` said it, serve did not.
    repo = build_repository(tmp_path / "repo")
    (repo / "bad name").mkdir()
    (repo / "bad name" / "model.yaml").write_text((repo / "tiny" / "model.yaml").read_text())
    with caplog.at_level(logging.WARNING, logger="innfer"):
        s = ServerThread({"repository": str(repo)}).start()
        s.stop()
    assert "'bad name' is not served" in caplog.text


def test_a_configured_model_that_is_a_link_says_why_in_readiness(tmp_path):
    # Refused ("a link out of the repository"), but readiness said "wide (unloaded)".
    repo = build_repository(tmp_path / "repo")
    (tmp_path / "outside").mkdir()
    (repo / "wide").rename(tmp_path / "outside" / "wide")
    (repo / "wide").symlink_to(tmp_path / "outside" / "wide")
    s = ServerThread({"repository": str(repo), "models": ["tiny", "wide"]}).start()
    try:
        reason = s.server.plane.not_ready_reason()
        assert reason is not None and "wide (" in reason and "unloaded" not in reason, reason
    finally:
        s.stop()


def test_an_engine_build_on_a_full_volume_says_so(tmp_path, monkeypatch):
    # ONNX Runtime's "Failed to save ORT format model" said nothing of the disk, and a load
    # added "rebuild it with `innfer build`" (review helper-146).
    import collections
    import shutil

    import onnxruntime as ort

    from runtime.engines import BuildOptions, EngineError, get_backend

    repo = build_repository(tmp_path / "repo")
    onnx = repo / "tiny" / "tiers" / "w100" / "model.onnx"

    def fails(*args, **kwargs):
        raise RuntimeError("SaveToOrtFormat Failed to save ORT format model")

    monkeypatch.setattr(ort, "InferenceSession", fails)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 10, 10))
    with pytest.raises(EngineError) as e:
        get_backend("onnxruntime").build(onnx, tmp_path / "engine", BuildOptions(max_batch=4))
    assert "has 10 bytes free: free space or grow it" in str(e.value)
    assert _advice(e.value) == ""  # its own fix: no rebuild advice appended


def test_an_engine_build_on_a_full_volume_goes_to_the_spare_cache(tmp_path, monkeypatch):
    """ONNX Runtime's failed save was an EngineError alone: a server with an
    engine_cache_spare failed the load instead of building there (review helper-254)."""
    import collections
    import errno
    import shutil

    import onnxruntime as ort

    from runtime.engines import BuildOptions, get_backend
    from runtime.engines.base import VolumeFull
    from runtime.repository.cache import EngineCache

    repo = build_repository(tmp_path / "repo")
    onnx = repo / "tiny" / "tiers" / "w100" / "model.onnx"
    full, spare = tmp_path / "cache", tmp_path / "spare"  # (the repository's is built)
    real_session, real_usage = ort.InferenceSession, shutil.disk_usage

    def session(path, so=None, *args, **kwargs):
        if so is not None and so.optimized_model_filepath.startswith(str(full)):
            raise RuntimeError("SaveToOrtFormat Failed to save ORT format model")
        return real_session(path, so, *args, **kwargs)

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 10, 10)
                        if str(p).startswith(str(full)) else real_usage(p))  # fmt: skip
    engine, built = EngineCache(full, spare=spare).get(
        get_backend("onnxruntime"), onnx, BuildOptions(max_batch=4)
    )
    assert built and any(spare.rglob("model.ort"))
    assert not any(full.rglob("model.ort"))
    engine.close()
    # without a spare: the full volume said as it is, with its fix - not a tuple's repr
    # under a read-only repository's advice (review helper-259)
    with pytest.raises(VolumeFull) as err:
        EngineCache(full).get(get_backend("onnxruntime"), onnx, BuildOptions(max_batch=4))
    assert err.value.errno == errno.ENOSPC and str(err.value).startswith("ONNX Runtime cannot")
    assert str(err.value).endswith(f"the volume holding {full} has 10 bytes free: free space "
                                   "or grow it")  # fmt: skip
    assert "let the server write" not in str(err.value)


def test_an_unreadable_folder_stops_neither_the_config_nor_a_build_message(tmp_path, forbidden):
    # The server config's check of `backend:` / `policy: fixed:` read every model.yaml and
    # raised PermissionError: the server did not start (review helper-147); "no models"
    # looked into every folder for an INN and raised on one it may not read.
    from innfer.cli import _no_models
    from server.config import ServerConfig

    repo = build_repository(tmp_path / "repo")
    forbidden(repo / "wide")
    config = ServerConfig.from_dict({"repository": str(repo), "backend": "onnxruntime"})
    assert [name for name, _ in config._known_models()] == ["tiny"]
    empty = tmp_path / "empty"
    (empty / "lost+found").mkdir(parents=True)
    forbidden(empty / "lost+found")
    assert _no_models(empty).startswith(f"no models in {empty}")


def test_files_linked_out_of_a_models_folder_are_refused_without_their_content(tmp_path):
    # A model.yaml linked to another file was read, and the error quoted ~1 KB of it to
    # every client asking RepositoryIndex; a tier folder linked into another model was read
    # too (review 156). Links inside the folder (a ConfigMap's ..data) still work.
    repo = build_repository(tmp_path / "repo")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the secret line:/root:/bin/bash\n" * 20)
    (repo / "tiny" / "model.yaml").rename(repo / "tiny" / "..data.yaml")
    (repo / "tiny" / "model.yaml").symlink_to("..data.yaml")  # inside: served
    (repo / "wide" / "model.yaml").unlink()
    (repo / "wide" / "model.yaml").symlink_to(secret)
    s = ServerThread({"repository": str(repo), "models": ["tiny", "wide"]}).start()
    try:
        stub = rpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.address))
        index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    finally:
        s.stop()
    assert index["tiny"].state == "READY"
    reason = index["wide"].reason
    assert "wide/model.yaml is a link out of the model's folder" in reason, reason
    assert "secret" not in reason and str(tmp_path) not in reason
    other = Repository(repo)
    tiers = repo / "tiny" / "tiers"
    (tiers / "w050").rename(tmp_path / "w050")
    (tiers / "w050").symlink_to(tmp_path / "w050")
    with pytest.raises(Exception, match=r"tiny/tiers/w050 is a link out of the model's folder"):
        other.load("tiny", backend="onnxruntime")


def test_an_inn_json_or_a_leftover_linked_out_is_refused_not_read(tmp_path):
    """Review 199: inn.json, read at every load for its fingerprints, was followed out of
    the folder - /etc/passwd answered "JSONDecodeError", another JSON "KeyError", telling a
    client what exists outside. And the load's sweep put a leftover link named like a
    swapped-out frontier back as ``frontier``, after the links had been checked."""
    repo = build_repository(tmp_path / "repo")
    outside = tmp_path / "outside"
    (outside / "frontier").mkdir(parents=True)
    (outside / "inn.json").write_text('{"format": "innfer-inn"}')
    (repo / "tiny" / "inn.json").symlink_to(outside / "inn.json")
    with pytest.raises(Exception, match=r"tiny/inn.json is a link out of the model's folder"):
        Repository(repo).load("tiny", backend="onnxruntime")
    (repo / "tiny" / "inn.json").unlink()
    old = repo / "tiny" / "frontier.old-1234abcd"
    old.symlink_to(outside / "frontier")
    os.utime(outside / "frontier", (1, 1))  # past the age a killed swap is put back at
    served = Repository(repo).load("tiny", backend="onnxruntime")
    for engine in served.engines.values():
        engine.close()
    assert not (repo / "tiny" / "frontier").exists() and old.is_symlink()


def test_repository_index_lists_the_folder_off_the_event_loop(tmp_path):
    # The listing ran on the serving loop: 30,000 folders took 0.3 s per RepositoryIndex,
    # and every request waited behind it (review 157); a stalled volume froze the server.
    import threading

    repo = build_repository(tmp_path / "repo")
    s = ServerThread({"repository": str(repo), "models": ["tiny"]}).start()
    threads = []
    names = s.server.plane.repo.names

    def recorded():
        threads.append(threading.current_thread())
        return names()

    s.server.plane.repo.names = recorded
    try:
        stub = rpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.address))
        index = [m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models]
        ready = [m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models]
    finally:
        s.stop()
    assert index == ["tiny", "wide"] and ready == ["tiny"]
    assert len(threads) == 1 and threads[0] is not s.thread  # (none for the ready-only one)


def test_a_server_serves_a_model_whose_profile_is_far_from_its_engines(tmp_path):
    # profile.json at 300 ms per batch where the engine takes ~0.1 ms: the model was READY
    # and refused every request with a 5 ms budget, for good - the online correction stops
    # at 0.2x and refused requests teach it nothing (review 156). Re-measured at load now.
    import json

    import numpy as np

    repo = build_repository(tmp_path / "repo")
    path = repo / "tiny" / "profile.json"
    profile = json.loads(path.read_text())
    for table in profile["tiers"].values():
        for cell in table.values():
            cell.update(p50_ms=300.0, p90_ms=330.0)
    path.write_text(json.dumps(profile))
    s = ServerThread({"repository": str(repo), "models": ["tiny"]}).start()
    try:
        stub = rpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.address))
        req = pb.ModelInferRequest(model_name="tiny")
        req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
        req.raw_input_contents.append(np.zeros((1, 1, 8, 8), np.float32).tobytes())
        req.parameters["latency_budget_ms"].int64_param = 50
        answers = [stub.ModelInfer(req, timeout=10) for _ in range(3)]
    finally:
        s.stop()
    assert all(a.outputs[0].shape == [1, 10] for a in answers)


def test_a_stalled_listing_is_waited_for_once_and_given_up_on(tmp_path, monkeypatch):
    # Each RepositoryIndex took a thread of the default executor for as long as the volume
    # stalled, until loads and the shutdown waited behind them (review 158): one listing at
    # a time now, shared, and given up on after LIST_TIMEOUT_S.
    import threading

    import server.dataplane as dataplane

    monkeypatch.setattr(dataplane, "LIST_TIMEOUT_S", 0.3)
    repo = build_repository(tmp_path / "repo")
    s = ServerThread({"repository": str(repo), "models": ["tiny"]}).start()
    stalled, entered = threading.Event(), []

    def stalls():
        entered.append(1)
        stalled.wait(10)
        return ["tiny", "wide"]

    s.server.plane.repo.names = stalls
    try:
        stub = rpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.address))
        calls = [stub.RepositoryIndex.future(pb.RepositoryIndexRequest()) for _ in range(3)]
        index = [[m.name for m in c.result(timeout=10).models] for c in calls]
        stalled.set()
    finally:
        stalled.set()
        s.stop()
    assert index == [["tiny"]] * 3 and entered == [1]


def test_a_build_only_file_linked_from_a_shared_folder_does_not_stop_the_load(tmp_path):
    # Only what a server reads is checked for links out (a data set or calibration text
    # linked from a shared folder is a build's business).
    repo = build_repository(tmp_path / "repo")
    shared = tmp_path / "shared.txt"
    shared.write_text("calibration text\n")
    (repo / "tiny" / "calibration.txt").symlink_to(shared)
    served = Repository(repo).load("tiny", backend="onnxruntime")
    for engine in served.engines.values():
        engine.close()
    assert sorted(served.tiers) == ["w050", "w100"]
