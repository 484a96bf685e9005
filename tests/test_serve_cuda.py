"""Serving on an NVIDIA GPU, end to end: the real tritonclient against innfer with the torch
backend on CUDA (engine threads replaying CUDA graphs), on 127.0.0.1.

Marked ``gpu``: skipped where CUDA is absent (every CI machine); run by
``bench/device_check.sh`` on a lent GPU.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from serverutil import ServerThread
from test_build import build_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]

REQUESTS = 64  # concurrent, mixed batch sizes and budgets


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    root, _ = build_tiny(tmp_path_factory.mktemp("repo"))
    server = ServerThread({"repository": str(root), "backend": "torch"}).start()
    yield root, server
    server.stop()


def _request(rows: int, seed: int):
    x = np.random.default_rng(seed).standard_normal((rows, 1, 8, 8)).astype(np.float32)
    i = tc.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return x, i


def test_served_on_cuda_with_graphs_matches_the_cpu_engine(gpu_server):
    from runtime.repository import Repository

    root, server = gpu_server
    served = server.server.plane.model("tiny").served
    assert {e.device for e in served.engines.values()} == {"cuda"}
    # The build profiled ONNX Runtime on the CPU; the server re-measured on this GPU.
    assert served.profile["backend"] == "torch" and "cpu" not in served.profile["device"]
    cpu = Repository(root).load("tiny")  # ONNX Runtime on the host CPU: the reference

    budgets = [5, 20, 100, 1000]

    async def run():
        client = tca.InferenceServerClient(server.address)
        try:
            sent = [_request(1 + k % 4, k) for k in range(REQUESTS)]
            calls = [
                client.infer("tiny", [i], parameters={"latency_budget_ms": budgets[k % 4]})
                for k, (_, i) in enumerate(sent)
            ]
            return sent, await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.close()

    sent, results = server.call(run())
    assert len(results) == REQUESTS  # each accepted request answered, once
    tiers = set()
    for k, ((x, _), r) in enumerate(zip(sent, results, strict=True)):
        if isinstance(r, Exception):
            # A tight budget may run out behind 63 others; never for the 1 s budgets.
            assert budgets[k % 4] < 1000 and "DEADLINE_EXCEEDED" in str(r), r
            continue
        tier = r.get_response().parameters["tier"].string_param
        tiers.add(tier)
        want = cpu.engines[tier].run({"input": x})["logits"]
        np.testing.assert_allclose(r.as_numpy("logits"), want, rtol=1e-3, atol=1e-3)
    captured = {t: served.engines[t].captured_batches for t in tiers}
    assert all(captured.values()), f"no CUDA graph captured on a serving tier: {captured}"
