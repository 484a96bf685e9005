"""An OIP edge found by fuzzing the live server (review 194): a named repository is refused
as Triton refuses it, not ignored. Through the shared explicit-control server
(tests/conftest.py)."""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as tc

from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as pbg


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
def test_a_named_repository_is_refused_not_ignored(server, rpc, request_):
    """Triton answers UNSUPPORTED (gRPC UNIMPLEMENTED); innfer answered OK about its own
    repository - and loaded or unloaded its model."""
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as err:
        getattr(pbg.GRPCInferenceServiceStub(channel), rpc)(request_, timeout=10)
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "repository_name 'other' is not supported" in err.value.details()
    client = tc.InferenceServerClient(server.address)
    try:  # nothing changed: both models still served
        assert client.is_model_ready("tiny") and client.is_model_ready("wide")
        assert {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]} \
            >= {"tiny", "wide"}  # fmt: skip
    finally:
        client.close()
