"""Triton behaviours tritonclient users rely on (review helper-127), against a real server:
unloading a model that is not loaded succeeds, every stream response says it is the
request's last, integer scores classify as integers, a client's load of an unchanged model
keeps its statistics, and versions and priorities are read as Triton reads them. Each test
fails without its fix."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from server.codec import top_classes


def _input(batch: int = 1) -> tc.InferInput:
    x = np.random.default_rng(0).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    i = tc.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def test_unloading_a_model_that_is_not_loaded_succeeds(client):
    client.unload_model("wide")
    client.unload_model("wide")  # NOT_FOUND before: Triton's own lifecycle tests do this
    client.unload_model("no_such_model")
    client.load_model("wide")
    assert client.is_model_ready("wide")


def test_every_stream_response_is_marked_final(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("tiny", [_input()], request_id="ok")
        client.async_stream_infer("tiny", [_input()], request_id="bad", model_version="7")
        got = [answers.get(timeout=10) for _ in range(2)]
    finally:
        client.stop_stream()
    result = next(r for r, e in got if e is None)
    params = result.get_response().parameters
    assert params["triton_final_response"].bool_param is True
    assert sum(e is not None for _, e in got) == 1  # the bad version: an error answer


def test_integer_scores_classify_as_integers():
    assert top_classes(np.array([[3, -2, 0, 1]], np.int64), 2).tolist() == [["3:0", "1:3"]]
    assert top_classes(np.array([[0.5, 0.25]], np.float32), 1).tolist() == [["0.500000:0"]]


def test_loading_an_unchanged_model_keeps_its_statistics(client):
    for _ in range(3):
        client.infer("tiny", [_input()])
    before = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    client.load_model("tiny")  # "make sure it is loaded": nothing of it changed
    after = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before["inference_count"]) >= 3


def test_versions_and_priorities_are_read_as_triton_reads_them(client):
    assert client.infer("tiny", [_input()], model_version="01").as_numpy("logits").shape[0] == 1
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [_input()], model_version="abc")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [_input()], model_version="2")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:  # as Triton (review 186): not False
        client.is_model_ready("tiny", "abc")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    # past the lowest level: the default level, as Triton takes it (INVALID_ARGUMENT before)
    assert client.infer("tiny", [_input()], priority=2**40).as_numpy("logits") is not None


def test_a_stream_error_answer_is_marked_final_too(server):
    # Only the successful answer's flag was tested: dropping it from the error answer still
    # passed (review helper-134). Read off the wire: tritonclient hands errors over without
    # their parameters.
    import grpc

    from server.proto_gen import grpc_service_pb2 as pb
    from server.proto_gen import grpc_service_pb2_grpc as pbg

    bad = pb.ModelInferRequest(model_name="tiny", model_version="7", id="bad")
    with grpc.insecure_channel(server.address) as channel:
        answers = list(pbg.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([bad])))
    assert len(answers) == 1 and answers[0].error_message
    assert answers[0].infer_response.parameters["triton_final_response"].bool_param is True


def test_version_strings_are_ascii_digits_only(client):
    # int() read other scripts' digits, a sign and whitespace as version 1 (review
    # helper-144); Triton refuses them. Past 18 digits int() itself would raise.
    for odd in ("\u0661", "\uff11", "+1", " 1", "1\n", "9" * 5000):
        with pytest.raises(InferenceServerException) as e:
            client.infer("tiny", [_input()], model_version=odd)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", odd
        assert "not a version number" in e.value.message()
