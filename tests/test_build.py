"""innfer build: tiers, engines, cache, validation, profile; the torch-free serving loader."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from netgen import tiny_cnn

import runtime
from runtime.build.pipeline import add_model, build_model
from runtime.engines import Backend, get_backend
from runtime.repository import Repository, RepositoryError
from runtime.repository.config import ConfigError, ModelConfig

CONFIG = {
    "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
    "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
    "max_batch": 4,
    "threads": 1,
    "evaluation": {"dataset": "digits", "limit": 64},
}


_net = tiny_cnn


def build_tiny(root, config: dict = CONFIG, repeats: int = 5):
    """The tiny CNN converted, added as 'tiny' with ``config`` and built: (root, report)."""
    inn = runtime.convert(_net(), (torch.randn(1, 1, 8, 8),))
    add_model(root, "tiny", inn, config)
    return root, build_model(Repository(root), "tiny", progress=False, repeats=repeats)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("repo"))


def test_build_end_to_end(built):
    root, report = built
    assert [t.name for t in report.tiers] == ["w100", "w050"]
    assert all(t.exported and t.engine_built for t in report.tiers)
    assert all(t.max_abs_err < 1e-4 for t in report.tiers)  # engine == torch sample
    assert all(t.accuracy is not None and 0 <= t.accuracy <= 1 for t in report.tiers)
    profile = json.loads((root / "tiny" / "profile.json").read_text())
    assert set(profile["tiers"]) == {"w100", "w050"}
    for lat in profile["tiers"].values():
        assert set(lat) == {"1", "2", "4"}
        assert all(v["p50_ms"] > 0 and v["p90_ms"] >= v["p50_ms"] for v in lat.values())
    repo = Repository(root)
    full, half = repo.load_record("tiny", "w100"), repo.load_record("tiny", "w050")
    assert half.flops < full.flops and half.params < full.params


def test_a_calibrated_tier_is_what_the_build_exports(tmp_path):
    import onnxruntime as ort

    from runtime.inn.calibrate import calibrate

    torch.manual_seed(1)
    x = torch.rand(128, 1, 8, 8)
    inn = runtime.convert(_net(), (x[:2],), fold_norms=False)
    tuned = calibrate(inn, x, [0.5], seconds=5, max_steps=5, grid_share=0, progress=False)
    config = {k: v for k, v in CONFIG.items() if k != "evaluation"}
    add_model(tmp_path, "cal", tuned, config)
    build_model(Repository(tmp_path), "cal", progress=False, profile=False)
    session = ort.InferenceSession(str(tmp_path / "cal" / "tiers" / "w050" / "model.onnx"))
    got = session.run(None, {"input": x[:4].numpy()})[0]
    with torch.no_grad():
        calibrated = tuned.sample(0.5)(x[:4]).numpy()
        sampled = tuned.sample(0.5, calibrated=False)(x[:4]).numpy()
    np.testing.assert_allclose(got, calibrated, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, sampled, atol=1e-3)


def test_a_second_build_of_a_model_waits_for_the_first(built, caplog):
    """Two builds exporting different bytes for a tier deleted or rewrote each other's
    tier.json, both exiting 0, and the model no longer loaded (review 187): one at a time."""
    import fcntl
    import logging
    import os
    import threading
    import time

    from runtime.build.lock import LOCK_FILE

    root, _ = built
    fd = os.open(root / "tiny" / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another build's (a descriptor of its own: flock's unit)
    done = []

    def build():
        done.append(build_model(Repository(root), "tiny", progress=False, repeats=2))

    thread = threading.Thread(target=build)
    with caplog.at_level(logging.WARNING, logger="innfer.build"):
        thread.start()
        try:
            deadline = time.monotonic() + 15  # (said after ~0.2 s; a loaded CI core: later)
            while "waiting for another build" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not done and thread.is_alive()
            assert "waiting for another build of tiny to finish" in caplog.text
        finally:
            os.close(fd)
        thread.join(120)
    assert done and [t.name for t in done[0].tiers] == ["w100", "w050"]
    Repository(root).load("tiny")


def test_the_build_lock_opens_read_only_where_another_user_made_it(tmp_path, monkeypatch):
    """A lock file only its creator could write left other users' builds unlocked (review
    189): read-only is enough for flock."""
    import fcntl
    import os

    from runtime.build import lock

    real = os.open

    def not_writable(path, flags, *mode):
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *mode)

    (tmp_path / lock.LOCK_FILE).touch()
    monkeypatch.setattr(os, "open", not_writable)
    with lock.one_build(tmp_path):
        other = real(tmp_path / lock.LOCK_FILE, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # held: another build would wait
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)


def test_rebuild_is_a_cache_hit(built):
    root, _ = built
    again = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert not any(t.exported or t.engine_built for t in again.tiers)


def _engine_dirs(root):
    return sorted(p for p in (root / "tiny" / "engines").iterdir() if p.is_dir())


def test_corrupted_engine_file_is_rebuilt(built):
    root, _ = built
    entry = _engine_dirs(root)[0]
    (entry / "model.ort").write_bytes(b"garbage")
    built_keys = []
    served = Repository(root).load("tiny", on_build=lambda tier, key: built_keys.append(key))
    assert built_keys == [entry.name]
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype("float32")
    assert served.engines["w100"].run({"input": x})["logits"].shape == (2, 10)


def test_mismatched_key_is_rebuilt(built):
    root, _ = built
    entry = _engine_dirs(root)[0]
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["fields"]["backend_version"] = "0.0.0"
    (entry / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = []
    Repository(root).load("tiny", on_build=lambda tier, key: rebuilt.append(key))
    assert rebuilt == [entry.name]


@pytest.mark.parametrize("damage", [b"\xff\xfe{}", b"[]"])
def test_an_unreadable_manifest_is_rebuilt_not_a_traceback(built, damage):
    # Bytes that are not UTF-8, or JSON that is not an object: the entry is rebuilt (it
    # raised UnicodeDecodeError / AttributeError from Repository.load).
    root, _ = built
    entry = _engine_dirs(root)[0]
    (entry / "manifest.json").write_bytes(damage)
    rebuilt = []
    Repository(root).load("tiny", on_build=lambda tier, key: rebuilt.append(key))
    assert rebuilt == [entry.name]


@pytest.mark.parametrize("files", [["model.ort"], {}, {"../model.onnx": "0" * 64}])
def test_a_manifest_with_a_malformed_file_list_is_rebuilt(built, files):
    # "files" as a list raised AttributeError from Repository.load; an empty list verified
    # nothing; a path outside the entry was hashed.
    root, _ = built
    entry = _engine_dirs(root)[0]
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
    rebuilt = []
    Repository(root).load("tiny", on_build=lambda tier, key: rebuilt.append(key))
    assert rebuilt == [entry.name]
    assert not list(entry.parent.glob("*.bad-*"))  # set aside, then removed


def test_torch_backend_matches_onnxruntime(built):
    root, _ = built
    repo = Repository(root)
    ort = repo.load("tiny")
    eager = repo.load("tiny", backend="torch")
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype("float32")
    for tier in ("w100", "w050"):
        a = ort.engines[tier].run({"input": x})["logits"]
        b = eager.engines[tier].run({"input": x})["logits"]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_profile_from_another_backend_is_measured_again_at_load(built, caplog):
    """profile.json holds latency's shape over batch sizes, which differs between backends
    and devices (a GPU's batch of 4 costs little more than one row): serving on a backend
    the profile was not measured with re-measures it at load, and says so."""
    root, _ = built
    repo = Repository(root)
    stored = json.loads((root / "tiny" / "profile.json").read_text())
    assert stored["backend"] == "onnxruntime"
    assert repo.load("tiny").profile == stored  # measured here, with this backend: kept
    with caplog.at_level("WARNING", logger="innfer.repository"):
        eager = repo.load("tiny", backend="torch")
    here = get_backend("torch").device()  # "cpu" here; the GPU's name on a GPU
    assert (eager.profile["backend"], eager.profile["device"]) == ("torch", here)
    assert set(eager.profile["tiers"]) == {"w100", "w050"}
    assert set(eager.profile["tiers"]["w050"]) == set(stored["tiers"]["w050"])  # same sizes
    assert all(e["p50_ms"] > 0 for e in eager.profile["tiers"]["w100"].values())
    assert "measured with onnxruntime" in caplog.text and "re-measured" in caplog.text
    # Not written back: the stored profile is the build's.
    assert json.loads((root / "tiny" / "profile.json").read_text()) == stored


def test_serving_loader_never_imports_torch(built):
    root, _ = built
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any 'import torch' now raises ImportError
        import numpy as np
        from runtime.repository import Repository
        served = Repository({str(root)!r}).load("tiny")
        x = np.zeros((1, 1, 8, 8), dtype="float32")
        print(served.engines["w050"].run({{"input": x}})["logits"].shape)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules
                       if sys.modules[m] is not None)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(1, 10)" in out.stdout


def test_unknown_model_and_missing_tier(built, tmp_path):
    root, _ = built
    with pytest.raises(RepositoryError, match="model 'nope' not found"):
        Repository(root).load("nope")
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.yaml").write_text(json.dumps(CONFIG))
    with pytest.raises(RepositoryError, match=r"tier\.json is missing: run `innfer build`"):
        Repository(tmp_path).load("m")


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"tiers": [{"name": "w", "width": 1.5}]}, r"tiers\[0\]\.width: got 1\.5, expected"),
        ({"tiers": [{"name": "w", "width": 0}]}, r"tiers\[0\]\.width"),
        ({"tiers": []}, r"tiers: got \[\], expected a non-empty list"),
        ({"tiers": [{"name": "a", "width": 1}, {"name": "a", "width": 0.5}]}, "unique names"),
        ({"precision": "int3"}, "precision: got 'int3', expected one of fp32, fp16"),
        ({"max_batch": 0}, r"max_batch: got 0, expected an integer in \[1, 4096\]"),
        ({"backends": ["tensorflow"]}, r"backends\[0\]: got 'tensorflow'"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [0]}]}, r"inputs\[0\]\.shape"),
        ({"inputs": [{"name": "x", "dtype": "complex", "shape": [2]}]}, r"inputs\[0\]\.dtype"),
        ({"batch": 3}, "batch: got 3, expected a known field"),
        ({"default_latency_budget_ms": -5}, "default_latency_budget_ms: got -5"),
    ],
)
def test_invalid_model_yaml(tmp_path, patch, match):
    path = tmp_path / "model.yaml"
    path.write_text(json.dumps({**CONFIG, **patch}))  # JSON is YAML
    with pytest.raises(ConfigError, match=match) as err:
        ModelConfig.load(path)
    assert str(path) in str(err.value)


def test_model_yaml_that_is_not_yaml(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("tiers: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ModelConfig.load(path)


def test_tier_width_beyond_group_size_fails_the_build(tmp_path):
    inn = runtime.convert(_net(), (torch.randn(1, 1, 8, 8),))
    group = inn.groups[0].name
    add_model(tmp_path, "bad", inn, {**CONFIG, "tiers": [{"name": "x", "width": {group: 999}}]})
    with pytest.raises(Exception, match=r"must be an int in \[1, 16\]"):
        build_model(Repository(tmp_path), "bad", progress=False)


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_onnxruntime(built):
    root, _ = built
    repo = Repository(root)
    gpu = repo.load("tiny", backend="torch")
    assert gpu.engines["w100"].device == "cuda"
    x = np.random.default_rng(2).standard_normal((4, 1, 8, 8)).astype("float32")
    for tier in ("w100", "w050"):
        a = repo.load("tiny").engines[tier].run({"input": x})["logits"]
        np.testing.assert_allclose(gpu.engines[tier].run({"input": x})["logits"], a, atol=1e-3)


def test_validation_refuses_an_engine_whose_batch_axis_is_fixed():
    # Compared with the same broken sample, a graph that returns one row whatever the batch
    # passed validation (both sides (1, D)); the output's batch rows are now checked first.
    from runtime.build.pipeline import BuildError, validate

    config = ModelConfig.from_dict({
        "inputs": [{"name": "input", "shape": [4]}], "outputs": [{"name": "y", "shape": [3]}],
        "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 4,
    })  # fmt: skip

    class OneRow(torch.nn.Module):
        def forward(self, x):
            return x[:1, :3]

    class Engine:
        def run(self, feeds):
            return {"y": feeds["input"][:1, :3]}

    with pytest.raises(BuildError, match=r"has shape \[1, 3\] for a batch of 4.*reduces over"):
        validate(Engine(), OneRow(), config, "w100")


def test_check_io_names_an_output_that_is_not_a_tensor():
    # `return y, None` was told "the model returns [] per row", then "returns : correct
    # outputs[1].dtype" (review helper-244)
    from runtime.build.export import check_io

    config = ModelConfig.from_dict({
        "inputs": [{"name": "input", "shape": [4]}],
        "outputs": [{"name": "y", "shape": [3]}, {"name": "n", "shape": [1]}],
        "tiers": [{"name": "w100", "width": 1.0}],
    })  # fmt: skip

    class WithNone(torch.nn.Module):
        def forward(self, x):
            return x[:, :3], None

    with pytest.raises(ValueError, match=r"outputs\[1\] 'n': the model returns NoneType"):
        check_io(WithNone(), [("input", (4,), torch.float32)], config)


def test_validation_names_the_tier_when_its_engine_fails_to_run():
    # A torch engine at fp16 beside a float cast in the graph raised a bare RuntimeError
    # out of the build, naming no tier and no way out.
    from runtime.build.pipeline import BuildError, validate

    config = ModelConfig.from_dict({
        "inputs": [{"name": "input", "shape": [4]}], "outputs": [{"name": "y", "shape": [3]}],
        "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 4, "precision": "fp16",
        "backends": ["torch"],
    })  # fmt: skip

    class Engine:
        def run(self, feeds):
            raise RuntimeError("Input type (float) and bias type (c10::Half) should be the same")

    said = r"tier w050: the engine failed on a batch of 1: RuntimeError: Input type .*; try"
    with pytest.raises(BuildError, match=said + r" precision: fp32 in model\.yaml"):
        validate(Engine(), torch.nn.Identity(), config, "w050")


def test_an_engine_that_fails_to_run_keeps_its_cache_entry():
    # Not shown wrong (a passing error: a GPU's memory held elsewhere): discarding it cost a
    # TensorRT engine's minutes-long build; outputs that differ still discard it.
    from types import SimpleNamespace

    from runtime.build.pipeline import EngineRunFailed, validated_engine

    config = ModelConfig.from_dict({
        "inputs": [{"name": "input", "shape": [4]}], "outputs": [{"name": "y", "shape": [4]}],
        "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 2,
    })  # fmt: skip
    discarded = []

    class Engine:
        def run(self, feeds):
            raise RuntimeError("CUDA out of memory")

        def close(self):
            pass

    cache = SimpleNamespace(get=lambda *a, **k: (Engine(), False),
                            discard=lambda *a: discarded.append(a))  # fmt: skip
    options = SimpleNamespace(precision="fp32")
    with pytest.raises(EngineRunFailed, match="CUDA out of memory"):
        validated_engine(cache, None, "m.onnx", "sha", options, torch.nn.Identity(),
                         config, "w100")  # fmt: skip
    assert discarded == []


def test_an_inn_replaced_after_the_build_is_refused_until_rebuilt(built, tmp_path):
    # A retrained INN saved over the old one: serving the old tiers would answer with the
    # old model under the new one's name.
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    from runtime.repository.records import inn_fingerprint

    record = Repository(root).load_record("tiny", "w050")
    inn_json = json.loads((root / "tiny" / "inn.json").read_text())
    assert record.inn_sha256 == inn_fingerprint(inn_json)
    net = _net()
    with torch.no_grad():
        net[0].weight.mul_(1.5)  # "retrained"
    runtime.convert(net, (torch.randn(2, 1, 8, 8),)).save(root / "tiny")
    with pytest.raises(RepositoryError, match=r"w100.*another INN.*run `innfer build`"):
        Repository(root).load("tiny")
    # ... and a build stopped now says so of every tier (it said them built: helper-278)
    assert Repository(root).unbuilt("tiny") == ["w100", "w050"]
    build_model(Repository(root), "tiny", progress=False, profile=False)
    assert len(Repository(root).load("tiny").engines) == 2
    # Recalibration that changes only inn.json (grid tuning, norm re-estimation): the
    # weights' hash stays, the tiers are stale all the same.
    weights = json.loads((root / "tiny" / "inn.json").read_text())["weights_sha256"]
    inn = runtime.load(root / "tiny")
    inn.info["norm_stats"] = {"0": {"mean": [0.5]}}
    inn.save(root / "tiny")
    assert json.loads((root / "tiny" / "inn.json").read_text())["weights_sha256"] == weights
    with pytest.raises(RepositoryError, match=r"grids or norm statistics changed"):
        Repository(root).load("tiny")
    # ... and so are they where simulate, report and bench plan offline (they planned with
    # tiers a server refuses, reported beside the calibrated INN's figures: review 176)
    with pytest.raises(RepositoryError, match=r"w100.*another INN.*run `innfer build`"):
        Repository(root).served_tiers("tiny")


def test_tiers_of_two_builds_are_refused_in_an_image_without_the_inn(built, tmp_path):
    # A serving image holds the tiers only (no inn.json to check them against): one tier
    # from a build interrupted or copied part-way served another network under the name.
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    (root / "tiny" / "inn.json").unlink()
    assert len(Repository(root).load("tiny").engines) == 2  # one build's tiers: served
    path = root / "tiny" / "tiers" / "w050" / "tier.json"
    record = json.loads(path.read_text())
    record["inn_sha256"] = "0" * 64  # sampled from a retrained INN
    path.write_text(json.dumps(record))
    with pytest.raises(RepositoryError, match=r"w100 and w050 .*different INNs.*innfer build"):
        Repository(root).load("tiny")


def test_a_tier_over_onnxs_2_gib_is_refused_with_what_to_do(tmp_path, monkeypatch):
    # protobuf caps one ONNX file at 2 GiB; torch's exporter then asked for "a file path"
    # the user does not control. The limit is lowered here: a 2 GiB model is too slow to
    # build in a test.
    from runtime.build import export
    from runtime.build.pipeline import BuildError

    monkeypatch.setattr(export, "MAX_ONNX_BYTES", 10_000)  # the tiny CNN's w100: ~20 KB
    inn = runtime.convert(_net(), (torch.randn(2, 1, 8, 8),))
    add_model(tmp_path, "tiny", inn, {k: v for k, v in CONFIG.items() if k != "evaluation"})
    with pytest.raises(BuildError, match=r"tier w100: .* GiB, over the 2 GiB one ONNX file"):
        build_model(Repository(tmp_path), "tiny", progress=False, profile=False)


def test_the_build_closes_every_engine_it_opened(tmp_path, monkeypatch):
    # A TensorRT or CUDA engine holds device memory until closed; the build kept them all.
    from runtime.repository.cache import EngineCache

    opened = []
    real_get = EngineCache.get

    def get(self, *args, **kwargs):
        engine, built = real_get(self, *args, **kwargs)
        opened.append(engine)
        engine.close = lambda e=engine: setattr(e, "closed_by_test", True)
        return engine, built

    monkeypatch.setattr(EngineCache, "get", get)
    build_tiny(tmp_path)
    assert len(opened) == 2 and all(getattr(e, "closed_by_test", False) for e in opened)


def test_a_change_to_sampling_exports_the_tiers_again(built, tmp_path, monkeypatch):
    # The tier's ONNX is reused while its source hash holds; a sampling change (the running
    # variance floor, SAMPLER_VERSION 2) kept the old ONNX, which then failed validation
    # against the new sample with no way out but deleting the tier by hand.
    import shutil

    from runtime.inn.model import IntegralModel

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    again = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert not any(t.exported for t in again.tiers)
    monkeypatch.setattr(IntegralModel, "SAMPLER_VERSION", IntegralModel.SAMPLER_VERSION + 1)
    changed = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert all(t.exported for t in changed.tiers)


def test_a_kept_tier_another_innfer_sampled_is_exported_again(built, tmp_path, monkeypatch):
    # A sampler changed without SAMPLER_VERSION (924d230's option-A rounding): after an
    # upgrade - or a rollback - the kept ONNX failed validation against this innfer's
    # sample on every build, and its engine was discarded each time (review helper-310).
    import shutil

    import torch

    import runtime.build.pipeline as pipeline

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    sample = pipeline.sample_tier

    def another_sampler(*args, **kwargs):
        module, reestimated = sample(*args, **kwargs)
        with torch.no_grad():
            next(module.parameters()).mul_(1.5)  # what another release computes
        return module, reestimated

    monkeypatch.setattr(pipeline, "sample_tier", another_sampler)
    again = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert all(t.exported for t in again.tiers)
    kept = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert not any(t.exported for t in kept.tiers)  # and kept from then on


def test_a_kept_tier_whose_engine_cannot_run_here_keeps_its_files(built, tmp_path, monkeypatch):
    # Only outputs that differ mean another innfer's ONNX: an engine that cannot run here
    # (a GPU's memory held elsewhere) was taken for one, the tier exported again, and when
    # that failed alike its tier.json deleted - the model no longer loaded (helper-311).
    import shutil

    import runtime.build.pipeline as pipeline

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    tiers = root / "tiny" / "tiers"
    onnx = {t.name: (t / "model.onnx").read_bytes() for t in tiers.iterdir()}

    def busy(*args, **kwargs):
        raise pipeline.EngineRunFailed("tier w100: the engine failed (CUDA out of memory)")

    monkeypatch.setattr(pipeline, "validate", busy)
    with pytest.raises(pipeline.EngineRunFailed):
        build_model(Repository(root), "tiny", progress=False, profile=False)
    for t in tiers.iterdir():
        assert (t / "tier.json").is_file() and (t / "model.onnx").read_bytes() == onnx[t.name]
    monkeypatch.undo()
    for t in tiers.iterdir():
        Repository(root).load_record("tiny", t.name)  # still loads


def test_a_tier_rebuilt_without_profiling_is_timed_again_at_load(built, tmp_path, caplog):
    # profile.json said nothing of the engines it timed: after a width change built with
    # --no-profile (or a build interrupted while profiling) the new engines were planned
    # with the old ones' times.
    import shutil

    import yaml

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    repo = Repository(root)
    profile = json.loads((root / "tiny" / "profile.json").read_text())
    assert profile["onnx_sha256"] == {
        t: repo.load_record("tiny", t).onnx_sha256 for t in ("w100", "w050")
    }
    doc = yaml.safe_load((root / "tiny" / "model.yaml").read_text())
    doc["tiers"][1]["width"] = 0.25
    (root / "tiny" / "model.yaml").write_text(yaml.safe_dump(doc))
    report = build_model(repo, "tiny", progress=False, profile=False)
    [warning] = [w for w in report.warnings if "does not time the engines of tiers w050" in w]
    # the command it names runs as written (it named the model's own folder, which build
    # refuses: "it is a model's own folder: give its parent"; review helper-228)
    assert f"`innfer build {root} --model tiny` stores a new one" in warning, warning
    assert json.loads((root / "tiny" / "profile.json").read_text()) == profile  # untouched
    with caplog.at_level("WARNING", logger="innfer.repository"):
        served = Repository(root).load("tiny")
    assert "timed other engines for tiers w050" in caplog.text
    new_sha = repo.load_record("tiny", "w050").onnx_sha256
    assert served.profile["onnx_sha256"]["w050"] == new_sha != profile["onnx_sha256"]["w050"]
    for e in served.engines.values():
        e.close()
    # a tier re-exported to the same ONNX is timed still: no warning (every re-exported tier
    # was named stale where the hashes said otherwise - review helper-248)
    build_model(repo, "tiny", progress=False, profile=True)
    (root / "tiny" / "tiers" / "w100" / "tier.json").unlink()
    report = build_model(repo, "tiny", progress=False, profile=False)
    assert {t.name for t in report.tiers if t.exported} == {"w100"}
    assert not [w for w in report.warnings if "does not time the engines" in w], report.warnings


@pytest.mark.parametrize(
    "edit, says",
    [(lambda d: d["outputs"][0].update(name="scores"), r"outputs logits \[10\].*gives scores"),
     (lambda d: d["inputs"][0].update(shape=[1, 9, 9]), r"inputs input \[1, 8, 8\].*\[1, 9, 9\]"),
     # float scores declared int32 were truncated to ints silently (review helper-124)
     (lambda d: d["outputs"][0].update(dtype="int32"), r"gives logits as float32, .*says int32"),
     # an input's dtype: ONNX Runtime's words at the warm-up, and "rebuild it" (helper-183)
     (lambda d: d["inputs"][0].update(dtype="float16"), r"takes input as float32, .*says float16")],
)  # fmt: skip
def test_an_engine_that_is_not_model_yamls_model_is_refused_at_load(
    built, tmp_path, edit, says, monkeypatch
):
    # model.yaml edited after the build (an output renamed) loaded, passed its warm-up, and
    # then failed every request with INTERNAL (the codec found no output of that name).
    import shutil

    import yaml

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    doc = yaml.safe_load((root / "tiny" / "model.yaml").read_text())
    edit(doc)
    (root / "tiny" / "model.yaml").write_text(yaml.safe_dump(doc))
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    closed = []
    close = OnnxRuntimeEngine.close
    monkeypatch.setattr(OnnxRuntimeEngine, "close", lambda e: (closed.append(e), close(e))[1])
    with pytest.raises(RepositoryError, match=says + r".*run `innfer build`"):
        Repository(root).load("tiny")
    assert len(closed) == 1  # the engine it opened is closed, not left to the collector


def test_a_new_build_recipe_is_a_new_cache_key():
    # The key held the ONNX, the library's version, the device and options, but not how the
    # backend builds: a change of optimisation level alone would have reused old engines.
    from runtime.engines import BuildOptions, get_backend
    from runtime.repository.cache import engine_key

    ort = get_backend("onnxruntime")
    before, fields = engine_key("ab" * 32, ort, BuildOptions())
    assert "recipe" not in fields  # the first recipe keeps the keys engines have now
    ort.recipe = 2
    try:
        after, fields = engine_key("ab" * 32, ort, BuildOptions())
    finally:
        ort.recipe = 1
    assert after != before and fields["recipe"] == 2


def _other_cpu(backend):
    """``backend`` as it reports itself on another CPU: the same engine files, another ISA
    (a repository volume moved to an older machine)."""
    backend.device = lambda: "cpu-x86_64-sse4_2"
    return backend


@pytest.mark.parametrize(
    "change",
    [lambda b, o: (b, dataclasses.replace(o, precision="fp16")),
     lambda b, o: (_other_cpu(b), o),
     lambda b, o: (b, dataclasses.replace(o, extra={"device": "cuda"}))],
    ids=["precision", "device", "extra"],
)  # fmt: skip
def test_precision_device_and_extra_are_each_part_of_the_cache_key(change):
    # None of them was tested: dropping any one from the key left every test passing, and an
    # fp32 engine would be served for fp16, an engine built for another CPU loaded here.
    from runtime.engines import BuildOptions, get_backend
    from runtime.repository.cache import engine_key

    options = BuildOptions()
    before, _ = engine_key("ab" * 32, get_backend("onnxruntime"), options)
    after, _ = engine_key("ab" * 32, *change(get_backend("onnxruntime"), options))
    assert after != before


@pytest.mark.parametrize(
    "change",
    [{"max_batch": 16}, {"opt_batch": 2}, {"sequence": (1, 64, 256)}, {"instances": 2}],
    ids=["max_batch", "opt_batch", "sequence", "instances"],
)
def test_a_shape_profiled_engines_key_names_its_profiles(change):
    # A TensorRT plan is built for a range of shapes: with the batch profile out of its key,
    # a max_batch raised from 8 to 16 loaded the engine built for 8 (a log line, then every
    # larger batch failed); nothing tested it (review helper-304, mutation K02). ONNX
    # Runtime runs any shape: the same change rebuilds none of its engines.
    from runtime.engines import BuildOptions, get_backend
    from runtime.repository.cache import engine_key

    profiled = get_backend("onnxruntime")
    profiled.shape_profiled = True  # (a TensorRT-like backend: TensorRT is not installed)
    options = BuildOptions(sequence=(1, 32, 128))
    changed = dataclasses.replace(options, **change)
    assert engine_key("ab" * 32, profiled, changed)[0] != engine_key("ab" * 32, profiled,
                                                                        options)[0]  # fmt: skip
    plain = get_backend("onnxruntime")
    assert engine_key("ab" * 32, plain, changed)[0] == engine_key("ab" * 32, plain, options)[0]


def test_an_engine_cached_for_other_build_options_is_not_reused(tmp_path):
    from test_build_review28 import _add_onnx

    from runtime.engines import BuildOptions
    from runtime.engines.onnxruntime import OnnxRuntimeBackend
    from runtime.repository import EngineCache

    onnx_path = _add_onnx(tmp_path / "tier" / "model.onnx")
    cache, fp32 = EngineCache(tmp_path / "engines"), BuildOptions()
    assert cache.get(OnnxRuntimeBackend(), onnx_path, fp32)[1]  # built
    assert not cache.get(OnnxRuntimeBackend(), onnx_path, fp32)[1]  # the same: loaded
    # Another CPU and other extra options each build an engine of their own...
    assert cache.get(_other_cpu(OnnxRuntimeBackend()), onnx_path, fp32)[1]
    extra = dataclasses.replace(fp32, extra={"note": "tuned"})
    engine, built = cache.get(OnnxRuntimeBackend(), onnx_path, extra)
    assert built and engine.run({"x": np.zeros((1, 4), np.float32)})["y"].tolist() == [[1] * 4]
    assert len(list((tmp_path / "engines").iterdir())) == 3
    # ... and fp16 is a build too - which this backend refuses - not the fp32 engine.
    with pytest.raises(ValueError, match="builds fp32 engines only"):
        cache.get(OnnxRuntimeBackend(), onnx_path, dataclasses.replace(fp32, precision="fp16"))


def test_an_interrupted_save_leaves_the_inn_it_replaces(built, tmp_path, monkeypatch):
    # inn.safetensors was written in place: a Ctrl-C mid-write left neither model.
    import shutil

    import safetensors.torch

    d = tmp_path / "tiny"
    shutil.copytree(built[0] / "tiny", d)
    before = {f: (d / f).read_bytes() for f in ("inn.safetensors", "inn.json")}
    inn = runtime.load(d)

    def interrupted(tensors, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        inn.save(d)
    assert {f: (d / f).read_bytes() for f in before} == before
    temporary = [p.name for p in d.iterdir() if p.name.startswith(".")]
    assert sorted(temporary) == [".build.lock"]  # (the builds' lock, kept: runtime.build.lock)
    runtime.load(d)  # still loads
    # Interrupted while the metadata is written (large norm statistics): the old pair too.
    monkeypatch.undo()
    with torch.no_grad():
        next(iter(inn.state.values())).mul_(2.0)  # other weights than the saved ones
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        inn.save(d)
    monkeypatch.undo()
    assert {f: (d / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == [".build.lock"]


def test_a_batchnorm_tier_without_statistics_of_its_own_is_warned_about(tmp_path):
    # Built and served at chance accuracy (a width 0.4 tier: 11.6 % against 96 %), silently.
    from runtime.inn.calibrate import reestimate_norms

    torch.manual_seed(1)
    x = torch.rand(128, 1, 8, 8)
    inn = runtime.convert(_net(), (x[:2],), fold_norms=False)
    config = {k: v for k, v in CONFIG.items() if k != "evaluation"}
    add_model(tmp_path, "bn", inn, config)
    report = build_model(Repository(tmp_path), "bn", progress=False, profile=False)
    assert [w.split(" of ")[0] for w in report.warnings] == ["tier w050"]
    assert "innfer calibrate" in report.warnings[0]
    reestimate_norms(inn, 0.5, x)
    inn.save(tmp_path / "bn")
    assert build_model(Repository(tmp_path), "bn", progress=False, profile=False).warnings == []


def test_recomputing_norm_statistics_builds_no_autograd_graph():
    # A helper inserted above it took its @torch.no_grad(): every calibration batch built
    # an autograd graph (slower, more memory; the statistics the same).
    from runtime.inn.calibrate import recompute_norm_stats

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    seen = []
    net[1].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    assert recompute_norm_stats(net, torch.rand(64, 4), batch_size=32)
    assert seen == [False, False]


class _ToyBackend(Backend):
    """A backend whose engine is one file of ``content``; ``builds`` counts its builds.
    Subclasses say how it loads."""

    name, content, builds = "toy", b"engine", 0

    def available(self):
        return True

    def version(self):
        return "1"

    def device(self):
        return "cpu"

    def build(self, onnx_path, out_dir, options):
        self.builds += 1
        out_dir.mkdir(parents=True)
        (out_dir / "e.bin").write_bytes(self.content)
        return ["e.bin"]


def test_an_entry_that_verifies_but_does_not_load_is_rebuilt(tmp_path):
    # The repair kept it (its manifest verified: "repaired by another builder"), the new
    # build could not be renamed over it, and the same load error came back every time.
    from runtime.engines import BuildOptions, EngineError
    from runtime.hashing import sha256_file
    from runtime.repository.cache import EngineCache, engine_key

    class Toy(_ToyBackend):
        content = b"old-format"

        def load(self, out_dir, options):
            if (out_dir / "e.bin").read_bytes() != b"new-format":
                raise EngineError("cannot deserialize an engine of another build")
            return "engine"

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    cache, toy, opts = EngineCache(tmp_path / "engines"), Toy(), BuildOptions()
    key, fields = engine_key(sha256_file(onnx), toy, opts)
    cache.root.mkdir()
    cache._build(toy, onnx, cache.root / key, opts, fields)  # verifies, does not load
    toy.content = b"new-format"
    assert cache.get(toy, onnx, opts) == ("engine", True)
    assert (cache.root / key / "e.bin").read_bytes() == b"new-format"


def test_an_entry_that_only_this_replica_cannot_load_is_kept(tmp_path):
    # A load that failed for want of memory (ONNX Runtime's bad_alloc under a pod's memory
    # limit) discarded the shared entry as bad; the rebuild failed the same way, and every
    # replica on the volume lost the engine (a TensorRT plan takes minutes to build). Now
    # a fresh build beside it decides: it fails too, so the entry stays.
    from runtime.engines import BuildOptions, EngineError
    from runtime.hashing import sha256_file
    from runtime.repository.cache import EngineCache, engine_key

    class Starved(_ToyBackend):
        short_of_memory = False

        def load(self, out_dir, options):
            if self.short_of_memory:
                raise EngineError("ONNX Runtime cannot build the session: std::bad_alloc")
            return "engine"

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    cache, backend, opts = EngineCache(tmp_path / "engines"), Starved(), BuildOptions()
    assert cache.get(backend, onnx, opts) == ("engine", True)
    key, _ = engine_key(sha256_file(onnx), backend, opts)
    manifest = (cache.root / key / "manifest.json").read_bytes()
    backend.short_of_memory = True
    with pytest.raises(EngineError, match=r"fresh build does not either.*the entry is kept"):
        cache.get(backend, onnx, opts)
    assert (cache.root / key / "manifest.json").read_bytes() == manifest  # the same entry
    assert sorted(p.name for p in cache.root.iterdir()) == [key]  # the probe build removed
    backend.short_of_memory = False  # memory back: loaded as it is, not built again
    assert cache.get(backend, onnx, opts) == ("engine", False) and backend.builds == 2


@pytest.mark.parametrize("evaluation", [True, False])
def test_a_batchnorm_tier_without_stored_statistics_gets_its_own(tmp_path, evaluation, caplog):
    # The INN stores BatchNorm statistics only at the widths it was trained or calibrated
    # at; a tier at other counts served the full width's statistics resampled (the deploy
    # example's w035 of the demo MNIST model: 11.4 % accuracy, 96.0 % re-estimated). With
    # an evaluation dataset the build re-estimates them on its training inputs; without
    # one it warns.
    import logging

    import onnxruntime as ort

    from runtime.build.sampling import NORM_SAMPLES
    from runtime.demo.data import load as load_data
    from runtime.inn.calibrate import recompute_norm_stats

    config = {**CONFIG, "tiers": [{"name": "w100", "width": 1.0}, {"name": "w040", "width": 0.4}]}
    if not evaluation:
        config.pop("evaluation")
    inn = runtime.convert(tiny_cnn(), (torch.randn(1, 1, 8, 8),), fold_norms=False)
    add_model(tmp_path, "bn", inn, config)
    with caplog.at_level(logging.WARNING):
        report = build_model(Repository(tmp_path), "bn", progress=False, repeats=2)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 1, 8, 8), np.float32))
    plain = inn.sample(0.4)
    own = inn.sample(0.4)
    with torch.no_grad():
        recompute_norm_stats(own, load_data("digits").x_train[:NORM_SAMPLES])
        want = (own if evaluation else plain)(x).numpy()
        other = (plain if evaluation else own)(x).numpy()
    onnx = tmp_path / "bn" / "tiers" / "w040" / "model.onnx"
    (got,) = ort.InferenceSession(str(onnx)).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - other).max() > 1e-2  # the statistics did change the network
    warned = [w for w in report.warnings if "no BatchNorm statistics of its own" in w]
    assert bool(warned) is not evaluation
    assert all(t.max_abs_err < 1e-4 for t in report.tiers)  # validated against the same net


def test_a_misspelt_evaluation_dataset_names_the_field_before_any_work(tmp_path):
    # It was accepted and the build failed later with "unknown data set 'mnsit'",
    # naming neither the file nor the field.
    from runtime.build.pipeline import BuildError

    inn = runtime.convert(_net(), (torch.randn(2, 1, 8, 8),))
    add_model(tmp_path, "tiny", inn, {**CONFIG, "evaluation": {"dataset": "mnsit"}})
    with pytest.raises(BuildError, match=r"model.yaml: evaluation.dataset 'mnsit' .*digits"):
        build_model(Repository(tmp_path), "tiny", progress=False, profile=False)
    assert not (tmp_path / "tiny" / "engines").exists()


def test_your_own_npz_evaluates_the_tiers_and_is_remeasured_when_it_changes(tmp_path):
    # Only the bundled digits / mnist5k / mnist1d could be named (review helper-105): a
    # model brought by its user had no measured accuracy, only the FLOPs proxy.
    import numpy as np

    from runtime.build.pipeline import BuildError
    from runtime.repository.records import TierRecord

    inn = runtime.convert(_net(), (torch.randn(2, 1, 8, 8),))
    d = add_model(tmp_path, "tiny", inn, {**CONFIG, "evaluation": {"dataset": "mine.npz"}})
    with pytest.raises(BuildError, match=r"evaluation.dataset: data set file .*mine.npz does "
                       "not exist"):  # fmt: skip
        build_model(Repository(tmp_path), "tiny", progress=False, profile=False)
    rng = np.random.default_rng(0)
    x = rng.random((100, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        y = inn.sample(1.0)(torch.from_numpy(x)).argmax(1).numpy()  # the full width's answers
    np.savez(d / "mine.npz", x=x, y=y)
    report = build_model(Repository(tmp_path), "tiny", progress=False, profile=False)
    accuracy = {t.name: t.accuracy for t in report.tiers}
    assert accuracy["w100"] == 1.0 and 0 <= accuracy["w050"] <= 1.0  # 20 test samples
    np.savez(d / "mine.npz", x=x, y=(y + 1) % 10)  # rewritten: measured again
    report = build_model(Repository(tmp_path), "tiny", progress=False, profile=False)
    assert {t.name: t.accuracy for t in report.tiers}["w100"] == 0.0
    record = TierRecord.read(d / "tiers" / "w100" / "tier.json")
    assert "mine.npz (sha256 " in record.accuracy_on
    np.savez(d / "mine.npz", images=x)
    with pytest.raises(BuildError, match=r"holds \['images'\]; give x_train, y_train"):
        build_model(Repository(tmp_path), "tiny", progress=False, profile=False)
    # samples or labels that do not fit the model: said before any work, naming the file
    # (an internal error in the engine that stopped the other models' builds, or numpy's
    # broadcast error for one-hot labels - review helper-248)
    for bad, said in (
        (dict(x=x[:, 0], y=y), r"samples of shape \[8, 8\], but input 'input'"),
        (dict(x=x, y=np.eye(10)[y]), r"labels of shape \[10\] per sample.*one-hot"),
    ):
        np.savez(d / "mine.npz", **bad)
        with pytest.raises(BuildError, match=rf"evaluation.dataset mine.npz: {said}"):
            build_model(Repository(tmp_path), "tiny", progress=False, profile=False)


def test_an_id_model_with_batch_norm_builds_with_its_evaluation_set(tmp_path):
    # Its norm statistics were re-estimated on the data set's float32 inputs: "Expected
    # tensor for argument #1 'indices' to have one of the following scalar types: Long"
    # (review helper-248) - once the warning's advice, an evaluation set, was followed.
    import numpy as np

    from runtime.build.pipeline import BuildError

    class Ids(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(20, 16)
            self.bn = torch.nn.BatchNorm1d(16)
            self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.bn(self.emb(ids).mean(1)))))

    torch.manual_seed(0)
    net = Ids().eval()
    net.bn.running_var.uniform_(0.5, 2.0)
    ids = torch.randint(0, 20, (200, 6))  # 80 % for training: above one batch of 64
    inn = runtime.convert(net, (ids[:2],))
    config = {**CONFIG, "inputs": [{"name": "ids", "dtype": "int64", "shape": [6]}],
              "outputs": [{"name": "logits", "dtype": "float32", "shape": [4]}],
              "evaluation": {"dataset": "ids.npz"}}  # fmt: skip
    d = add_model(tmp_path, "ids", inn, config)
    with torch.no_grad():
        y = net(ids).argmax(1).numpy()
    # Fewer training inputs than one batch: the build stopped at w050 with "need at least
    # one batch of 64 samples, got 40", naming neither the data set nor why (helper-296).
    np.savez(d / "ids.npz", x=ids[:50].numpy(), y=y[:50])
    with pytest.raises(BuildError, match=r"model.yaml: evaluation.dataset ids.npz holds 40 "
                       r"training inputs; a smaller tier's BatchNorm statistics are re-estimated "
                       r"on at least 64 .*add training samples"):  # fmt: skip
        build_model(Repository(tmp_path), "ids", progress=False, profile=False)
    np.savez(d / "ids.npz", x=ids.numpy(), y=y)
    report = build_model(Repository(tmp_path), "ids", progress=False, profile=False)
    assert {t.name for t in report.tiers} == {"w100", "w050"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"inputs": [{"name": "input", "dtype": "float32", "shape": [64]}]},
         r"the model does not run on model.yaml's inputs \(input: float32 \[64\] per row\): .*"
         r"do inputs\[\]\.shape and dtype match"),
        ({"outputs": [{"name": "logits", "dtype": "float32", "shape": [5]}]},
         r"model.yaml outputs\[0\] 'logits' has shape \[5\] per row; the model returns \[10\]"),
        # built and served, every answer cast: float logits came back as int64 zeros
        ({"outputs": [{"name": "logits", "dtype": "int64", "shape": [10]}]},
         r"model.yaml outputs\[0\] 'logits' is int64; the model returns float32: correct "
         r"outputs\[0\]\.dtype"),
    ],
)  # fmt: skip
def test_model_yaml_io_that_is_not_the_models_is_named_before_export(tmp_path, change, message):
    # Both reached the user as torch's own error ("Expected 3D (unbatched) or 4D (batched)
    # input ...") or an engine/validation message, naming neither model.yaml nor the field.
    from runtime.build.pipeline import BuildError

    inn = runtime.convert(_net(), (torch.randn(2, 1, 8, 8),))
    config = {k: v for k, v in CONFIG.items() if k != "evaluation"}
    add_model(tmp_path, "tiny", inn, {**config, **change})
    with pytest.raises(BuildError, match=r"model.yaml: tier w100: " + message):
        build_model(Repository(tmp_path), "tiny", progress=False, profile=False)


def _one_tier(inputs: list, outputs: list) -> dict:
    """A model.yaml of these inputs and outputs and the full width alone."""
    return {"inputs": inputs, "outputs": outputs, "tiers": [{"name": "w100", "width": 1.0}],
            "max_batch": 4, "threads": 1}  # fmt: skip


class _Pair(torch.nn.Module):
    """Two inputs by name: swapping them changes the answer."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb, self.out = (torch.nn.Linear(8, 16), torch.nn.Linear(8, 16),
                                      torch.nn.Linear(16, 2))  # fmt: skip

    def forward(self, query, doc):
        return self.out(torch.relu(self.fa(query)) - torch.relu(self.fb(doc)))


