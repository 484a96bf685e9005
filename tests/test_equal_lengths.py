"""A sequence model without a text mask is never padded across requests (review
helper-122): the zeros padded onto a shorter request were data to it, and a request's
answer changed with the requests it was batched with (max difference 0.18-0.88 on a
mean-over-time model). Its batches run as runs of equal length (server/equal_lengths.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from serverutil import add_onnx_model

from runtime.repository import Repository
from server.equal_lengths import equal_length_runs
from server.metrics import Metrics
from server.model_runtime import ModelRuntime

LENGTHS = (2, 3, 5, 3, 8, 5)


def _seq_mean(width):
    """(B, T, 4) -> mean over T -> Gemm -> (B, 10): a zero padding changes the mean."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "w"
    )
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["m", "w"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "seq",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), {}, 80, 40


def test_requests_of_other_lengths_share_no_padded_batch(tmp_path):
    add_onnx_model(tmp_path, "seq", _seq_mean, {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 4]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 8, "lengths": [8],
    })  # fmt: skip
    served = Repository(tmp_path).load("seq")
    engine = served.engines["w100"]
    run, gate, entered, shapes = engine.run, threading.Event(), threading.Event(), []

    def gated(feeds):  # the first batch holds the engine until the others have queued
        shapes.append(feeds["input"].shape)
        entered.set()
        gate.wait(10)
        return run(feeds)

    learned = []  # (rows, calls) the lane's scheduler was told per batch
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, n, 4)).astype(np.float32) for n in LENGTHS]
    alone = [run({"input": x})["logits"][0] for x in xs]

    async def go():
        rt = ModelRuntime(served, Metrics())
        rt.start()
        engine.run = gated
        lane = rt.lanes[8]
        complete = lane.complete
        lane.complete = lambda d, now, compute, **kw: (
            learned.append((d.rows, kw.get("calls"))),
            complete(d, now, compute, **kw),
        )[1]
        try:
            first = asyncio.ensure_future(rt.infer({"input": xs[0]}, 1, 10.0))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            rest = [asyncio.ensure_future(rt.infer({"input": x}, 1, 10.0)) for x in xs[1:]]
            await asyncio.sleep(0.05)  # all queued behind the held batch
            gate.set()
            return await asyncio.gather(first, *rest)
        finally:
            await rt.stop()

    results = asyncio.run(go())
    assert max(r.batch_size for r in results) > 1  # the queued ones did share a batch
    for r, want in zip(results, alone, strict=True):
        np.testing.assert_allclose(r.outputs["logits"][0], want, atol=1e-6)
    assert all(s[1] in LENGTHS for s in shapes)  # each call one length, none padded
    assert len(shapes) == 4  # the first alone, then a batch per length: 3, 5 and 8 tokens
    # Each batch is the one call it was planned as (review helper-134: one batch of the five
    # queued ran as three calls planned as one - 7 of 8 requests of 8 lengths answered at
    # ~70 ms for a 40 ms budget, every time).
    assert sorted(learned, key=str) == [(1, None), (1, None), (2, None), (2, None)]


def test_runs_group_equal_lengths_and_keep_the_batch_order():
    parts = [{"x": np.full((r, n), float(i))} for i, (r, n) in enumerate([(1, 2), (2, 3), (1, 2)])]
    assert equal_length_runs(parts[:1] + parts[2:], {"x": (0,)}) is None  # one length: whole
    runs = equal_length_runs(parts, {"x": (0,)})
    assert [i for i, _ in runs.runs] == [[0, 2], [1]]
    assert runs.runs[0][1]["x"].tolist() == [[0.0, 0.0], [2.0, 2.0]]

    class Sum:
        def run(self, feeds):
            return {"y": feeds["x"].sum(axis=1)}

    assert runs.run(Sum())["y"].tolist() == [0.0, 3.0, 3.0, 4.0]  # rows back in order


def test_a_failed_run_is_retried_request_by_request_from_each_requests_own_inputs():
    from server.apart import run_apart

    class NoFives:  # fails any call holding a 5-step sequence
        def run(self, feeds):
            if feeds["x"].shape[1] == 5:
                raise ValueError("no fives")
            return {"y": feeds["x"].sum(axis=1)}

    parts = [{"x": np.ones((1, n))} for n in (3, 5, 3)]
    runs = equal_length_runs(parts, {"x": (0,)})
    try:
        runs.run(NoFives())
    except ValueError as exc:
        apart = run_apart(NoFives(), runs.parts, [1, 1, 1], exc)
    assert [e is None for e in apart.errors] == [True, False, True]
    assert [o["y"].tolist() if o else None for o in apart.outputs] == [[3.0], None, [3.0]]


