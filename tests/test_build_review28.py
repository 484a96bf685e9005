"""Review 28 of the build and the engine cache: each test failed before its fix.

The tier's files and the torch backend (module files written after the ONNX, a server
caching one export's weights under another's key, a missing module.json never re-exported),
validation (the engine's precision, a cached engine that fails it), the cache's build
directory and rename errors, an entry repaired by another builder, the fp16 pass (a weight
that is an output) and its check in the TensorRT backend. Real ONNX Runtime, torch and files
throughout; TensorRT cannot be installed here, so only its torch-free helpers run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from netgen import tiny_cnn
from onnx import TensorProto, helper, numpy_helper
from test_channel_search import CONFIG as CHANNEL_CONFIG

import runtime
import runtime.build.export as export_module
from runtime.build.export import write_tier_files
from runtime.build.pipeline import BuildError, add_model, build_model, validate
from runtime.engines import BuildOptions, EngineError, get_backend
from runtime.engines import tensorrt as trt_module
from runtime.engines.fp16 import convert_to_fp16
from runtime.engines.onnxruntime import OnnxRuntimeBackend
from runtime.engines.torch import MODULE_SPEC, MODULE_WEIGHTS, TorchBackend
from runtime.repository import FRONTIER_DIR, MANIFEST, EngineCache, Repository, sha256_file
from runtime.repository import cache as cache_module
from runtime.repository import profile as profile_module
from runtime.repository.config import ModelConfig

CONFIG = CHANNEL_CONFIG  # two tiers of the tiny CNN, no evaluation set


def _inn():
    return runtime.convert(tiny_cnn(), (torch.randn(1, 1, 8, 8),))


def _add(root: Path, config: dict = CONFIG) -> Repository:
    add_model(root, "tiny", _inn(), config)
    return Repository(root)


def _build(repo: Repository, backend: str = "torch"):
    return build_model(repo, "tiny", backend=backend, progress=False, profile=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """'tiny' built with the torch backend (engines cached), unprofiled; copy before editing."""
    root = tmp_path_factory.mktemp("repo")
    _build(_add(root))
    return root


@pytest.fixture
def repo(built, tmp_path) -> Repository:
    shutil.copytree(built, tmp_path / "repo")
    return Repository(tmp_path / "repo")


def _x(batch: int = 3) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)


def _ort(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(onnx_path)).run(None, {"input": x})[0]


# --- 1. module files first, the ONNX last, module.json naming it ---------------------------


def test_a_server_loading_a_tier_mid_export_never_caches_another_exports_weights(repo, monkeypatch):
    # w050 is made wider and rebuilt. After every file the export writes, a server loads the
    # tier with the torch backend: it gets the engine of the model.onnx it hashed, or an
    # EngineError - before, it cached the old weights under the new ONNX's key for good, and
    # every later build failed its validation.
    config = repo.model_dir("tiny") / "model.yaml"
    config.write_text(config.read_text().replace("width: 0.5", "width: 0.75"))
    shutil.rmtree(repo.model_dir("tiny") / "engines")  # (a server with a cache of its own)
    tier = repo.tier_dir("tiny", "w050")
    backend = get_backend("torch")
    options = repo.build_options(repo.config("tiny"), backend)
    written, served = [], []
    real = export_module.write_bytes

    def write_then_load(path, data):
        real(path, data)
        if not path.parent.name.startswith(f"{tier.name}.build-"):  # the export's staging
            return
        written.append(path.name)
        try:
            engine, _ = EngineCache(repo.model_dir("tiny") / "engines").get(
                backend, tier / "model.onnx", options
            )
        except EngineError as exc:
            served.append(str(exc))
            return
        x = _x()
        got = engine.run({"input": x})["logits"]
        np.testing.assert_allclose(got, _ort(tier / "model.onnx", x), rtol=1e-4, atol=1e-5)
        served.append("same as its ONNX")

    monkeypatch.setattr(export_module, "write_bytes", write_then_load)
    report = _build(repo)
    assert written == [MODULE_WEIGHTS, MODULE_SPEC, "model.onnx"]
    # The export is written beside the tier and swapped in whole: mid-export a server loads
    # the old tier, consistent (in place, it met the new weights beside the old spec, then
    # the new spec beside the old ONNX: refused, safely, but not served).
    assert served == ["same as its ONNX"] * 3
    assert [t.name for t in report.tiers if t.exported] == ["w050"]
    meta = json.loads((tier / MODULE_SPEC).read_text())
    assert meta["onnx_sha256"] == sha256_file(tier / "model.onnx")
    assert meta["weights_sha256"] == sha256_file(tier / MODULE_WEIGHTS)


def test_the_torch_backend_refuses_module_files_of_another_export(tmp_path):
    config = ModelConfig.from_dict({"name": "m", **CONFIG})
    inn = _inn()
    write_tier_files(tmp_path / "a", inn.sample(1.0), config)
    write_tier_files(tmp_path / "b", inn.sample(0.5), config)
    options = BuildOptions()
    TorchBackend().build(tmp_path / "a" / "model.onnx", tmp_path / "ok", options)
    for name in (MODULE_SPEC, MODULE_WEIGHTS):  # b's module beside a's ONNX
        shutil.copy(tmp_path / "b" / name, tmp_path / "a" / name)
    with pytest.raises(EngineError, match=r"belongs to another export.*innfer build"):
        TorchBackend().build(tmp_path / "a" / "model.onnx", tmp_path / "e1", options)
    # b's JSON (which names b's ONNX) with other weights; a JSON naming no ONNX at all
    shutil.copy(tmp_path / "ok" / MODULE_WEIGHTS, tmp_path / "b" / MODULE_WEIGHTS)
    with pytest.raises(EngineError, match="not the weights file"):
        TorchBackend().build(tmp_path / "b" / "model.onnx", tmp_path / "e2", options)
    meta = json.loads((tmp_path / "ok" / MODULE_SPEC).read_text())
    del meta["onnx_sha256"]
    (tmp_path / "a" / MODULE_SPEC).write_text(json.dumps(meta))
    with pytest.raises(EngineError, match=r"does not say which model\.onnx"):
        TorchBackend().build(tmp_path / "a" / "model.onnx", tmp_path / "e3", options)


def test_the_torch_backend_refuses_a_module_json_changed_after_the_build(tmp_path):
    # A layer's padding mode edited in module.json loaded and answered unlike model.onnx,
    # in silence: only the ONNX's and the weights' hashes were checked (review helper-146).
    config = ModelConfig.from_dict({"name": "m", **CONFIG})
    write_tier_files(tmp_path / "a", _inn().sample(1.0), config)
    spec = tmp_path / "a" / MODULE_SPEC
    meta = json.loads(spec.read_text())
    text = json.dumps(meta["architecture"])
    assert '"zeros"' in text  # a convolution's padding_mode
    meta["architecture"] = json.loads(text.replace('"zeros"', '"circular"', 1))
    spec.write_text(json.dumps(meta))
    with pytest.raises(EngineError, match=r"changed after the build.*innfer build"):
        TorchBackend().build(tmp_path / "a" / "model.onnx", tmp_path / "e", BuildOptions())


def test_a_cached_engine_that_fails_validation_is_removed_and_built_again(repo, caplog):
    # A torch entry holding w100's module under w050's key (what a server caching mid-export
    # left before the fix): it verifies and loads, so every build failed its validation.
    engines = repo.model_dir("tiny") / "engines"
    w050 = repo.tier_dir("tiny", "w050")
    backend = get_backend("torch")
    options = repo.build_options(repo.config("tiny"), backend)
    key, _ = cache_module.engine_key(sha256_file(w050 / "model.onnx"), backend, options)
    entry = engines / key
    manifest = json.loads((entry / MANIFEST).read_text())
    for name in manifest["files"]:
        shutil.copy(repo.tier_dir("tiny", "w100") / name, entry / name)
        manifest["files"][name] = sha256_file(entry / name)
    (entry / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="innfer.build"):
        report = _build(repo)
    tiers = {t.name: t for t in report.tiers}
    assert tiers["w050"].engine_built and not tiers["w100"].engine_built
    assert "removed its cached engine" in caplog.text
    assert json.loads((entry / MANIFEST).read_text())["files"] != manifest["files"]


def test_a_new_engine_that_fails_validation_leaves_no_entry(repo):
    from runtime.build.pipeline import validated_engine

    # (validated against another network than the one exported: what a wrong engine is)
    engines = repo.model_dir("tiny") / "engines"
    shutil.rmtree(engines)
    onnx_path = repo.tier_dir("tiny", "w050") / "model.onnx"
    config = repo.config("tiny")
    backend = get_backend("onnxruntime")
    options = repo.build_options(config, backend)
    wrong = _inn().sample(1.0)
    cache = EngineCache(engines)
    with pytest.raises(BuildError, match="differs from the torch sample"):
        validated_engine(
            cache, backend, onnx_path, sha256_file(onnx_path), options, wrong, config, "w050"
        )
    assert list(engines.iterdir()) == []


# --- 2. a tier is reused only with its module files -----------------------------------------


@pytest.mark.parametrize("damage", ["missing", "older innfer"])
def test_a_tier_without_its_module_files_is_exported_again(repo, damage):
    tier = repo.tier_dir("tiny", "w050")
    if damage == "missing":
        (tier / MODULE_SPEC).unlink()
    else:  # module.json as innfer wrote it before it named its ONNX
        meta = json.loads((tier / MODULE_SPEC).read_text())
        del meta["onnx_sha256"], meta["weights_sha256"]
        (tier / MODULE_SPEC).write_text(json.dumps(meta))
    report = _build(repo)
    assert [t.name for t in report.tiers if t.exported] == ["w050"]
    meta = json.loads((tier / MODULE_SPEC).read_text())
    assert meta["onnx_sha256"] == sha256_file(tier / "model.onnx")


def test_a_frontier_without_its_module_files_is_measured_again(tmp_path):
    from runtime.build.frontier import build_frontier

    config = {**CONFIG, "tiers": [CONFIG["tiers"][0]]}
    config["auto_tiers"] = {"widths": [1.0, 0.5], "shaped": False}
    repo = _add(tmp_path, config)
    first = build_frontier(repo, "tiny", False, 3, backend="onnxruntime")
    spec = repo.model_dir("tiny") / FRONTIER_DIR / "w050" / MODULE_SPEC
    assert build_frontier(repo, "tiny", False, 3, "onnxruntime").measured_at == first.measured_at
    spec.unlink()
    again = build_frontier(repo, "tiny", False, 3, backend="onnxruntime")
    assert spec.is_file()  # measured (exported) again, not read back without it
    assert [c.name for c in again.candidates] == [c.name for c in first.candidates]


# --- 3. validation at the engine's precision ------------------------------------------------


class _Off:
    """A real engine whose outputs are off by an fp16-sized error (5e-3)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def run(self, feeds):
        return {k: v + np.float32(5e-3) for k, v in self.engine.run(feeds).items()}

    def close(self) -> None:
        self.engine.close()


