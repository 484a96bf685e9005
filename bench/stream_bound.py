"""The overload phase of bench/hardening.py with and without ``max_concurrent_streams``, at
the same offered load: A/B/A/B on one machine, one server per arm.

bench/hardening.py offers 4x the capacity it measures at the start of each run, so two of its
runs differ in load as well as in code (2,274 vs 1,716 requests/s in session 33). Here the
capacity is fixed (``--capacity``, OK answers/s of the "wide" test model at concurrency 4),
so every arm gets the same open-loop Poisson trace (seeded) through one client connection.
Per arm: requests sent, each answered exactly once, the server's RSS rise, the answer codes,
OK answers' p50 at the client and the health probe's p99 (another process, every 20 ms).

    .venv/bin/python -m bench.stream_bound [--arms none 1024 none 1024] [--seconds 30]
        [--capacity 450] [--out bench/results]

Writes bench/results/stream_bound.json (~3 minutes for four 30 s arms).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import hardening

OUT = Path(__file__).parent / "results"


def run_arm(repo: Path, work: Path, arm: str, seconds: float, seed: int) -> dict:
    bound = None if arm == "none" else int(arm)
    log = work / f"server-{arm}.log"
    server = hardening.ServerProcess(hardening.ROOT, repo, log, {"max_concurrent_streams": bound})
    server.start()
    try:
        r = hardening.overload(server, seconds, seed)
    finally:
        server.stop()
    keep = ("sent", "sent_per_s", "missing", "duplicates", "exactly_once", "rss_before_mib",
            "rss_max_mib", "rss_rise_mib", "codes")  # fmt: skip
    return {
        "max_concurrent_streams": bound,
        **{k: r.get(k) for k in keep},
        "ok_p50_ms": r["answer_ms"].get("OK", {}).get("p50_ms"),
        "health_p99_ms": r["health"].get("p99_ms"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=["none", "1024", "none", "1024"],
                   help="max_concurrent_streams per run, in order ('none': no bound)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--capacity", type=float, default=450.0, help="OK/s the load is 4x of")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    for arm in args.arms:
        if arm != "none" and not (arm.isdigit() and int(arm) >= 1):
            p.error(f"--arms: 'none' or a positive count, got {arm!r}")
    fixed = {"concurrency": 4, "seconds": 0.0, "ok_per_s": args.capacity,
             "answers_per_s": args.capacity, "codes": {}}  # fmt: skip
    hardening.capacity = lambda server, seconds=0.0: dict(fixed)  # the same load every arm
    sys.path.insert(0, str(hardening.ROOT / "tests"))
    from serverutil import build_repository

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="innfer-stream-bound-"))
    repo = build_repository(work / "repo")
    rows = []
    for arm in args.arms:
        rows.append(run_arm(repo, work, arm, args.seconds, args.seed))
        r = rows[-1]
        print(f"{arm:>6}: sent {r['sent']} ({r['sent_per_s']:.0f}/s), once {r['exactly_once']}, "
              f"RSS +{r['rss_rise_mib']:.1f} MiB, OK p50 {r['ok_p50_ms'] or 0:.0f} ms, "
              f"health p99 {r['health_p99_ms']:.1f} ms, {r['codes']}", flush=True)  # fmt: skip
    result = {"params": vars(args) | {"out": str(args.out)}, "commit": hardening.commit_of(
        hardening.ROOT), "arms": rows, "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    (args.out / "stream_bound.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