def test_a_batch_run_as_several_calls_is_learned_call_by_call():
    # 8 one-row calls of 1 ms each, learned as one 8-row call of 8 ms: the tier's correction
    # made its 1-row estimate 4 ms, and a 2.5 ms request was refused on a 1 ms tier
    # (review helper-131).
    from server.scheduling import Request, Scheduler, TierInfo, make_policy

    tiers = [TierInfo("t", 0.9, {1: 1.0, 8: 2.0})]

    def learned(calls) -> float:
        s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=64)
        now = 0.0
        for _ in range(30):
            for k in range(8):
                s.submit(Request(k, now, now + 1.0), now)
            d = s.next(now)
            now += 0.008
            s.complete(d, now, 0.008, calls=calls(d))
        return s.latency.median("t", 1)

    whole = learned(lambda d: None)
    per_call = learned(lambda d: [(1, 0.001)] * d.rows)
    assert whole > 0.003 and per_call < 0.0012


def _grouped_queue(pinned_front: int):
    from server.scheduling import Request, Scheduler, TierInfo, make_policy

    tiers = [TierInfo("a", 0.99, {1: 2.0, 8: 4.0}), TierInfo("b", 0.9, {1: 1.0, 8: 2.0})]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=256)
    rid = 0
    for _ in range(pinned_front):  # requests pinned elsewhere fill the front of the queue
        s.submit(Request(rid, 0.0, 0.5 + 1e-6 * rid, pin="a", group=(5,)), 0.0)
        rid += 1
    for k in range(12):  # then lengths 3 and 7 alternating, unpinned
        s.submit(Request(rid, 0.0, 0.6 + 1e-6 * rid, group=(3 + 4 * (k % 2),)), 0.0)
        rid += 1
    return s


@pytest.mark.parametrize("pinned_front", [0, 40])
def test_the_scheduler_batches_only_requests_of_one_group(pinned_front):
    # A batch of a mask-less sequence model's requests of several lengths ran as one call per
    # length, planned as one call (review helper-134). Its lengths are each request's group,
    # and no batch takes two groups - through the planner, and where pinned requests fill
    # the front of the queue past its first scan (the numpy path), and through a fixed tier.
    from server.scheduling import Context

    s = _grouped_queue(pinned_front)
    seen = []
    while (d := s.next(0.0)) is not None:
        assert len({r.group for r in d.requests}) == 1, [r.group for r in d.requests]
        seen.append((d.tier, d.requests[0].group, len(d.requests)))
        s.complete(d, 0.001, 0.001)
    assert {g for _, g, _ in seen} >= {(3,), (7,)}
    assert max(n for _, g, n in seen if g != (5,)) > 1  # equal lengths still share batches
    ctx: Context = s.ctx
    queue = _grouped_queue(pinned_front).queue
    taken = ctx.take(queue, "b", 8)
    assert len({r.group for r in taken}) == 1 and len(taken) == 6


def _masked_mean(width):
    """ids (B, T), mask (B, T) -> the mean of the masked tokens' embeddings (B, 4): the
    padding a mask covers changes nothing."""
    emb = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32), "emb"
    )
    ax = numpy_helper.from_array(np.array([2], np.int64), "ax")
    ax1 = numpy_helper.from_array(np.array([1], np.int64), "ax1")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),  # (B, T, 4)
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]),  # (B, T, 1)
        helper.make_node("Mul", ["e", "m3"], ["em"]),
        helper.make_node("ReduceSum", ["em", "ax1"], ["s"], keepdims=0),  # (B, 4)
        helper.make_node("ReduceSum", ["m3", "ax1"], ["n"], keepdims=0),  # (B, 1)
        helper.make_node("Div", ["s", "n"], ["logits"]),
    ]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 4])
    graph = helper.make_graph(nodes, "masked", [ids, mask], [out], [emb, ax, ax1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), {}, 10, 200


def _add_ids_model(root) -> None:
    """Model "ids" in ``root``: ``_masked_mean`` on ONNX Runtime, its mask named
    (mask_input), one lane of 8 tokens."""
    add_onnx_model(root, "ids", _masked_mean, {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1]},
                   {"name": "attention_mask", "dtype": "int64", "shape": [-1]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [4]}],
        "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 8, "lengths": [8],
        "mask_input": "attention_mask",
    })  # fmt: skip