def test_an_fp32_engine_of_an_fp16_model_is_validated_at_fp32_tolerance(tmp_path, monkeypatch):
    # precision fp16 (for TensorRT), but ONNX Runtime builds fp32: its engine must match to
    # fp32's 1e-4.
    config = {**CONFIG, "precision": "fp16", "backends": ["tensorrt", "onnxruntime"]}
    repo = _add(tmp_path, config)
    real = EngineCache.get

    def get(self, *args, **kwargs):
        engine, built = real(self, *args, **kwargs)
        return _Off(engine), built

    monkeypatch.setattr(EngineCache, "get", get)
    with pytest.raises(BuildError, match=r"tolerance rtol=0.001, atol=0.0001 for fp32"):
        _build(repo, backend="onnxruntime")
    config = repo.config("tiny")
    assert config.precision == "fp16"
    assert validate(_Off(_Exact()), _Identity(), config, "w100", "fp16") == pytest.approx(
        5e-3, rel=1e-3
    )


class _Exact:
    def run(self, feeds):
        return {"logits": feeds["input"].reshape(len(feeds["input"]), -1)[:, :10]}


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x.reshape(len(x), -1)[:, :10]


# --- 4, 5. a failed build leaves nothing; a failed rename says why --------------------------


def _add_onnx(path: Path) -> Path:
    """A valid y = x + 1 ONNX file, x: (batch, 4) float32."""
    one = numpy_helper.from_array(np.ones(4, np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_failed_engine_build_leaves_no_build_directory(tmp_path, backend):
    onnx_path = tmp_path / "tier" / "model.onnx"
    onnx_path.parent.mkdir()
    onnx_path.write_bytes(b"not an onnx model")
    cache = EngineCache(tmp_path / "engines")
    with pytest.raises(EngineError):
        cache.get(get_backend(backend), onnx_path, BuildOptions())
    assert list((tmp_path / "engines").iterdir()) == []


def test_an_interrupted_engine_build_leaves_no_build_directory(tmp_path):
    class Interrupted(OnnxRuntimeBackend):
        def build(self, onnx_path, out_dir, options):
            super().build(onnx_path, out_dir, options)
            raise KeyboardInterrupt

    onnx_path = _add_onnx(tmp_path / "tier" / "model.onnx")
    with pytest.raises(KeyboardInterrupt):
        EngineCache(tmp_path / "engines").get(Interrupted(), onnx_path, BuildOptions())
    assert list((tmp_path / "engines").iterdir()) == []


def test_a_failed_rename_of_the_built_entry_is_reported_with_its_cause(tmp_path, monkeypatch):
    onnx_path = _add_onnx(tmp_path / "tier" / "model.onnx")
    real = Path.rename

    def rename(self, target):
        if ".tmp-" in self.name:
            raise PermissionError(13, "Permission denied (read-only volume)", str(target))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(EngineError, match="Permission denied") as caught:
        EngineCache(tmp_path / "engines").get(OnnxRuntimeBackend(), onnx_path, BuildOptions())
    assert isinstance(caught.value.__cause__, PermissionError)
    assert list((tmp_path / "engines").iterdir()) == []


def test_an_entry_another_builder_put_in_place_first_is_still_used(tmp_path, monkeypatch):
    onnx_path = _add_onnx(tmp_path / "tier" / "model.onnx")
    cache, backend = EngineCache(tmp_path / "engines"), OnnxRuntimeBackend()
    cache.get(backend, onnx_path, BuildOptions())
    (entry,) = (tmp_path / "engines").iterdir()
    theirs = tmp_path / "theirs"
    shutil.copytree(entry, theirs)
    shutil.rmtree(entry)
    real = Path.rename

    def rename(self, target):  # the other builder finishes just before this one
        if ".tmp-" in self.name:
            shutil.copytree(theirs, target)
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    engine, built = cache.get(backend, onnx_path, BuildOptions())
    assert built and engine.run({"x": np.zeros((2, 4), np.float32)})["y"].tolist() == [[1] * 4] * 2
    assert [p.name for p in (tmp_path / "engines").iterdir()] == [entry.name]


# --- 7. an entry repaired by another builder is loaded, not built again ---------------------


def test_an_entry_repaired_by_another_builder_meanwhile_is_loaded(tmp_path, monkeypatch):
    builds = []

    class Counting(OnnxRuntimeBackend):
        def build(self, *args):
            builds.append(1)
            return super().build(*args)

    onnx_path = _add_onnx(tmp_path / "tier" / "model.onnx")
    cache, backend = EngineCache(tmp_path / "engines"), Counting()
    cache.get(backend, onnx_path, BuildOptions())
    (entry,) = (tmp_path / "engines").iterdir()
    good = tmp_path / "good"
    shutil.copytree(entry, good)
    engine_file = next(p for p in entry.iterdir() if p.name != MANIFEST)
    engine_file.write_bytes(b"corrupt")
    real = EngineCache._discard

    def discard(self, *args):  # another pod repairs the entry after this one judged it
        shutil.rmtree(entry)
        shutil.copytree(good, entry)
        return real(self, *args)

    monkeypatch.setattr(EngineCache, "_discard", discard)
    engine, built = cache.get(backend, onnx_path, BuildOptions())
    assert not built and len(builds) == 1
    assert engine.run({"x": np.zeros((1, 4), np.float32)})["y"].tolist() == [[1.0] * 4]


# --- 8. a torch module.json without inputs --------------------------------------------------


def test_a_torch_module_json_without_inputs_is_an_engine_error(tmp_path):
    config = ModelConfig.from_dict({"name": "m", **CONFIG})
    write_tier_files(tmp_path, _inn().sample(0.5), config)
    meta = json.loads((tmp_path / MODULE_SPEC).read_text())
    del meta["inputs"]
    (tmp_path / MODULE_SPEC).write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="KeyError: 'inputs'"):
        TorchBackend().load(tmp_path, BuildOptions())


# --- 6. the fp16 pass: a weight that is an output; the built-in pass's graph checked ---------


@pytest.mark.parametrize("listed_as_input", [False, True], ids=["ir8", "weight-as-input"])
def test_fp16_pass_casts_a_weight_that_is_also_an_output(listed_as_input):
    b = numpy_helper.from_array(np.arange(4, dtype=np.float32), "b")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])]
    if listed_as_input:  # (IR < 4 listed every weight among the inputs)
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [4]))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "g",
        inputs,
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [4]),
        ],
        [b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    assert {i.data_type for i in half.graph.initializer} == {TensorProto.FLOAT16}
    y, b_out = ort.InferenceSession(half.SerializeToString()).run(
        None, {"x": np.ones((2, 4), np.float32)}
    )
    assert y.dtype == b_out.dtype == np.float32
    np.testing.assert_array_equal(b_out, np.arange(4))
    np.testing.assert_array_equal(y, np.ones((2, 4)) + np.arange(4))


def test_an_invalid_graph_from_the_builtin_fp16_pass_is_an_engine_error(tmp_path, monkeypatch):
    def mistyped(model):  # the pass as it was for a weight that is also an output
        half = convert_to_fp16(model)
        half.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
        return half

    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)  # not installed
    monkeypatch.setattr(trt_module, "convert_to_fp16", mistyped)
    with pytest.raises(EngineError, match="built-in fp16 pass made an invalid graph") as err:
        trt_module._fp16_model_bytes(_add_onnx(tmp_path / "model.onnx"))
    assert "build this model at precision: fp32" in str(err.value)  # the way out, said
    monkeypatch.setattr(trt_module, "convert_to_fp16", convert_to_fp16)
    assert onnx.load_from_string(trt_module._fp16_model_bytes(tmp_path / "model.onnx"))


