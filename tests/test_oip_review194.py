"""OIP edges found by fuzzing the live server (review 194): a named repository is refused
as Triton refuses it, not ignored; and a text input's string count is said in the right
number."""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as tc
from serverutil import ServerThread, build_repository

from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as pbg


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """'tiny' loaded at start-up; 'wide' in the repository, not loaded (explicit control)."""
    root = build_repository(tmp_path_factory.mktemp("repository"))
    srv = ServerThread(
        {"repository": str(root), "model_control": "explicit", "models": ["tiny"]}
    ).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "rpc, request_",
    [
        ("RepositoryIndex", pb.RepositoryIndexRequest(repository_name="other")),
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(
            repository_name="other", model_name="wide")),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(
            repository_name="other", model_name="tiny")),
    ],
)  # fmt: skip
def test_a_named_repository_is_refused_not_ignored(served, rpc, request_):
    """Triton answers UNSUPPORTED (gRPC UNIMPLEMENTED); innfer answered OK about its own
    repository - and loaded or unloaded its model."""
    with grpc.insecure_channel(served.address) as channel, pytest.raises(grpc.RpcError) as err:
        getattr(pbg.GRPCInferenceServiceStub(channel), rpc)(request_, timeout=10)
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "repository_name 'other' is not supported" in err.value.details()
    client = tc.InferenceServerClient(served.address)
    try:  # nothing changed: tiny still served, wide still not loaded
        assert client.is_model_ready("tiny") and not client.is_model_ready("wide")
        assert {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]} \
            >= {"tiny", "wide"}  # fmt: skip
    finally:
        client.close()
