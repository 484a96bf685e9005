"""SIGTERM under load: what clients get from a server that stops while they call it.

`innfer serve` of the MLP (runs/bench-server; bench/server.py builds it), 8 closed-loop
tritonclient clients, SIGTERM 0.4 s into the load. A client that is answered UNAVAILABLE
stops (a real one goes to another replica); any other error it counts and goes on. Every
call ends OK, UNAVAILABLE (retryable: the server is shutting down, or its port is closed)
or, the failure measured here, CANCELLED: a call gRPC's stop resets because no handler had
taken it yet, which clients do not retry. This tree and (``--baseline-tree DIR``) an older
one take turns, ``--trials`` stops each.

    python -m bench.shutdown [--baseline-tree DIR] [--trials 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "shutdown.json"
SOURCE = ROOT / "runs" / "bench-server" / "mlp"
CLIENTS = 8
SIGNAL_AFTER_S = 0.4


def one_stop(tree: Path, repo: Path, port: int, log: Path) -> dict:
    """Serve with ``tree``'s code, load it, SIGTERM it: the clients' status codes."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "innfer", "serve", "--repository", str(repo), "--port",
           str(port), "--metrics-port", "0", "--host", "127.0.0.1"]  # fmt: skip
    with log.open("w") as err:
        server = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=err)
        address = f"127.0.0.1:{port}"
        probe = grpcclient.InferenceServerClient(address)
        for _ in range(300):
            try:
                if probe.is_server_ready():
                    break
            except InferenceServerException:
                pass
            time.sleep(0.1)
        codes: collections.Counter = collections.Counter()
        lock = threading.Lock()

        def client() -> None:
            c = grpcclient.InferenceServerClient(
                address, channel_args=[("grpc.use_local_subchannel_pool", 1)]
            )
            x = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
            x.set_data_from_numpy(np.random.rand(1, 1, 28, 28).astype(np.float32))
            for _ in range(2000):
                try:
                    c.infer("mlp", [x], parameters={"latency_budget_ms": 50}, client_timeout=10)
                    code = "OK"
                except InferenceServerException as e:
                    code = str(e.status()).replace("StatusCode.", "")
                with lock:
                    codes[code] += 1
                if code == "UNAVAILABLE":
                    return

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(SIGNAL_AFTER_S)
        server.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        server.wait(60)
    return dict(codes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-tree", type=Path)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    from bench.hardening import commit_of, free_ports, trees_to_measure

    if not (SOURCE / "model.yaml").is_file():
        p.error(f"no model at {SOURCE}: run `python -m bench.server` first")
    trees = trees_to_measure(p, args.baseline_tree, "server/app.py")
    runs: dict[str, list] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="innfer-shutdown-") as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(SOURCE, repo / "mlp")
        for i in range(args.trials):
            for name in trees if i % 2 == 0 else reversed(trees):  # turns
                codes = one_stop(trees[name], repo, free_ports(1)[0], Path(tmp) / f"{name}{i}.log")
                runs[name].append(codes)
                print(name, i, codes, flush=True)
    summary = {}
    for name, rs in runs.items():
        total = collections.Counter()
        for r in rs:
            total.update(r)
        summary[name] = {"stops": len(rs), "cancelled": total["CANCELLED"],
                         "stops_with_cancelled": sum(1 for r in rs if r.get("CANCELLED")),
                         "unavailable": total["UNAVAILABLE"], "ok": total["OK"],
                         "other": sum(v for k, v in total.items()
                                      if k not in ("OK", "CANCELLED", "UNAVAILABLE"))}  # fmt: skip
    result = {"clients": CLIENTS, "signal_after_s": SIGNAL_AFTER_S,
              "commits": {n: commit_of(t) for n, t in trees.items()}, "runs": runs,
              "summary": summary}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