# --- clean-ups: one atomic writer; no unused Profile class ----------------------------------


def test_tensorrt_writes_its_timing_cache_with_the_shared_atomic_writer(tmp_path, monkeypatch):
    writes = []
    real = trt_module.write_bytes

    def recording(path, data):
        writes.append(Path(path).name)
        real(path, data)

    class Cache:
        def serialize(self):
            return memoryview(b"timings")  # TensorRT's IHostMemory: a buffer, not bytes

    monkeypatch.setattr(trt_module, "write_bytes", recording)
    path = tmp_path / "timing-x.cache"
    trt_module.TensorRTBackend._save_timing_cache(object(), Cache(), path)
    assert writes == [path.name] and path.read_bytes() == b"timings"
    assert not hasattr(trt_module, "_write_atomic")
    # no temporary file left; the lock the save holds stays (empty, as a build lock does)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{path.name}.lock", path.name]


def test_the_profile_module_documents_what_reads_profiles():
    assert not hasattr(profile_module, "Profile")  # read by nothing; the scheduler never was
    assert "Profile.latency_ms" not in profile_module.__doc__


def test_module_json_records_the_sha256_of_the_onnx_and_weights(tmp_path):
    config = ModelConfig.from_dict({"name": "m", **CONFIG})
    data = write_tier_files(tmp_path, _inn().sample(0.5), config)
    meta = json.loads((tmp_path / MODULE_SPEC).read_text())
    assert meta["onnx_sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["weights_sha256"] == sha256_file(tmp_path / MODULE_WEIGHTS)
    assert not list(tmp_path.glob(".*.tmp"))
