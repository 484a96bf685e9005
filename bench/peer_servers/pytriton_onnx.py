"""PyTriton serving one ONNX model with ONNX Runtime behind Triton's dynamic batcher: the
PyTriton peer of bench/peers.py. Runs inside the PyTriton virtual environment
(nvidia-pytriton, numpy<2, onnxruntime); nothing from the project is imported but
ort_session.py beside it.

Triton (the tritonserver binary bundled in the wheel) listens on 127.0.0.1 only (gRPC, HTTP
and metrics on the given ports) and hands each batch to `infer` below in this process, which
runs the whole batch through one ONNX Runtime session (1 intra-op thread). The batcher:
max_batch_size 8 (innfer's max batch) and max_queue_delay_microseconds --queue-delay-us
(default 0: no waiting for company; requests that queued while the model ran still go
together, up to 8). ModelStatistics is readable without PyTriton's access token (the other
protected endpoints keep it). Serves until SIGTERM or SIGINT, then stops Triton.

    <venv>/bin/python bench/peer_servers/pytriton_onnx.py --onnx M.onnx --model-name mlp \
        --grpc-port P --http-port H --metrics-port Q
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sysconfig
from pathlib import Path

import numpy as np
from ort_session import session, signature
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import (
    DEFAULT_PROTECTED_ENDPOINTS,
    Triton,
    TritonConfig,
    TritonSecurityConfig,
)

HOST = "127.0.0.1"
MAX_BATCH = 8


def use_this_libpython() -> str | None:
    """Put this interpreter's libpython first on the loader path of Triton's children.

    Triton runs the model through its Python backend stub (a binary in the wheel) linked
    against ``libpython3.X.so.1.0``; the loader finds the first one on its path, which need
    not be this interpreter's (a pyenv Python 3.11.7 with Debian's 3.11.2 in /lib: the stub
    then runs 3.11.2's C core under 3.11.7's standard library and fails in
    multiprocessing.resource_tracker, "'_thread.RLock' object has no attribute
    '_recursion_count'"). Returns the directory put first, None where there is no shared
    libpython."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not (libdir and soname and (Path(libdir) / soname).is_file()):
        return None
    rest = os.environ.get("LD_LIBRARY_PATH")
    os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{rest}" if rest else libdir
    return libdir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--queue-delay-us", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    use_this_libpython()
    sess = session(args.onnx, args.threads)
    inputs, outputs = signature(sess)
    output_names = [name for name, _ in outputs]

    @batch
    def infer(**feeds: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(output_names, sess.run(output_names, feeds), strict=True))

    config = TritonConfig(
        grpc_address=HOST,
        grpc_port=args.grpc_port,
        http_address=HOST,
        http_port=args.http_port,
        metrics_address=HOST,
        metrics_port=args.metrics_port,
        exit_on_error=True,
    )
    # Triton.serve() stops Triton (and its tritonserver child) on KeyboardInterrupt only.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # PyTriton guards statistics (and more) with a random access token; statistics are
    # opened (read-only, loopback) so that the benchmark can read the batch sizes formed.
    security = TritonSecurityConfig(
        restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"]
    )
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=args.model_name,
            infer_func=infer,
            inputs=[Tensor(name=n, shape=tuple(s), dtype=np.float32) for n, s in inputs],
            outputs=[Tensor(name=n, shape=tuple(s), dtype=np.float32) for n, s in outputs],
            config=ModelConfig(
                max_batch_size=MAX_BATCH,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us),
            ),
            strict=False,
        )
        print(f"serving {args.model_name} on {HOST}:{args.grpc_port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
