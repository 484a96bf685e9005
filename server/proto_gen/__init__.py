"""Python stubs generated from proto/ by proto/generate.py: do not edit, regenerate.

    from server.proto_gen import grpc_service_pb2 as pb, grpc_service_pb2_grpc as rpc
    from server.proto_gen import model_config_pb2, health_pb2, health_pb2_grpc

The messages live in the private descriptor pool POOL, not in protobuf's default pool,
so that they coexist with tritonclient's definitions of the same ``inference.*`` messages
in one process. Code that looks messages up by name must use POOL. (With protobuf's
pure-Python backend, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, message classes are
still registered in the default pool, so there the two cannot be imported together.)

Needs protobuf >= the "Protobuf Python Version" in the headers and grpcio >= the
GRPC_GENERATED_VERSION in the *_grpc.py files (both are checked at import).
"""

from google.protobuf import descriptor_pool as _descriptor_pool

POOL = _descriptor_pool.DescriptorPool()
