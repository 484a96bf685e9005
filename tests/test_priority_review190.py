"""Triton's priority levels (review 190): without priority_levels every level a request
gives outranks one that gives none, as before; with them, as Triton, a request without a
priority takes default_priority_level, so a client can rank below the default, and
ModelConfig reports both."""

from __future__ import annotations

import pytest
import tritonclient.grpc as tc
from serverutil import ServerThread, add_onnx_model, tiny_cnn

from runtime.repository.config import ConfigError, ModelConfig
from server.parameters import priority_level as _priority
from server.proto_gen import grpc_service_pb2 as pb

IO = {
    "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
    "tiers": [{"name": "w100", "width": 1.0}],
    "max_batch": 4,
}


def _params(level=None):
    req = pb.ModelInferRequest()
    if level is not None:
        req.parameters["priority"].int64_param = level
    return req.parameters


def _urgency(level=None, levels=0, default=0) -> int:
    return _priority(_params(level), levels, default)


def test_without_levels_every_given_level_outranks_none():
    assert _urgency(1) > _urgency(1000) > _urgency() == _urgency(0) == 0
    assert _urgency(10**6) == 0  # past the lowest level: the default


def test_with_levels_a_request_may_rank_below_the_default():
    levels, default = 10, 5
    order = [_urgency(p, levels, default) for p in (1, 4, 5, 0, 6, 10)]
    assert order == sorted(order, reverse=True) and order[2] == order[3]  # 0 is level 5
    assert _urgency(0, levels, default) > _urgency(10, levels, default)  # background work
    assert _urgency(11, levels, default) == _urgency(0, levels, default)  # past the levels
    assert _urgency(None, levels, 0) == _urgency(levels, levels, 0)  # default: the last
    # One scale for every model: no priority is 0 with or without levels (review 193) - a
    # level before the default is what it is without levels, and one after it ranks below
    # the default. (A shared device no longer compares levels across models: helper-306.)
    assert _urgency(0, levels, default) == _urgency(None, levels, default) == _urgency() == 0
    assert _urgency(3, levels, default) == _urgency(3) and _urgency(6, levels, default) < 0


def test_a_default_level_past_the_levels_is_refused():
    with pytest.raises(ConfigError, match="default_priority_level: got 6, expected a level"):
        ModelConfig.from_dict(
            {**IO, "priority_levels": 5, "default_priority_level": 6}, source="model.yaml"
        )


def test_model_config_reports_the_levels(tmp_path):
    add_onnx_model(tmp_path, "levels", tiny_cnn, {**IO, "priority_levels": 10,
                                                   "default_priority_level": 5})  # fmt: skip
    add_onnx_model(tmp_path, "plain", tiny_cnn, IO)
    srv = ServerThread({"repository": str(tmp_path)}).start()
    try:
        client = tc.InferenceServerClient(srv.address)
        batching = client.get_model_config("levels").config.dynamic_batching
        assert (batching.priority_levels, batching.default_priority_level) == (10, 5)
        plain = client.get_model_config("plain").config.dynamic_batching
        assert (plain.priority_levels, plain.default_priority_level) == (0, 0)
        client.close()
    finally:
        srv.stop()


def test_a_default_budget_within_the_servers_margin_is_said_at_load(tmp_path, caplog):
    """Every request without a budget was refused, unsaid (review 190)."""
    import logging

    add_onnx_model(tmp_path, "tight", tiny_cnn, {**IO, "default_latency_budget_ms": 0.5})
    with caplog.at_level(logging.WARNING, logger="innfer"):
        srv = ServerThread({"repository": str(tmp_path)}).start()
        srv.stop()
    said = [r.getMessage() for r in caplog.records if "budget_margin_ms" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "model tight: default_latency_budget_ms 0.5 is within the server's budget_margin_ms 1"
    )