def test_a_model_that_names_its_mask_shares_padded_batches_across_lengths(tmp_path):
    # Clients that tokenize themselves send ids and a mask; without a text: section such a
    # model was treated as mask-less, one call per length (review helper-134). mask_input
    # names the mask: its requests of any length share one padded batch.
    _add_ids_model(tmp_path)
    served = Repository(tmp_path).load("ids")
    engine = served.engines["w100"]
    run, gate, entered, shapes = engine.run, threading.Event(), threading.Event(), []

    def gated(feeds):
        shapes.append(feeds["input_ids"].shape)
        entered.set()
        gate.wait(10)
        return run(feeds)

    rng = np.random.default_rng(1)
    reqs = [{"input_ids": rng.integers(1, 50, (1, n)), "attention_mask": np.ones((1, n), np.int64)}
            for n in (2, 3, 5, 8, 4)]  # fmt: skip
    alone = [run(r)["logits"][0] for r in reqs]

    async def go():
        rt = ModelRuntime(served, Metrics())
        rt.start()
        engine.run = gated
        try:
            first = asyncio.ensure_future(rt.infer(reqs[0], 1, 10.0))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            rest = [asyncio.ensure_future(rt.infer(r, 1, 10.0)) for r in reqs[1:]]
            await asyncio.sleep(0.05)
            gate.set()
            return await asyncio.gather(first, *rest)
        finally:
            await rt.stop()

    results = asyncio.run(go())
    assert len(shapes) == 2 and shapes[1] == (4, 8)  # the four queued: one batch, padded
    for r, want in zip(results, alone, strict=True):
        np.testing.assert_allclose(r.outputs["logits"][0], want, atol=1e-5)


@pytest.mark.parametrize(
    ("mask", "why"), [("nope", "int64/int32/bool input with a -1"), ("x", "int64/int32/bool")]
)
def test_mask_input_must_name_an_integer_sequence_input(mask, why):
    from runtime.repository.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match=why):
        ModelConfig.from_dict({
            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "shape": [2]}], "lengths": [8],
            "tiers": [{"name": "w100", "width": 1.0}], "mask_input": mask,
        })  # fmt: skip


def test_admission_plans_each_group_ahead_as_its_own_batch():
    # Admission counted requests of 8 lengths as one batch: all 8 admitted, 3 expired in the
    # queue after waiting most of their budget (review helper-140). Each group ahead is a
    # batch of its own: those that cannot be served are refused at once.
    from server.scheduling import Refused, Request, Scheduler, TierInfo, make_policy

    one = [TierInfo("w", 1.0, {1: 8.0, 8: 8.0})]

    def run(groups) -> tuple[int, int, int]:
        s = Scheduler(one, make_policy("innfer", one), max_batch=8, max_queue=64)
        admitted = expired = 0
        for k, g in enumerate(groups):
            with contextlib.suppress(Refused):
                s.submit(Request(k, 0.0, 0.040, group=g), 0.0)
                admitted += 1
        t, served = 0.0, 0
        while s.queue:
            expired += len(s.expire(t))
            d = s.next(t)
            if d is None:
                t += 0.001
                continue
            t += 0.008
            s.complete(d, t, 0.008)
            served += sum(t <= r.deadline for r in d.requests)
        return admitted, served, expired

    assert run([None] * 8) == (8, 8, 0)  # one group: one batch
    assert run([(7,)] * 8) == (8, 8, 0)  # one length: the same
    admitted, served, expired = run(list(range(8)))
    assert expired == 0 and served == admitted == 5  # 5 batches of 8 ms fit 40 ms


def _ids_request(ids: np.ndarray, mask: np.ndarray):
    from server.proto_gen import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="ids")
    for name, a in (("input_ids", ids), ("attention_mask", mask)):
        req.inputs.add(name=name, datatype="INT64", shape=list(a.shape))
        req.raw_input_contents.append(a.astype(np.int64).tobytes())
    return req