def test_inputs_listed_in_another_order_than_the_models_arguments_are_refused(tmp_path):
    # model.yaml's inputs bind by position: listed doc, query for forward(query, doc), the
    # model was built and served computing every answer on the swapped inputs.
    from runtime.build.pipeline import BuildError

    inn = runtime.convert(_Pair(), (torch.randn(2, 8), torch.randn(2, 8)))
    spec = {"dtype": "float32", "shape": [8]}
    config = _one_tier(
        [{"name": "doc", **spec}, {"name": "query", **spec}],
        [{"name": "score", "dtype": "float32", "shape": [2]}],
    )
    add_model(tmp_path, "pair", inn, config)
    with pytest.raises(BuildError, match=r"model.yaml inputs\[0\] is 'doc', but the model "
                       r"takes 'doc' as argument 1 of \(query, doc\)"):  # fmt: skip
        build_model(Repository(tmp_path), "pair", progress=False, profile=False)
    config["inputs"].reverse()  # the model's order: built
    add_model(tmp_path, "pair2", inn, config)
    build_model(Repository(tmp_path), "pair2", progress=False, profile=False)


class _DictOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 3)

    def forward(self, x):
        return {"logits": self.a(x)}


def test_a_model_returning_a_dict_is_told_to_return_a_tuple(tmp_path):
    # It was told "outputs[0] 'logits' has shape [3] per row; the model returns [] per row:
    # correct outputs[0].shape" - which no shape could follow (review helper-105).
    from runtime.build.pipeline import BuildError

    inn = runtime.convert(_DictOut(), (torch.randn(2, 8),))
    config = _one_tier(
        [{"name": "input", "dtype": "float32", "shape": [8]}],
        [{"name": "logits", "dtype": "float32", "shape": [3]}],
    )
    add_model(tmp_path, "d", inn, config)
    with pytest.raises(BuildError, match=r"the model returns a dict \(keys 'logits'\); return a "
                       r"tuple of tensors instead"):  # fmt: skip
        build_model(Repository(tmp_path), "d", progress=False, profile=False)