@pytest.mark.parametrize(
    "default_ms, how, said",
    [
        (1000, {"parameters": {"latency_budget_ms": 4}}, None),
        (1000, {"timeout": 4000}, "the budget was Triton's timeout parameter"),
        (1000, {"client_timeout": 0.006}, "the budget was what the call's gRPC deadline"),
        (4, {}, "the budget was the model's default_latency_budget_ms"),
    ],
)
def test_a_refusal_says_where_the_budget_came_from(tmp_path, default_ms, how, said):
    """ "send a larger latency_budget_ms" misled a client whose budget was its timeout, its
    deadline or the model's default (review 190): each says what raises it. One tier of
    tens of ms, so that every budget of a few ms is refused at once on any machine."""
    import numpy as np
    from serverutil import slow_loop
    from tritonclient.utils import InferenceServerException

    io = {**IO, "inputs": [{"name": "input", "dtype": "float32", "shape": [512]}],
          "max_batch": 1, "default_latency_budget_ms": default_ms}  # fmt: skip
    add_onnx_model(tmp_path, "m", lambda w: slow_loop(w, trips=2000, dim=512), io, warmup=1,
                   repeats=2)  # fmt: skip
    srv = ServerThread({"repository": str(tmp_path), "profile_at_load": False}).start()
    try:
        client = tc.InferenceServerClient(srv.address)
        x = tc.InferInput("input", [1, 512], "FP32")
        x.set_data_from_numpy(np.zeros((1, 512), np.float32))
        with pytest.raises(InferenceServerException) as err:
            client.infer("m", [x], **how)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "is below the fastest allowed tier's latency" in err.value.message()
        if said is None:
            assert "the budget was" not in err.value.message()
        else:
            assert said in err.value.message(), err.value.message()
        # a cap cuts any latency_budget_ms: not advised where one cut it (review helper-258)
        advised = "send a larger latency_budget_ms" in err.value.message()
        assert advised is (said is None or "default" in said), err.value.message()
        client.close()
    finally:
        srv.stop()


def test_the_scheduler_evicts_only_for_a_higher_priority_and_hands_the_evicted_back():
    """Scripted clock: the slot busy, two default requests fill max_queue 2."""
    from server.scheduling import Refused, Request, Scheduler, State, TierInfo, make_policy

    tiers = [TierInfo("w100", 0.99, {1: 5.0, 2: 9.0})]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=2, max_queue=2)
    s.submit(Request(0, 0.0, 10.0), 0.0)
    assert s.next(0.0) is not None  # running
    s.submit(Request(1, 0.0, 10.0), 0.0)
    s.submit(Request(2, 0.0, 11.0), 0.0)
    with pytest.raises(Refused) as err:
        s.submit(Request(3, 0.0, 5.0), 0.0)  # more urgent by deadline, not by priority
    assert err.value.state == State.REFUSED_FULL
    s.submit(Request(4, 0.0, 10.0, priority=1), 0.0)
    assert [r.id for r in s.queue] == [4, 1]
    out = s.expire(0.0)
    assert [(r.id, r.state) for r in out] == [(2, State.REFUSED_FULL)]
    assert s.expire(0.0) == []  # handed back once
    with pytest.raises(Refused):  # the lowest queued is now of priority 0 again: 1 can't
        s.submit(Request(5, 0.0, 10.0), 0.0)


def test_a_streams_budget_source_is_said_as_the_streams():
    """On a stream the deadline is the whole stream's, only a cap: "no deadline was sent"
    and "raise the deadline (client_timeout)" misled (review 193)."""
    from server.parameters import BUDGET_SOURCES
    from server.parameters import budget as _budget

    params = _params()
    assert _budget(params, 0.003, 500.0, deadline_is_budget=False)[1] == "stream deadline"
    assert _budget(params, 600.0, 4.0, deadline_is_budget=False)[1] == "stream default"
    assert _budget(params, 0.003, 500.0)[1] == "deadline"  # a unary call's own deadline
    assert "stream_timeout" in BUDGET_SOURCES["stream deadline"]
    assert "only caps it" in BUDGET_SOURCES["stream default"]


def test_a_deadline_and_a_timeout_both_below_the_budget_are_both_named():
    """Naming only the lower of the two sent the client back a second time: raised, the
    deadline gave way to the timeout's cap."""
    from server.parameters import BUDGET_SOURCES
    from server.parameters import budget as _budget

    params = _params()
    params["latency_budget_ms"].double_param = 500.0
    params["timeout"].int64_param = 20_000  # 20 ms
    assert _budget(params, 0.010, 100.0) == (0.010, "deadline and timeout")
    # the timeout lower, the deadline below the budget too: both named (review 201)
    assert _budget(params, 0.030, 100.0) == (0.020, "deadline and timeout")
    assert _budget(params, 0.600, 100.0) == (0.020, "timeout")  # the deadline is above it
    assert _budget(params, 0.010, 100.0, deadline_is_budget=False)[1] == (
        "stream deadline and timeout"
    )
    assert "raise both" in BUDGET_SOURCES["deadline and timeout"]
    assert "stream_timeout" in BUDGET_SOURCES["stream deadline and timeout"]