def test_a_mask_input_models_padded_requests_run_at_their_length_and_masks_are_checked(tmp_path):
    # Client-padded requests ran (and were planned) at their padded width, or were refused
    # past the longest lane; masks of 2s, left-padded or all zeros were served, embedded
    # wrongly (review helper-142). As a text model's: the padding cut, the mask checked.
    import dataclasses

    from server.config import ServerConfig
    from server.dataplane import DataPlane
    from server.errors import InvalidArgument

    _add_ids_model(tmp_path)
    cfg = ServerConfig.from_dict(
        {"repository": str(tmp_path), "models": ["ids"], "profile_at_load": False}
    )
    ids = np.array([[5, 6, 7]])
    padded = np.zeros((1, 40), np.int64)  # past the longest lane (8), as a tokenizer pads
    padded[0, :3] = ids
    pmask = (padded > 0).astype(np.int64)
    bad = [np.array([[1, 2, 1]]), np.array([[0, 1, 1]]), np.array([[0, 0, 0]])]

    async def go():
        plane = DataPlane(dataclasses.replace(cfg), Metrics())
        await plane.load_all()
        engine = plane.models["ids"].served.engines["w100"]
        run, shapes = engine.run, []
        engine.run = lambda feeds: shapes.append(feeds["input_ids"].shape) or run(feeds)
        try:
            alone = await plane.infer(_ids_request(ids, np.ones_like(ids)), None)
            wide = await plane.infer(_ids_request(padded, pmask), None)
            refused = []
            for mask in bad:
                try:
                    await plane.infer(_ids_request(ids, mask), None)
                except InvalidArgument as exc:
                    refused.append(str(exc))
            return alone, wide, shapes, refused
        finally:
            await plane.stop_models()

    alone, wide, shapes, refused = asyncio.run(go())
    assert alone.raw_output_contents[0] == wide.raw_output_contents[0]
    assert shapes == [(1, 3), (1, 3)]  # the padding cut before the engine
    assert len(refused) == 3 and "value 2" in refused[0] and "left-padded" in refused[1]


def test_a_mask_input_is_no_unchecked_id_input_at_build():
    # The build warned that the mask indexes no embedding table (review helper-142).
    from runtime.build.pipeline import _unchecked_ids
    from runtime.repository.config import ModelConfig

    spec = {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1]},
                   {"name": "attention_mask", "dtype": "int64", "shape": [-1]}],
        "outputs": [{"name": "y", "shape": [4]}], "lengths": [8],
        "tiers": [{"name": "w100", "width": 1.0}],
    }  # fmt: skip
    rows = {"input_ids": 50}
    assert _unchecked_ids(ModelConfig.from_dict(spec), rows) == ["attention_mask"]
    spec["mask_input"] = "attention_mask"
    assert _unchecked_ids(ModelConfig.from_dict(spec), rows) == []


def test_the_planner_counts_each_group_of_the_rest_as_its_own_batch():
    # Eight requests of eight lengths, due at 22 ms; w100 takes 10 ms a batch, w025 2 ms.
    # The head on w100 leaves 12 ms, enough for the rest as one batch (2 ms) but not as the
    # seven batches they are (14 ms): the planner counted them as one, ran w100 and the last
    # two missed. Each group is its own batch in the plan now: every batch runs on w025.
    from server.scheduling import Request, Scheduler, TierInfo, make_policy

    tiers = [TierInfo("w100", 0.99, {1: 10.0, 8: 10.0}), TierInfo("w025", 0.9, {1: 2.0, 8: 2.0})]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=64)
    for k in range(8):
        s.submit(Request(k, 0.0, 0.022, group=(k + 3,)), 0.0)
    t, late = 0.0, 0
    while s.queue:
        d = s.next(t)
        assert d is not None and len(d.requests) == 1  # one length per batch
        took = 0.010 if d.tier == "w100" else 0.002
        t += took
        s.complete(d, t, took)
        late += sum(t > r.deadline for r in d.requests)
    assert late == 0


def test_a_mask_input_models_padding_may_hold_any_id(tmp_path):
    # A sentinel pad id (-100) under the mask's 0 was served where every row had one length
    # (the padding cut) and failed in the engine's Gather - the whole batch with it - where
    # a shorter row's padding fell inside the longest row's columns (review helper-242).
    from server.config import ServerConfig
    from server.dataplane import DataPlane

    _add_ids_model(tmp_path)
    cfg = ServerConfig.from_dict(
        {"repository": str(tmp_path), "models": ["ids"], "profile_at_load": False}
    )
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    zeros = np.array([[5, 6, 7, 8], [5, 6, 0, 0]])
    sentinel = np.where(mask == 1, zeros, -100)

    async def go():
        plane = DataPlane(cfg, Metrics())
        await plane.load_all()
        try:
            return [await plane.infer(_ids_request(i, mask), None) for i in (zeros, sentinel)]
        finally:
            await plane.stop_models()

    with_zeros, with_sentinel = asyncio.run(go())
    assert with_sentinel.raw_output_contents[0] == with_zeros.raw_output_contents[0]
