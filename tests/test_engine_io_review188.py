"""Engines whose graph is not quite what model.yaml says (review 188), served through the
real server, ONNX Runtime and tritonclient: an output model.yaml does not list is never
answered nor checked, an input it does not list is refused at load by name, a tier that
fails only at max_batch is refused at load with the fix whether or not the load profiles,
and ``instances`` above the device's slots is said."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto, helper, numpy_helper
from serverutil import ServerThread, add_onnx_model, build_repository

from runtime.repository import Repository, RepositoryError

IO = {
    "inputs": [{"name": "input", "dtype": "float32", "shape": [4]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
    "tiers": [{"name": "w100", "width": 1.0}],
    "max_batch": 4,
    "default_latency_budget_ms": 2000,
}


def _graph(extra_nodes=(), extra_inputs=(), extra_outputs=()):
    """input [batch, 4] -> MatMul -> logits [batch, 10], plus what a test adds."""
    w = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(4, 10) / 40, "w")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"]), *extra_nodes],
        "g", [x, *extra_inputs], [y, *extra_outputs], [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()

    def make(width):
        return data, {"0": 10}, 80, 40

    return make


def test_an_output_model_yaml_does_not_list_is_neither_answered_nor_checked(tmp_path):
    """A constant of 3 values beside the logits failed every batch but those of exactly 3
    rows: the model READY, its requests INTERNAL."""
    const = helper.make_node(
        "Constant", [], ["ver"], value=numpy_helper.from_array(np.ones(3, np.int64))
    )
    make = _graph([const], extra_outputs=[
        helper.make_tensor_value_info("ver", TensorProto.INT64, [3])
    ])  # fmt: skip
    add_onnx_model(tmp_path, "extra_out", make, IO)
    srv = ServerThread({"repository": str(tmp_path)}).start()
    try:
        client = tc.InferenceServerClient(srv.address)
        for rows in (1, 2, 4):
            x = np.ones((rows, 4), np.float32)
            inp = tc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("extra_out", [inp])
            np.testing.assert_allclose(
                result.as_numpy("logits"), x @ (np.arange(40).reshape(4, 10) / 40), rtol=1e-6
            )
            assert result.as_numpy("ver") is None  # not answered
        stats = client.get_inference_statistics("extra_out", as_json=True)["model_stats"][0]
        assert stats["inference_stats"].get("fail", {}).get("count", "0") == "0"
        client.close()
    finally:
        srv.stop()


def test_an_input_model_yaml_does_not_list_is_refused_at_load_by_name(tmp_path):
    bias = helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["batch", 10])
    add = helper.make_node("Add", ["logits", "bias"], ["sum"])
    make = _graph([add], extra_inputs=[bias], extra_outputs=[
        helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 10])
    ])  # fmt: skip
    said = re.escape("takes input bias [10] (float32), which model.yaml does not list: add it")
    with pytest.raises(RepositoryError, match=said):
        add_onnx_model(tmp_path, "extra_in", make, IO)  # its load, before the profile


def _broken_by(tmp_path, monkeypatch, error: Exception, profile_at_load: bool) -> str:
    """Why 'tiny' did not load, its engine raising ``error`` past one row."""
    root = build_repository(tmp_path)
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    real = OnnxRuntimeEngine.run

    def one_row(self, feeds):
        if len(next(iter(feeds.values()))) > 1:
            raise error
        return real(self, feeds)

    monkeypatch.setattr(OnnxRuntimeEngine, "run", one_row)
    srv = ServerThread(
        {"repository": str(root), "models": ["tiny"], "profile_at_load": profile_at_load}
    ).start()
    try:
        return srv.server.plane.broken["tiny"]
    finally:
        srv.stop()


@pytest.mark.parametrize("profile_at_load", [True, False])
def test_a_tier_that_fails_only_at_max_batch_is_refused_with_the_fix(
    tmp_path, monkeypatch, profile_at_load
):
    """As an ONNX graph with a Reshape to a fixed batch: with the load's profile the whole
    model was refused in ONNX Runtime's words and "rebuild it"; without, it was served, each
    batch failing and running again row by row. The engine here raises past one row."""
    error = RuntimeError("Reshape: the input tensor cannot be reshaped to the requested shape")
    reason = _broken_by(tmp_path, monkeypatch, error, profile_at_load)
    assert "tier w100 runs batch 1 but fails at batch 4 (max_batch)" in reason
    assert "set max_batch: 1" in reason and "rebuild" not in reason
    assert "cannot be reshaped" in reason  # the engine's own words, after the fix


def test_a_failure_at_max_batch_that_is_not_a_shape_is_said_as_the_engines(tmp_path, monkeypatch):
    """Out of memory at max_batch was blamed on a fixed-batch graph (review 189)."""
    error = RuntimeError("Failed to allocate memory for requested buffer of size 2147483648")
    reason = _broken_by(tmp_path, monkeypatch, error, False)
    assert "fails at batch 4 (max_batch): Failed to allocate memory" in reason
    assert "lower max_batch" in reason and "fixed" not in reason


def test_a_bug_at_warm_up_keeps_its_type(tmp_path, monkeypatch):
    """Only an engine's failure is said as the tier's: a KeyError is a bug, with its
    traceback in the log (review 189)."""
    reason = _broken_by(tmp_path, monkeypatch, KeyError("logits"), False)
    assert reason.startswith("KeyError: 'logits'")


def test_a_renamed_input_is_said_as_model_yaml_edited(tmp_path):
    """The check for inputs model.yaml does not list comes after the listed ones: a
    rename in model.yaml was told to add the old name (review 189)."""
    add_onnx_model(tmp_path, "m", _graph(), IO)
    cfg = (tmp_path / "m" / "model.yaml").read_text().replace("name: input", "name: x")
    (tmp_path / "m" / "model.yaml").write_text(cfg)
    with pytest.raises(RepositoryError, match=re.escape("model.yaml gives x [4] (edited after")):
        Repository(tmp_path).load("m")


def test_instances_above_the_devices_slots_are_said(tmp_path, caplog):
    add_onnx_model(tmp_path, "four", _graph(), {**IO, "instances": 4})
    with caplog.at_level(logging.WARNING, logger="innfer"):
        srv = ServerThread({"repository": str(tmp_path)}).start()
        srv.stop()
    said = [r.getMessage() for r in caplog.records if "instances 4" in r.getMessage()]
    assert said and "device runs 1 batch(es) at once" in said[0], said
    assert "raise device_slots" in said[0]
    Repository(tmp_path).load("four")  # (the model itself is fine)


def test_equal_length_runs_answer_and_check_only_the_listed_outputs():
    """A mask-less sequence model's batch of several lengths runs one call per length:
    that path checked every output too, an unlisted constant failing it (review 189)."""
    from server.equal_lengths import EqualLengthRuns

    class Engine:
        def run(self, feeds):
            return {"y": feeds["x"] * 2, "ver": np.ones(3, np.int64)}

    parts = [{"x": np.ones((1, 4), np.float32)}, {"x": np.full((1, 4), 3, np.float32)}]
    runs = EqualLengthRuns([([0], parts[0]), ([1], parts[1])], parts)
    out = runs.run(Engine(), {"y": [4]})
    assert list(out) == ["y"]
    np.testing.assert_array_equal(out["y"], np.array([[2] * 4, [6] * 4], np.float32))


def _cast_to(dtype):
    def make(width):
        g = helper.make_graph(
            [helper.make_node("Cast", ["input"], ["y"], to=dtype)], "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 4])],
            [helper.make_tensor_value_info("y", dtype, ["b", 4])],
        )  # fmt: skip
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m.SerializeToString(), {}, 0, 0

    return make


@pytest.mark.parametrize(
    ("dtype", "says"),
    [
        # a dtype model.yaml refuses: "set its dtype to float64" led to a second error
        # (review helper-254)
        (TensorProto.DOUBLE, "innfer does not serve float64 tensors"),
        (TensorProto.INT32, "set its dtype to int32 in model.yaml"),
    ],
)
def test_an_engine_output_dtype_other_than_model_yamls_says_a_fix_that_works(tmp_path, dtype, says):
    cfg = {"inputs": [{"name": "input", "dtype": "float32", "shape": [4]}],
           "outputs": [{"name": "y", "dtype": "float32", "shape": [4]}],
           "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 2}  # fmt: skip
    with pytest.raises(RepositoryError) as err:
        add_onnx_model(tmp_path, "cast", _cast_to(dtype), cfg)
    assert says in str(err.value) and "run `innfer build`" in str(err.value)