def test_two_tiers_that_round_to_the_same_network_are_said(tmp_path):
    # w095 rounds to w100's channel counts at multiple_of 8: the same network built and
    # served twice without a word (review helper-105).
    inn = runtime.convert(_net(), (torch.randn(2, 1, 8, 8),))
    config = {k: v for k, v in CONFIG.items() if k != "evaluation"}
    tiers = [{"name": "w100", "width": 1.0}, {"name": "w095", "width": 0.95}]
    add_model(tmp_path, "tiny", inn, {**config, "tiers": tiers, "multiple_of": 8})
    assert inn.sizes(0.95, 8) == inn.sizes(1.0, 8)
    report = build_model(Repository(tmp_path), "tiny", progress=False, profile=False)
    assert any("tier w095 of tiny samples the same network as w100" in w
               for w in report.warnings), report.warnings  # fmt: skip
    add_model(tmp_path, "apart", inn, {**config, "multiple_of": 8})  # w100, w050
    report = build_model(Repository(tmp_path), "apart", progress=False, profile=False)
    assert not any("same network" in w for w in report.warnings)


@pytest.mark.parametrize("progress", [True, False])
def test_a_build_warning_is_logged_once_where_no_bar_shows_it(tmp_path, caplog, progress):
    # Beside a progress bar the logged copy was printed into the bar's line, and the CLI
    # printed the report's copy again below its table: the report's copy is the one shown.
    torch.manual_seed(1)
    inn = runtime.convert(_net(), (torch.rand(2, 1, 8, 8),), fold_norms=False)
    add_model(tmp_path, "bn", inn, {k: v for k, v in CONFIG.items() if k != "evaluation"})
    with caplog.at_level("INFO", logger="innfer.build"):
        report = build_model(Repository(tmp_path), "bn", progress=progress, profile=False)
    assert [w.split(" of ")[0] for w in report.warnings] == ["tier w050"]
    logged = [r for r in caplog.records if "has no BatchNorm statistics" in r.getMessage()]
    assert [r.levelname for r in logged] == (["INFO"] if progress else ["WARNING"])


