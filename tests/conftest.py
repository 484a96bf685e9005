"""Shared fixtures; GPU tests skip cleanly where no GPU is present."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Property tests search afresh on every local run (a search found the planner's late
# fallback batch); in CI (.ci/run sets CI) they replay a fixed set of examples, so a run is
# red or green for the code, not for the draw. Failures found locally become @example.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _has_cuda() -> bool:
    """A CUDA device seen by torch or, in a torch-free serving image, by cuda-python."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return False
    err, count = cudart.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


def pytest_collection_modifyitems(config, items):
    # Checking for CUDA imports torch (seconds): only worth it when a GPU test was collected.
    if not any("gpu" in item.keywords for item in items) or _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none present here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory):
    """A repository with two small models, 'tiny' and 'wide', tiers w100 and w050, engines
    built and profiled on ONNX Runtime (see tests/serverutil.py). Written without torch
    (ONNX graphs from onnx.helper) in about a second; tests/test_build.py builds real INNs.
    """
    from serverutil import build_repository

    return build_repository(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="module")
def server(model_repository):
    """A real server on 127.0.0.1 over ``model_repository``, one per test module; load and
    unload are allowed (``model_control: explicit``, loopback only)."""
    from serverutil import ServerThread

    s = ServerThread({"repository": str(model_repository), "model_control": "explicit"}).start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    """A stock tritonclient gRPC client of ``server``."""
    import tritonclient.grpc as tc

    c = tc.InferenceServerClient(server.address)
    yield c
    c.close()


@pytest.fixture(scope="session")
def tiny_bert():
    """(model, inn): test_capture's hand-written BERT with mean pooling, and its conversion
    (torch.export, ~40 s here: done once). Tests must not change either (``inn.copy()``)."""
    import torch
    from test_capture import TinyBert
    from test_distill import _text

    import runtime
    from runtime.demo.minilm import SentenceEmbedder

    torch.manual_seed(0)
    model = SentenceEmbedder(TinyBert(vocab=50, d=32, dh=8, ffn=64)).eval()
    ids, mask = _text(2, 0)
    with torch.no_grad():
        inn = runtime.convert(model, (ids, mask))
    return model, inn


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """Put the root and ``innfer`` loggers back after each test: a command run in-process
    (``innfer serve``, ``demo``) sets their levels and handlers (``setup_logging``), and a
    later test's caplog would not see what an ``innfer`` logger left at ERROR dropped."""
    import logging

    root, ours = logging.getLogger(), logging.getLogger("innfer")
    before = (root.level, root.handlers[:], ours.level)
    yield
    root.setLevel(before[0])
    root.handlers[:] = before[1]
    ours.setLevel(before[2])
