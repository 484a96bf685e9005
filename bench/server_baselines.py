"""Baseline gRPC servers for bench/server.py, run as separate processes:

echo     the transport floor: ModelInfer answers at once with an empty response
minimal  a minimal unbatched OIP servicer: decode raw input, run the full tier's ONNX
         Runtime engine, encode the output - no queue, no batching, no metrics

  python bench/server_baselines.py echo|minimal PORT REPO MODEL
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.repository import Repository
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as rpc


class Echo(rpc.GRPCInferenceServiceServicer):
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request, context):
        return pb.ModelInferResponse(model_name=request.model_name)


class Minimal(Echo):
    def __init__(self, repo: str, model: str) -> None:
        served = Repository(repo).load(model)
        self.engine = served.engines[served.config.tiers[0].name]
        self.shape = served.config.inputs[0].shape
        self.input = served.config.inputs[0].name

    async def ModelInfer(self, request, context):
        t = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(t.shape))
        y = self.engine.run({self.input: x})["logits"]
        resp = pb.ModelInferResponse(model_name=request.model_name)
        out = resp.outputs.add(name="logits", datatype="FP32", shape=list(y.shape))
        del out
        resp.raw_output_contents.append(y.tobytes())
        return resp


async def serve(kind: str, port: int, repo: str, model: str) -> None:
    # SO_REUSEPORT off, as innfer's own server has it: on, a second server bound the same
    # port beside another's, both "ready", and the load went to either (review helper-305)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = Echo() if kind == "echo" else Minimal(repo, model)
    rpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("echo", "minimal"))
    p.add_argument("port", type=int)
    p.add_argument("repo", help="model repository (minimal only; echo ignores it)")
    p.add_argument("model", help="model name in it (minimal only)")
    args = p.parse_args(argv)
    asyncio.run(serve(args.kind, args.port, args.repo, args.model))


if __name__ == "__main__":
    main()