def test_a_build_removes_the_engines_of_onnx_no_tier_uses(built, tmp_path, capsys):
    # Every rebuild with new weights (and every channel-search candidate not chosen) left a
    # whole engine in <model>/engines/ for good: 4, 6, then 8 entries over three rebuilds of
    # a 2-tier model (engine review, session 32). A TensorRT plan per tier and device.
    import shutil

    from innfer.cli import _print_build

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    engines = root / "tiny" / "engines"
    live = sorted(p.name for p in engines.iterdir())
    stale = engines / "0123456789abcdef0123"  # an engine of an ONNX since rebuilt
    shutil.copytree(engines / live[0], stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["fields"]["onnx_sha256"] = "0" * 64
    (stale / "manifest.json").write_text(json.dumps(manifest))
    kept = build_model(Repository(root), "tiny", progress=False, profile=False, prune=False)
    assert stale.exists() and kept.pruned == ([], 0)
    report = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert report.pruned[0] == [stale.name] and report.pruned[1] > 0
    assert sorted(p.name for p in engines.iterdir()) == live  # the tiers' own stay
    _print_build(report, Repository(root))
    assert "removed 1 cached engine no tier uses any more" in capsys.readouterr().out
    # A record that cannot be read: nothing can be called unused, nothing is removed.
    shutil.copytree(engines / live[0], stale)
    (stale / "manifest.json").write_text(json.dumps(manifest))
    (root / "tiny" / "tiers" / "w050" / "tier.json").write_text("{")
    assert Repository(root).onnx_in_use("tiny") is None and stale.exists()


def _rebuilt_with(built, tmp_path, yaml: str):
    """A copy of the built repository with ``yaml`` appended to its model.yaml, built again
    (no profile): the build's report."""
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    path = root / "tiny" / "model.yaml"
    path.write_text(path.read_text() + yaml)
    return build_model(Repository(root), "tiny", progress=False, profile=False)


def test_a_build_says_which_built_tiers_model_yaml_no_longer_lists(built, tmp_path, capsys):
    # A tier dropped from model.yaml keeps its folder and its engines (put back, it serves
    # without a rebuild), but nothing said so: they stayed on the volume for good, unknown.
    import shutil

    import yaml

    from innfer.cli import _print_build

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    path = root / "tiny" / "model.yaml"
    config = yaml.safe_load(path.read_text())
    config["tiers"] = [t for t in config["tiers"] if t["name"] != "w050"]
    path.write_text(yaml.safe_dump(config))
    (root / "tiny" / "tiers" / "w050.build-0123abcd").mkdir()  # a staging folder: no tier
    repo = Repository(root)
    assert [t for t, _ in repo.unlisted_tiers("tiny")] == ["w050"]
    report = build_model(repo, "tiny", progress=False, profile=False)
    assert [t.name for t in report.tiers] == ["w100"]
    _print_build(report, repo)
    out = capsys.readouterr().out
    assert "kept, not served: tiers/w050 (" in out and "no longer lists it" in out
    assert (root / "tiny" / "tiers" / "w050" / "model.onnx").is_file()  # kept, as said
    path.write_text(yaml.safe_dump({**config, "tiers": yaml.safe_load(
        (built[0] / "tiny" / "model.yaml").read_text())["tiers"]}))  # fmt: skip
    assert repo.unlisted_tiers("tiny") == []


def test_a_build_says_an_auto_tiers_key_without_goals_leaves_auto_tiering_off(built, tmp_path):
    # `auto_tiers:` with its goals commented out: the build measured no frontier and said
    # nothing, and the server never chose a tier.
    report = _rebuilt_with(built, tmp_path, "auto_tiers:\n  # max_tiers: 4\n")
    assert report.frontier is None
    assert [w for w in report.warnings if "auto_tiers has no goals" in w], report.warnings


def test_an_interrupted_rebuild_leaves_the_tiers_that_served_serving(built, tmp_path, monkeypatch):
    # Tiers were rewritten in place: a build stopped between a tier's new model.onnx and its
    # tier.json left a model every load refused ("does not match ...: run innfer build"),
    # though it had served before the build began (review helper-150).
    import shutil

    import runtime.build.pipeline as pipeline

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    before = {
        t: (root / "tiny" / "tiers" / t / "model.onnx").read_bytes() for t in ("w100", "w050")
    }
    yaml_path = root / "tiny" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text() + "multiple_of: 8\n")  # w050: 12 channels -> 8 or 16

    real, calls = pipeline.count_flops, []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # w050's: after its new files are written, before its record
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "count_flops", stopped)
    with pytest.raises(KeyboardInterrupt):
        build_model(Repository(root), "tiny", progress=False, profile=False)
    # The old tiers, whole: refused as sampled with the old multiple_of, as before the
    # build began (a mixed set was served READY; review 157), never as a torn tier.
    with pytest.raises(RepositoryError, match=r"w050/tier\.json was sampled with multiple_of 1"):
        Repository(root).load("tiny")
    for t, data in before.items():
        assert (root / "tiny" / "tiers" / t / "model.onnx").read_bytes() == data
    assert sorted(p.name for p in (root / "tiny" / "tiers").iterdir()) == ["w050", "w100"]
    monkeypatch.undo()
    report = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert "w050" in [t.name for t in report.tiers if t.exported]
    assert (root / "tiny" / "tiers" / "w050" / "tier.json").is_file()
    assert (root / "tiny" / "tiers" / "w050" / "model.onnx").read_bytes() != before["w050"]
    assert sorted(p.name for p in (root / "tiny" / "tiers").iterdir()) == ["w050", "w100"]


