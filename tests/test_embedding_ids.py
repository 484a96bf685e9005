"""Integer inputs that index an embedding table, on a model that is not a text model: the
build records the table's rows, and the server refuses ids outside them by name
(INVALID_ARGUMENT) where the engine failed the whole batch (INTERNAL)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from serverutil import ServerThread
from tritonclient.utils import InferenceServerException

import runtime
from runtime.build.export import embedding_rows
from runtime.build.pipeline import add_model, build_model
from runtime.repository import Repository
from runtime.repository.config import ModelConfig

ROWS = 50


class Recommender(torch.nn.Module):
    """Item ids (batch, 5) -> pooled embedding -> scores (batch, 4), beside a float input."""

    def __init__(self) -> None:
        super().__init__()
        self.items = torch.nn.Embedding(ROWS, 16)
        self.hidden = torch.nn.Linear(16, 32)
        self.out = torch.nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.items(ids).mean(1) + bias)))


CONFIG = {
    "inputs": [
        {"name": "ids", "dtype": "int64", "shape": [5]},
        {"name": "bias", "dtype": "float32", "shape": [16]},
    ],
    "outputs": [{"name": "scores", "dtype": "float32", "shape": [4]}],
    "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
    "max_batch": 4,
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    torch.manual_seed(0)
    model = Recommender().eval()
    inn = runtime.convert(model, (torch.randint(0, ROWS, (2, 5)), torch.randn(2, 16)))
    root = tmp_path_factory.mktemp("repo")
    add_model(root, "rec", inn, CONFIG)
    build_model(Repository(root), "rec", backend="onnxruntime", progress=False, repeats=3)
    return root


def test_the_build_records_the_rows_each_id_input_indexes(repository):
    for tier in ("w100", "w050"):
        record = json.loads((repository / "rec" / "tiers" / tier / "tier.json").read_text())
        assert record["input_rows"] == {"ids": ROWS}  # the float input indexes nothing


def test_a_record_from_before_input_rows_is_completed_by_the_next_build(repository):
    path = repository / "rec" / "tiers" / "w050" / "tier.json"
    record = json.loads(path.read_text())
    del record["input_rows"]  # a tier built before this was kept
    path.write_text(json.dumps(record))
    report = build_model(Repository(repository), "rec", backend="onnxruntime", progress=False,
                         profile=False)  # fmt: skip
    assert not any(t.exported for t in report.tiers)  # reused, not exported again
    assert json.loads(path.read_text())["input_rows"] == {"ids": ROWS}


def test_embedding_rows_reads_the_smallest_table_an_input_indexes_directly(repository):
    data = (repository / "rec" / "tiers" / "w100" / "model.onnx").read_bytes()
    config = ModelConfig.from_dict(CONFIG)
    assert embedding_rows(data, config) == {"ids": ROWS}
    floats = {**CONFIG, "inputs": [{**CONFIG["inputs"][0], "dtype": "float32"}]}
    assert embedding_rows(data, ModelConfig.from_dict(floats)) is None  # no integer input
    assert embedding_rows(b"not onnx", config) is None


@pytest.mark.parametrize("bad", [ROWS, 10**6, -1])
def test_an_id_outside_the_table_is_refused_by_name_and_the_server_serves_on(repository, bad):
    server = ServerThread({"repository": str(repository)}).start()
    client = tc.InferenceServerClient(server.address)
    try:

        def infer(ids: np.ndarray):
            inputs = [tc.InferInput("ids", [1, 5], "INT64"), tc.InferInput("bias", [1, 16], "FP32")]
            inputs[0].set_data_from_numpy(ids)
            inputs[1].set_data_from_numpy(np.zeros((1, 16), np.float32))
            return client.infer("rec", inputs).as_numpy("scores")

        ok = np.array([[0, 1, 2, 3, ROWS - 1]], np.int64)
        assert infer(ok).shape == (1, 4)
        ids = ok.copy()
        ids[0, 3] = bad
        with pytest.raises(InferenceServerException) as err:
            infer(ids)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert f"input 'ids': id {bad} at [0, 3] is outside [0, {ROWS})" in err.value.message()
        assert infer(ok).shape == (1, 4)  # still serving
    finally:
        client.close()
        server.stop()


class Columns(torch.nn.Module):
    """A user id and an item id in the columns of one input, each into its own table."""

    def __init__(self) -> None:
        super().__init__()
        self.user, self.item = torch.nn.Embedding(20, 8), torch.nn.Embedding(ROWS, 8)
        self.hidden, self.out = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.user(ids[:, 0]), self.item(ids[:, 1])], 1)
        return self.out(torch.relu(self.hidden(h) + bias.mean(1, keepdim=True)))


def test_columns_of_one_input_are_checked_each_against_its_own_table(tmp_path):
    # ids[:, 0] into a 20-row table: an id of 25 was INTERNAL ("inference failed: ...
    # idx=25 must be within the inclusive range [-20,19]"), and later refused only when the
    # engine met it (its batch-mates' work lost); -1 silently read the table's last row.
    torch.manual_seed(0)
    inn = runtime.convert(Columns().eval(), (torch.randint(0, 20, (2, 2)), torch.randn(2, 16)))
    config = {**CONFIG, "inputs": [{"name": "ids", "dtype": "int64", "shape": [2]},
                                   CONFIG["inputs"][1]]}  # fmt: skip
    add_model(tmp_path, "cols", inn, config)
    report = build_model(Repository(tmp_path), "cols", backend="onnxruntime", progress=False,
                         repeats=3)  # fmt: skip
    assert not any("do not index" in w for w in report.warnings), report.warnings
    record = json.loads((tmp_path / "cols" / "tiers" / "w050" / "tier.json").read_text())
    assert record["input_rows"] == {"ids": [20, ROWS]}
    server = ServerThread({"repository": str(tmp_path)}).start()
    client = tc.InferenceServerClient(server.address)
    try:
        inputs = [tc.InferInput("ids", [1, 2], "INT64"), tc.InferInput("bias", [1, 16], "FP32")]
        inputs[1].set_data_from_numpy(np.zeros((1, 16), np.float32))
        inputs[0].set_data_from_numpy(np.array([[19, ROWS - 1]], np.int64))
        assert client.infer("cols", inputs).as_numpy("scores").shape == (1, 4)
        for ids, message in (
            ([25, 3], "id 25 at [0, 0] (column 0) is outside [0, 20)"),  # past the user table
            ([3, -1], "id -1 at [0, 1] (column 1) is outside [0, 50)"),  # read the last row
        ):
            inputs[0].set_data_from_numpy(np.array([ids], np.int64))
            with pytest.raises(InferenceServerException) as err:
                client.infer("cols", inputs)
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert f"input 'ids': {message}" in err.value.message()
        sample = server.server.metrics.registry.get_sample_value
        assert sample("innfer_requests_total", {"model": "cols", "tier": "", "outcome": "invalid"})
    finally:
        client.close()
        server.stop()


class Shifted(torch.nn.Module):
    """Three id columns: 0 into its own table, 1 shifted first, 2 used as a feature."""

    def __init__(self) -> None:
        super().__init__()
        self.user, self.item = torch.nn.Embedding(20, 8), torch.nn.Embedding(ROWS, 8)
        self.out = torch.nn.Linear(17, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.user(ids[:, 0]), self.item(ids[:, 1] + 1)], 1)
        return self.out(torch.cat([h, ids[:, 2:].float()], 1))


def test_ids_read_through_other_ops_are_warned_at_build_and_refused_when_past_a_table(
    tmp_path,
):
    torch.manual_seed(0)
    inn = runtime.convert(Shifted().eval(), (torch.randint(0, 19, (2, 3)),))
    config = {**CONFIG, "inputs": [{"name": "ids", "dtype": "int64", "shape": [3]}]}
    add_model(tmp_path, "shift", inn, config)
    report = build_model(Repository(tmp_path), "shift", backend="onnxruntime", progress=False,
                         repeats=3)  # fmt: skip
    assert any("integer input(s) ids (columns 1, 2) of shift do not index" in w
               for w in report.warnings), report.warnings  # fmt: skip
    record = json.loads((tmp_path / "shift" / "tiers" / "w100" / "tier.json").read_text())
    assert record["input_rows"] == {"ids": [20, None, None]}
    server = ServerThread({"repository": str(tmp_path)}).start()
    client = tc.InferenceServerClient(server.address)
    try:
        inputs = [tc.InferInput("ids", [1, 3], "INT64")]
        inputs[0].set_data_from_numpy(np.array([[19, ROWS - 2, -7]], np.int64))  # a feature
        assert client.infer("shift", inputs).as_numpy("scores").shape == (1, 4)
        inputs[0].set_data_from_numpy(np.array([[3, ROWS, 0]], np.int64))  # 50 + 1: past it
        with pytest.raises(InferenceServerException) as err:
            client.infer("shift", inputs)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "a value of the request indexes past a table the model reads" in str(err.value)
    finally:
        client.close()
        server.stop()


def test_merged_bounds_and_records_of_columns():
    from runtime.repository.records import merge_rows, rows_problem

    assert merge_rows([20, None], [10, 30]) == [10, 30]
    assert merge_rows(15, [20, None]) == [15, 15]  # an int bounds every column
    assert rows_problem({"ids": [20, 0]}) is not None  # no table has 0 rows
    assert rows_problem({"ids": []}) is not None
    assert rows_problem({"ids": True}) is not None


def test_input_errors_list_the_inputs_in_the_models_order():
    # "missing input 'feats'; expected inputs ['feats', 'ids']": sorted, not the model's
    # order (ids, feats) that forward() and model.yaml give (review helper-109).
    from server.codec import decode_inputs
    from server.errors import InvalidArgument
    from server.proto_gen import grpc_service_pb2 as pb

    specs = ModelConfig.from_dict(CONFIG).inputs  # ids, then bias
    req = pb.ModelInferRequest(model_name="rec")
    req.inputs.add(name="ids", datatype="INT64", shape=[1, 5]).contents.int64_contents.extend(
        [0] * 5
    )
    with pytest.raises(InvalidArgument, match=r"missing input 'bias'; expected inputs "
                       r"\['ids', 'bias'\]"):  # fmt: skip
        decode_inputs(req, specs, max_batch=4)
