"""KServe serving one ONNX model with ONNX Runtime: the KServe peer of bench/peers.py. Runs
inside the KServe virtual environment (kserve, onnxruntime); nothing from the project is
imported but ort_session.py beside it.

A plain custom predictor, as KServe's docs write one: a `kserve.Model` whose `load` opens an
ONNX Runtime session (1 intra-op thread) and whose synchronous `predict` runs each request
on its own (KServe has no batcher), served by `kserve.ModelServer` over its gRPC v2 (Open
Inference Protocol) endpoint; one worker process. KServe binds its gRPC server to [::] and
its REST server to 0.0.0.0 with no option to change either, so both are pointed at
127.0.0.1 here before they start. Request parameters (latency_budget_ms, tier) reach the
model in `payload.parameters` and are ignored. Per-request INFO logs (one line per gRPC call
plus a latency line, uvicorn's access line per REST call) are off: KSERVE_LOGLEVEL defaults
to WARNING, latency logging is disabled and the REST server's access log too, so that the
peer does not pay for writing logs innfer does not write.

    <venv>/bin/python bench/peer_servers/kserve_onnx.py --onnx M.onnx --model-name mlp \
        --grpc-port P --http-port H
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# kserve.constants reads the level at import; kserve.model_server parses sys.argv at import
# (parse_known_args: the flags below are spelt with dashes so that it ignores them).
os.environ.setdefault("KSERVE_LOGLEVEL", "WARNING")

import grpc
import kserve
import kserve.model_server
import kserve.protocol.grpc.server as kserve_grpc
from kserve import InferOutput, InferRequest, InferResponse
from ort_session import session, signature

HOST = "127.0.0.1"


class OnnxModel(kserve.Model):
    def __init__(self, name: str, onnx_path: str, threads: int) -> None:
        super().__init__(name)
        self.onnx_path, self.threads = onnx_path, threads
        self.load()

    def load(self) -> bool:
        self.session = session(self.onnx_path, self.threads)
        _, outputs = signature(self.session)
        self.output_names = [name for name, _ in outputs]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        feeds = {t.name: t.as_numpy() for t in payload.inputs}
        results = self.session.run(self.output_names, feeds)
        outputs = []
        for name, y in zip(self.output_names, results, strict=True):
            out = InferOutput(name=name, shape=list(y.shape), datatype="FP32")
            out.set_data_from_numpy(y, binary_data=True)  # raw_output_contents, as innfer
            outputs.append(out)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)


class _LoopbackGrpc:
    """grpc.aio as kserve's GRPCServer sees it: its servers bind the loopback address where
    kserve asks for [::]."""

    @staticmethod
    def server(*args, **kwargs):
        srv = grpc.aio.server(*args, **kwargs)
        bind = srv.add_insecure_port
        srv.add_insecure_port = lambda address: bind(address.replace("[::]", HOST, 1))
        return srv


class _LoopbackRest(kserve.model_server.RESTServer):
    """KServe's REST server (uvicorn), on the loopback address instead of 0.0.0.0."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = HOST  # read when uvicorn binds, after this
        # No access-log line per REST request (uvicorn's default): innfer writes none, and
        # KServe's gRPC path none either (bench/rest.py measures the REST port). uvicorn logs
        # where its access logger has handlers (Config(access_log=False) clears them, but
        # this Config is made already).
        access = logging.getLogger("uvicorn.access")
        access.handlers, access.propagate = [], False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    kserve_grpc.aio = _LoopbackGrpc
    kserve.model_server.RESTServer = _LoopbackRest
    model = OnnxModel(args.model_name, args.onnx, args.threads)
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        enable_grpc=True,
        enable_latency_logging=False,
        grace_period=1,
    )
    print(f"serving {args.model_name} on {HOST}:{args.grpc_port}", file=sys.stderr, flush=True)
    server.start([model])


if __name__ == "__main__":
    main()