def test_a_load_that_reads_a_tier_across_its_swap_loads_the_new_one(built, tmp_path, monkeypatch):
    # A load read tier.json, then hashed model.onnx: a build's swap in between said "does not
    # match ...: run innfer build" and marked the model broken until a restart (review
    # helper-152). Here the record read first is the old tier's, the files the new one's.
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    repo = Repository(root)
    old = repo.load_record("tiny", "w050")
    yaml_path = root / "tiny" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text() + "multiple_of: 8\n")
    build_model(repo, "tiny", progress=False, profile=False)  # w050 swapped in anew
    new = repo.load_record("tiny", "w050")
    assert new.onnx_sha256 != old.onnx_sha256
    real, reads = Repository._built_record, []

    def before_the_swap(self, name, tier, config):
        reads.append(tier.name)
        if tier.name == "w050" and reads.count("w050") == 1:
            return dataclasses.replace(old, width=tier.width)  # read just before the swap
        return real(self, name, tier, config)

    monkeypatch.setattr(Repository, "_built_record", before_the_swap)
    served = Repository(root).load("tiny")
    assert served.tiers["w050"].onnx_sha256 == new.onnx_sha256


def test_builds_and_loads_remove_what_killed_writers_left(built, tmp_path):
    # A SIGKILL mid-write left hidden full-size temporary files and a frontier staging
    # folder that later builds and loads kept for good (review helper-150).
    import os
    import shutil

    from runtime.repository.leftovers import STALE_S

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    m = root / "tiny"

    def leftovers():
        temp = m / "tiers" / "w050" / ".model.onnx.4242-1a2b3c4d.tmp"
        staging = m / "frontier.build-8da9e7ad"
        (staging / "w050").mkdir(parents=True)
        temp.write_bytes(b"half an onnx")
        for p in (temp, staging):
            os.utime(p, (0, 2 * STALE_S))
        return temp, staging

    left = leftovers()
    build_model(Repository(root), "tiny", progress=False, profile=False)
    assert not any(p.exists() for p in left)
    left = leftovers()
    Repository(root).load("tiny")
    assert not any(p.exists() for p in left)


def test_a_build_warns_of_hand_written_tiers_below_the_accuracy_floor(built, tmp_path):
    # They are served until auto-tiering first chooses (for good where it is off), and the
    # build said nothing of them (review helper-151).
    yaml = "auto_tiers: {accuracy_floor: 0.99, widths: [1.0, 0.5]}\n"
    report = _rebuilt_with(built, tmp_path, yaml)
    said = [w for w in report.warnings if "below auto_tiers.accuracy_floor 0.99" in w]
    assert len(said) == 1 and "w100 (" in said[0] and "w050 (" in said[0], report.warnings


def _fields(entry) -> dict:
    """An engine cache entry's key fields, from its manifest."""
    return json.loads((entry / "manifest.json").read_text())["fields"]


def test_a_build_removes_its_own_engines_filed_under_an_old_key(built, tmp_path):
    # An upgrade that changed the key's fields (ONNX Runtime's dropped batch_profile) built
    # each engine again under its new key, and the old entries stayed until their ONNX
    # went - an engine per tier for good (review 143 F3). Another device's, backend's or
    # version's entry of the same ONNX is another node's: it stays.
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    engines = root / "tiny" / "engines"
    live = sorted(p.name for p in engines.iterdir())
    # An ONNX Runtime entry: other tests load the shared repository with the torch backend
    # too, and its entry sorted first about half the time (keys hash the ONNX; CI, session 61)
    ort = next(n for n in live if _fields(engines / n)["backend"] == "onnxruntime")

    def copy(name: str, **changes):
        entry = engines / name
        shutil.copytree(engines / ort, entry)
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["fields"].update(changes)
        (entry / "manifest.json").write_text(json.dumps(manifest))
        return entry

    old_key = copy("00000000000000000000", batch_profile=[1, 4, 8])  # the same engine
    other = copy("11111111111111111111", device="another-cpu", batch_profile=[1, 4, 8])
    # another release's recipe: the engine its pods on this volume load (review helper-152)
    recipe = copy("22222222222222222222", recipe=99, batch_profile=[1, 4, 8])
    report = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert report.pruned[0] == [old_key.name] and not old_key.exists()
    assert other.exists() and recipe.exists()
    assert sorted(p.name for p in engines.iterdir()) == sorted([*live, other.name, recipe.name])


def test_a_data_set_file_loads_in_either_layout_and_says_what_it_lacks(tmp_path):
    import numpy as np

    from runtime.demo.data import load

    x, y = np.random.default_rng(0).random((50, 3)), np.arange(50) % 4
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    ds = load(str(tmp_path / "xy.npz"))
    assert (len(ds.x_train), len(ds.x_test), ds.num_classes, ds.input_shape) == (40, 10, 4, (3,))
    np.savez(tmp_path / "split.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    ds = load(str(tmp_path / "split.npz"))
    assert (len(ds.x_train), len(ds.x_test)) == (30, 20) and ds.x_train.dtype == torch.float32
    np.savez(tmp_path / "short.npz", x=x, y=y[:10])
    with pytest.raises(ValueError, match="x and y need the same length"):
        load(str(tmp_path / "short.npz"))


def test_a_file_that_is_no_data_set_is_said_so_by_name(tmp_path):
    # A .npy was "internal error: TypeError: ... context manager"; a text file got numpy's
    # advice to load pickles; negative labels failed calibration deep in torch ("Target -7
    # is out of bounds"), fractional ones were truncated and scored.
    import numpy as np

    from runtime.demo.data import load

    x = np.zeros((10, 3))
    with open(tmp_path / "one.npz", "wb") as f:
        np.save(f, x)  # numpy.save's one array, under an .npz name
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    np.savez(tmp_path / "neg.npz", x=x, y=np.array([1, 2, 3, -7, 1, 2, 3, 0, 1, 2]))
    np.savez(tmp_path / "frac.npz", x_train=x[:6], y_train=np.full(6, 1.5), x_test=x[6:],
             y_test=np.ones(4))  # fmt: skip
    # ... and what is one loads: another array beside (metadata, an object array numpy
    # saves pickled) is not read; labels of a binary task may be bools.
    np.savez(tmp_path / "meta.npz", x=x, y=np.arange(10) % 3, meta={"source": "cam1"})
    assert load(str(tmp_path / "meta.npz")).num_classes == 3
    np.savez(tmp_path / "bool.npz", x=x, y=np.arange(10) % 2 == 0)
    assert load(str(tmp_path / "bool.npz")).num_classes == 2
    for name, said in [
        ("one.npz", r"one\.npz is one array \(numpy\.save\)"),
        ("text.npz", r"text\.npz is not a \.npz of plain arrays"),
        ("neg.npz", r"neg\.npz: y holds -7 \(element 3\); class labels are whole numbers"),
        ("frac.npz", r"frac\.npz: y_train holds 1\.5 \(element 0\)"),
    ]:
        with pytest.raises(ValueError, match=said):
            load(str(tmp_path / name))


def test_a_tier_that_fails_validation_is_not_left_loadable(tmp_path, monkeypatch):
    # Its model.onnx and tier.json were written before validation: the build failed, and a
    # server rebuilt the engine from them and served it (fp16 overflow: NaN outputs).
    import runtime.build.pipeline as pipeline
    from runtime.repository import RepositoryError

    root, _ = build_tiny(tmp_path, {**CONFIG, "evaluation": None}, repeats=2)
    Repository(root).load("tiny")  # served before
    real = pipeline.validate

    def failing(engine, module, config, tier, *args, **kwargs):
        if tier == "w050":
            raise pipeline.BuildError(f"tier {tier}: engine output 'logits' differs by nan")
        return real(engine, module, config, tier, *args, **kwargs)

    monkeypatch.setattr(pipeline, "validate", failing)
    yaml_path = root / "tiny" / "model.yaml"  # another sampling: every tier exported anew
    yaml_path.write_text(yaml_path.read_text() + "method: point\n")
    with pytest.raises(pipeline.BuildError, match="differs by nan"):
        build_model(Repository(root), "tiny", progress=False, repeats=2)
    with pytest.raises(RepositoryError, match=r"w050/tier\.json is missing: run `innfer build`"):
        Repository(root).load("tiny")


@pytest.mark.parametrize("backends", [["torch"], ["torch", "onnxruntime"]])
def test_a_torch_builds_onnx_check_fails_it_only_where_onnx_runtime_may_serve_it(
    tmp_path, monkeypatch, backends
):
    # check_exported_onnx ran on every torch build: a torch-only model whose ONNX ONNX
    # Runtime cannot match failed, though nothing serves that ONNX (review helper-140).
    import runtime.build.pipeline as pipeline
    from runtime.build.pipeline import BuildError

    def mismatch(onnx_path, module, config, tier):
        raise BuildError(f"tier {tier} (its ONNX, in ONNX Runtime): engine output differs")

    monkeypatch.setattr(pipeline, "check_exported_onnx", mismatch)
    torch.manual_seed(1)
    inn = runtime.convert(_net(), (torch.rand(2, 1, 8, 8),))
    config = {k: v for k, v in CONFIG.items() if k != "evaluation"}
    add_model(tmp_path, "m", inn, {**config, "backends": backends})
    if "onnxruntime" in backends:
        with pytest.raises(BuildError, match="its ONNX, in ONNX Runtime"):
            build_model(Repository(tmp_path), "m", backend="torch", progress=False, profile=False)
    else:
        report = build_model(Repository(tmp_path), "m", backend="torch", progress=False,
                             profile=False)  # fmt: skip
        assert any("its ONNX, in ONNX Runtime" in w for w in report.warnings)


def test_a_repository_of_an_older_or_newer_innfer_is_read_as_far_as_it_can_be(
    built, tmp_path, caplog
):
    # Review helper-143. Older: tier.json without inn_sha256 skipped the INN check in
    # silence (a stale tier served after an upgrade). Newer: every field a later build adds
    # made this innfer call the record corrupted (a rollback, or an old replica beside a
    # new one, refused the model); a record of a later format is refused by name.
    import logging
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    path = root / "tiny" / "tiers" / "w050" / "tier.json"
    record = json.loads(path.read_text())
    older = {k: v for k, v in record.items() if k != "inn_sha256"}
    path.write_text(json.dumps(older))
    with caplog.at_level(logging.WARNING, logger="innfer.repository"):
        assert len(Repository(root).load("tiny").engines) == 2
    assert "tiers w050 do not record the INN" in caplog.text
    caplog.clear()
    path.write_text(json.dumps({**record, "quantized": {"int8": True}}))
    with caplog.at_level(logging.WARNING, logger="innfer.repository"):
        assert len(Repository(root).load("tiny").engines) == 2
    assert "fields quantized are unknown to this innfer" in caplog.text
    path.write_text(json.dumps({**record, "format": 2}))
    with pytest.raises(RepositoryError, match=r"written by a newer innfer \(record format 2"):
        Repository(root).load("tiny")
    path.write_text(json.dumps({**record, "format": "2"}))
    with pytest.raises(RepositoryError, match=r"corrupted \(format is '2'"):
        Repository(root).load("tiny")


@pytest.mark.parametrize("edit", ["multiple_of: 8\n", "method: point\n"])
def test_a_tier_sampled_with_other_settings_than_model_yaml_says_is_refused(built, tmp_path, edit):
    # model.yaml's multiple_of or method edited, not rebuilt: the tiers were served READY at
    # the old channel counts, where an edited width is refused (review 157).
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    path = root / "tiny" / "model.yaml"
    path.write_text(path.read_text() + edit)
    key = edit.split(":")[0]
    with pytest.raises(RepositoryError, match=rf"was sampled with {key} .*: run `innfer build`"):
        Repository(root).load("tiny", backend="onnxruntime")
    build_model(Repository(root), "tiny", progress=False, profile=False)  # the fix
    assert str(Repository(root).load_record("tiny", "w050").sampling[key]) in edit


def test_accuracy_measured_on_an_evaluation_model_yaml_dropped_is_not_scheduled_by(built, tmp_path):
    import shutil

    import yaml

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    path = root / "tiny" / "model.yaml"
    config = yaml.safe_load(path.read_text())
    del config["evaluation"]
    path.write_text(yaml.safe_dump(config))
    # Its norm statistics were re-estimated on that evaluation set: refused as resampled.
    with pytest.raises(RepositoryError, match="was sampled with norm_from 'digits', but now"):
        Repository(root).load("tiny", backend="onnxruntime")
    for tier in ("w100", "w050"):  # as an older build wrote them: no sampling recorded
        record = root / "tiny" / "tiers" / tier / "tier.json"
        data = json.loads(record.read_text())
        del data["sampling"]
        record.write_text(json.dumps(data))
    # The accuracy the ModelConfig reported and the scheduler ranked by (review 157).
    served = Repository(root).load("tiny", backend="onnxruntime")
    try:
        assert [r.accuracy for r in served.tiers.values()] == [None, None]
    finally:
        for engine in served.engines.values():
            engine.close()


def test_an_interrupted_build_says_which_tiers_are_left_unbuilt(
    built, tmp_path, monkeypatch, capsys
):
    # "innfer build: interrupted" alone, with w100 rebuilt for multiple_of 8 and w050 not:
    # the next load found the mixed set (review 157).
    import shutil

    import runtime.build.pipeline as pipeline
    from innfer import cli

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    yaml_path = root / "tiny" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text() + "multiple_of: 8\n")
    real, calls = pipeline.count_flops, []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # w050's export
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "count_flops", stopped)
    code = cli.main(["build", str(root), "--no-profile"])
    err = capsys.readouterr().err
    assert code == 130 and Repository(root).unbuilt("tiny") == ["w050"]
    assert "tiny: tiers w050 are not built for its model.yaml (w100 are); a server refuses" in err
    assert err.rstrip().endswith("innfer build: interrupted")


def test_a_build_on_a_read_only_volume_is_refused_before_the_work(built, tmp_path, monkeypatch):
    # The whole build ran, then failed on profile.json: "[Errno 30] Read-only file system"
    # (review 157). os.access says EROFS even to root; simulated here.
    import os
    import shutil

    import runtime.build.pipeline as pipeline

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    real = os.access
    monkeypatch.setattr(
        pipeline.os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode)
    )
    monkeypatch.setattr(pipeline, "load", lambda *a: pytest.fail("the INN was read"))
    with pytest.raises(pipeline.BuildError, match=r"tiny is not writable.*writable copy"):
        build_model(Repository(root), "tiny", progress=False)


def test_a_tier_kept_from_an_older_build_gains_its_sampling_record(built, tmp_path):
    # A tier reused unchanged kept a record without sampling for good: the check of
    # model.yaml's multiple_of/method never applied to it (review 158).
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    for tier in ("w100", "w050"):  # as an older build wrote them
        record = root / "tiny" / "tiers" / tier / "tier.json"
        data = json.loads(record.read_text())
        del data["sampling"]
        record.write_text(json.dumps(data))
    report = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert not any(t.exported for t in report.tiers)  # reused, not exported again
    sampling = [Repository(root).load_record("tiny", t).sampling for t in ("w100", "w050")]
    assert all(s is not None and s["multiple_of"] == 1 for s in sampling), sampling


@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
def test_a_float16_model_builds_at_its_own_precision_tolerance(tmp_path, out_dtype):
    # A model converted in float16 (weights, inputs and outputs) runs in float16 in torch
    # and in its ONNX alike; their difference is float16 rounding (4.9e-4 here), which the
    # fp32 engines' tolerance refused: no backend could build it on a CPU (review 170).
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.n = torch.nn.Linear(20, 32), torch.nn.LayerNorm(32)
            self.act, self.b = torch.nn.PReLU(), torch.nn.Linear(32, 7)

        def forward(self, x):  # float16 all through, or returned as float32 (review 179)
            y = self.b(self.act(self.n(self.a(x))))
            return y if out_dtype == "float16" else y.float()

    torch.manual_seed(0)
    inn = runtime.convert(MLP().eval().half(), (torch.randn(2, 20, dtype=torch.float16),))
    config = {"inputs": [{"name": "x", "dtype": "float16", "shape": [20]}],
              "outputs": [{"name": "y", "dtype": out_dtype, "shape": [7]}],
              "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
              "max_batch": 4, "threads": 1}  # fmt: skip
    add_model(tmp_path, "half", inn, config)
    report = build_model(Repository(tmp_path), "half", progress=False, profile=False)
    assert [t.name for t in report.tiers] == ["w100", "w050"]
    assert all(0 < t.max_abs_err < 2e-2 for t in report.tiers)


def test_a_model_export_captured_at_one_image_size_is_not_built_at_another(tmp_path):
    # torch.export fixes an image's spatial size: the branch below was decided at 32x32,
    # and the tiers built for 16x16 served outputs 0.19 off without a word (review 170).
    from runtime.build.pipeline import BuildError

    class ShapeBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Linear(16, 5)

        def forward(self, x):
            h = torch.relu(self.c(x))
            if h.shape[-1] > 16:  # data-dependent for fx: captured by torch.export
                h = torch.nn.functional.max_pool2d(h, 2)
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    inn = runtime.convert(ShapeBranch().eval(), (torch.randn(2, 3, 32, 32),))
    assert inn.info["frontend"] == "export"

    def config(side: int) -> dict:
        return {"inputs": [{"name": "x", "dtype": "float32", "shape": [3, side, side]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [5]}],
                "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 2,
                "threads": 1}  # fmt: skip

    add_model(tmp_path, "small", inn, config(16))
    with pytest.raises(BuildError, match=r"is \[3, 16, 16\] per row, but the model was "
                                         r"captured .* at \[3, 32, 32\]"):  # fmt: skip
        build_model(Repository(tmp_path), "small", progress=False, profile=False)
    add_model(tmp_path, "same", inn, config(32))
    report = build_model(Repository(tmp_path), "same", progress=False, profile=False)
    assert report.tiers[0].max_abs_err < 1e-4

    class Signal(ShapeBranch):  # a 1-D signal [C, L]: export keeps its length static too
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv1d(3, 16, 3, padding=1)

        def forward(self, x):
            h = torch.relu(self.c(x))
            if h.shape[-1] > 16:
                h = torch.nn.functional.max_pool1d(h, 2)
            return self.fc(h.mean(2))

    inn = runtime.convert(Signal().eval(), (torch.randn(2, 3, 32),))
    assert inn.info["frontend"] == "export"
    add_model(tmp_path, "signal", inn, {**config(16), "inputs": [
        {"name": "x", "dtype": "float32", "shape": [3, 16]}]})  # fmt: skip
    with pytest.raises(BuildError, match=r"is \[3, 16\] per row, .* at \[3, 32\]"):
        build_model(Repository(tmp_path), "signal", progress=False, profile=False)


def _timed_as(tables: dict):
    """A ``profile_tiers`` stand-in that times each tier as ``tables[tier]`` says (its next
    value, p50 ms at every batch size; the last one ever after) and records each call's
    tiers: (stand-in, calls)."""
    import runtime.repository.profile as profile

    calls = []

    def fake(engines, config, backend, **kwargs):
        calls.append(sorted(engines))
        table = {}
        for tier in engines:
            ms = tables[tier].pop(0) if len(tables[tier]) > 1 else tables[tier][0]
            table[tier] = {str(bs): {"p50_ms": ms * bs, "p90_ms": 1.2 * ms * bs}
                           for bs in config.batch_sizes}  # fmt: skip
        return profile.profile_document(backend, config.threads, table, None, None)

    return fake, calls


def test_a_tier_timed_slower_than_a_more_accurate_one_is_timed_again(tmp_path, monkeypatch):
    # The demo's first build timed w075 at 0.83 ms against w100's 0.65 at batch 8 (p90s of
    # ~4.7 ms: timed beside other work), and every server then warned "drop w075" until a
    # build moments later said 0.46 against 0.64 (review helper-225). The build now times
    # both again, up to RETIMES times, and writes what it measured last.
    import runtime.build.pipeline as pipeline

    fake, calls = _timed_as({"w100": [1.0], "w050": [3.0, 0.4]})
    monkeypatch.setattr(pipeline, "profile_tiers", fake)
    root, report = build_tiny(tmp_path)
    assert calls == [["w050", "w100"], ["w050", "w100"]]
    profile = json.loads((root / "tiny" / "profile.json").read_text())
    assert profile["tiers"]["w050"]["1"]["p50_ms"] == pytest.approx(0.4)
    assert not any("timed slower" in w for w in report.warnings)


def test_the_builds_slower_tier_rule_is_the_servers():
    # The build re-times what the server would warn about at load; the two modules may not
    # import each other (tests/test_architecture.py), so the margins are kept equal here.
    from runtime.repository import profile
    from server.scheduling import latency

    assert (profile.SLOWER_MARGIN, profile.SLOWER_MIN_MS) == (
        latency.SLOWER_MARGIN, latency.SLOWER_MIN_MS,
    )  # fmt: skip

    def table(b1: float, b8: float) -> dict:
        return {"1": {"p50_ms": b1, "p90_ms": b1}, "8": {"p50_ms": b8, "p90_ms": b8}}

    tables = {"a": table(1.0, 2.0), "b": table(0.5, 2.2)}
    server_says = latency.slower_than_more_accurate(
        [latency.TierInfo(n, acc, {int(k): v["p90_ms"] for k, v in t.items()},
                          {int(k): v["p50_ms"] for k, v in t.items()})
         for (n, t), acc in zip(tables.items(), (0.9, 0.8), strict=True)]
    )  # fmt: skip
    assert profile.slower_tiers(tables, ["a", "b"]) == server_says == [("b", "a", [8])]


def test_a_tier_that_stays_slower_than_a_more_accurate_one_is_said_by_the_build(
    tmp_path, monkeypatch
):
    import runtime.build.pipeline as pipeline

    fake, calls = _timed_as({"w100": [1.0], "w050": [3.0]})
    monkeypatch.setattr(pipeline, "profile_tiers", fake)
    _, report = build_tiny(tmp_path)
    assert len(calls) == 1 + pipeline.RETIMES
    (said,) = [w for w in report.warnings if "timed slower" in w]
    # (the tiny model's tiers score alike: "equally accurate", where "more accurate" named one
    # better than it was - review helper-257)
    assert "tier w050 timed slower than the equally accurate w100" in said and "drop w050" in said


def test_a_model_whose_build_failed_says_why_where_it_is_loaded(tmp_path):
    # After a failed build the server's reason was only "tier.json is missing: run `innfer
    # build`" - which fails the same way again (review helper-225). The load now names the
    # last build's error; a build that succeeds removes it.
    from runtime.repository.store import BUILD_FAILED_FILE

    bad = {**CONFIG, "inputs": [{"name": "input", "dtype": "float32", "shape": [3, 8, 8]}]}
    with pytest.raises(RuntimeError) as failed:  # (BuildError)
        build_tiny(tmp_path, bad)
    repo = Repository(tmp_path)
    with pytest.raises(RepositoryError) as refused:
        repo.load("tiny")
    said = str(refused.value)
    assert "tier.json is missing" in said and "its last build failed" in said
    assert str(failed.value)[:60] in said
    (tmp_path / "tiny" / "model.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    build_model(repo, "tiny", progress=False, repeats=2)
    assert not (tmp_path / "tiny" / BUILD_FAILED_FILE).exists()
    assert set(repo.load("tiny").engines) == {"w100", "w050"}


def test_a_build_table_shows_no_latency_of_another_backends_profile(built, tmp_path, capsys):
    # `build --backend torch --no-profile` over an ONNX Runtime profile printed its
    # latencies under "(torch)" (review helper-276).
    import shutil

    from innfer import cli

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    assert cli.main(["build", str(root), "--backend", "torch", "--no-profile"]) == 0
    out = capsys.readouterr().out
    assert "tiny (torch" in out, out
    rows = [line.split() for line in out.splitlines() if line.startswith(("w100", "w050"))]
    assert rows and all(r[4:6] == ["-", "-"] for r in rows), out
    assert "profile.json was measured with onnxruntime, not torch" in out


def test_a_full_volume_while_a_tier_is_written_is_said_with_its_fix(built, tmp_path, monkeypatch):
    # "[Errno 28] No space left on device: '.../tiers/w050.build-172df606/module.safetensors'":
    # a staging folder gone by then, no volume, no fix (review helper-278).
    import errno
    import shutil

    import runtime.build.pipeline as pipeline

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    yaml_path = root / "tiny" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text() + "multiple_of: 8\n")  # the tiers re-exported

    def full(staging, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "module.safetensors"))

    monkeypatch.setattr(pipeline, "write_tier_files", full)
    with pytest.raises(pipeline.BuildError) as e:
        build_model(Repository(root), "tiny", progress=False, profile=False)
    said = str(e.value)
    assert "the volume holding" in said and "tiers is full: free space or grow it" in said, said
    assert ".build-" not in said


def test_a_tier_that_keeps_a_group_whole_because_of_its_rounding_step_says_so(tmp_path):
    # At multiple_of 16 the tiny CNN's 16-channel group is one step: w050 keeps it whole,
    # and nothing said why the tier was larger than its width (review helper-296).
    _, report = build_tiny(tmp_path, {**CONFIG, "multiple_of": 16}, repeats=1)
    said = [w for w in report.warnings if "keeps group(s)" in w]
    assert len(said) == 1 and "tier w050 of tiny keeps group(s) 0 (16, step 16)" in said[0]
    assert "3 (" not in said[0]  # 24 -> 16: shrunk
    _, report = build_tiny(tmp_path / "again", CONFIG, repeats=1)
    assert not [w for w in report.warnings if "keeps group(s)" in w]
    # at multiple_of 1 nothing is kept by its step: no warning to give
    _, report = build_tiny(tmp_path / "one", {**CONFIG, "multiple_of": 1}, repeats=1)
    assert not [w for w in report.warnings if "keeps group(s)" in w]


def test_report_leaves_out_accuracy_measured_on_another_evaluation_and_widths_by_channels(
    tmp_path, capsys
):
    # The served table kept the build's accuracy "on model.yaml's evaluation set" after
    # that set changed, and a tier of per-group counts was shown at the largest served
    # tier's FLOPs fraction - 25.4 % for w050's network (review helper-300).
    from innfer.cli import main as cli

    config = {**CONFIG, "tiers": [*CONFIG["tiers"], {"name": "c050", "width": {"0": 8, "3": 12}}]}
    build_tiny(tmp_path, config, repeats=1)
    d = tmp_path / "tiny"
    assert cli(["report", str(d), "--widths", "1", "0.5"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()
            if line.strip().startswith(("c050", "w050", "w100"))}  # fmt: skip
    assert rows["c050"][0] == rows["w050"][0] == "50.0%" and rows["c050"][1].endswith("%")
    assert "measured on another evaluation" not in out
    doc = yaml.safe_load((d / "model.yaml").read_text())
    doc["evaluation"]["limit"] = 32
    (d / "model.yaml").write_text(yaml.safe_dump(doc))
    assert cli(["report", str(d), "--widths", "1", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "the served tiers' accuracy was measured on another evaluation than model.yaml's" in out
    assert "w100 on dataset digits, first 64" in out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()
            if line.strip().startswith(("c050", "w050", "w100"))}  # fmt: skip
    assert {r[1] for r in rows.values()} == {"-"}


def test_a_build_without_profiling_says_the_kept_profile_was_timed_at_other_threads(tmp_path):
    # model.yaml's threads edited, then `innfer build --no-profile`: the kept profile.json
    # times the engines at the old count, and nothing said so (review helper-300).
    root, _ = build_tiny(tmp_path, CONFIG, repeats=1)
    again = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert not [w for w in again.warnings if "profile.json" in w]
    doc = yaml.safe_load((root / "tiny" / "model.yaml").read_text())
    doc["threads"] = 2
    (root / "tiny" / "model.yaml").write_text(yaml.safe_dump(doc))
    again = build_model(Repository(root), "tiny", progress=False, profile=False)
    said = [w for w in again.warnings if "profile.json" in w]
    assert said and "profile.json was measured with 1 intra-op threads per engine" in said[0]


def test_report_shows_model_yamls_tier_widths_off_its_grid_by_default(tmp_path, capsys):
    # The default rows were the 1/8 grid alone: a (calibrated) w030 never appeared in the
    # width table or plot (review helper-300).
    from innfer.cli import main as cli

    config = {**CONFIG, "tiers": [{"name": "w100", "width": 1.0}, {"name": "w030", "width": 0.3}]}
    build_tiny(tmp_path, config, repeats=1)
    assert cli(["report", str(tmp_path / "tiny")]) == 0
    widths = [line.split()[0] for line in capsys.readouterr().out.splitlines()
              if line.strip().endswith(("sampled", "calibrated"))]  # fmt: skip
    assert (
        "30.0%" in widths
        and "87.5%" in widths
        and widths == sorted(widths, key=lambda w: -float(w.rstrip("%")))
    )


def test_a_build_keeps_another_nodes_engine_whose_backend_key_fields_differ(tmp_path):
    # TensorRT's key fields name the device's SM count (a MIG slice bears its GPU's name):
    # a full GPU's `innfer build` pruned the MIG slice's engine as "filed under an old key",
    # and the slice's build the GPU's, on one volume (review helper-310). ONNX Runtime
    # stands in, its key fields set per node.
    from test_build_review28 import _add_onnx

    from runtime.engines import BuildOptions
    from runtime.engines.onnxruntime import OnnxRuntimeBackend
    from runtime.hashing import sha256_file
    from runtime.repository import EngineCache

    onnx_path = _add_onnx(tmp_path / "tier" / "model.onnx")
    sha = sha256_file(onnx_path)

    def node(sm_count: int) -> OnnxRuntimeBackend:
        backend = OnnxRuntimeBackend()
        backend.key_fields = lambda options: {"sm_count": sm_count}
        return backend

    cache, options = EngineCache(tmp_path / "engines"), BuildOptions()
    slice_, full = node(16), node(132)
    for backend in (slice_, full):
        assert cache.get(backend, onnx_path, options, onnx_sha256=sha)[1]  # each builds
    assert cache.prune({sha}, full, options) == ([], 0)
    assert cache.prune({sha}, slice_, options) == ([], 0)
    assert len(list((tmp_path / "engines").iterdir())) == 2
    for backend in (slice_, full):
        assert not cache.get(backend, onnx_path, options, onnx_sha256=sha)[1]  # both cached
