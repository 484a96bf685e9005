"""``innfer bench``: an open-loop load generator over gRPC (the real tritonclient.grpc.aio).

Arrivals come from the simulator's traces (same seed, same times), each request carries its
budget as ``latency_budget_ms``; the client measures latency and checks it against the
budget. Bounded in count and time, and only loopback addresses are accepted.

Example:
    >>> report = asyncio.run(run_load("127.0.0.1:8001", "mnist", arrivals, budgets,
    ...                               inputs))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass
class LoadReport:
    summary: dict
    latency_ms: np.ndarray  # nan where the request failed
    tiers: list[str | None]
    codes: list[str]


def check_loopback(address: str) -> None:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"innfer bench only targets loopback addresses (127.0.0.0/8, ::1); got {host!r}"
        )


async def run_load(
    address: str,
    model: str,
    arrivals: np.ndarray,
    budgets_s: np.ndarray,
    inputs: dict[str, np.ndarray],
    max_seconds: float = 600.0,
    accuracy: dict[str, float] | None = None,
) -> LoadReport:
    """Send one request per arrival time (seconds from start); wait for all answers."""
    import tritonclient.grpc.aio as tca
    from tritonclient.utils import InferenceServerException

    check_loopback(address)
    n = len(arrivals)
    latency = np.full(n, np.nan)
    tiers: list[str | None] = [None] * n
    codes = ["unsent"] * n
    async with tca.InferenceServerClient(address) as client:
        tensors = []
        for name, x in inputs.items():
            t = tca.InferInput(name, list(x.shape), _oip(x.dtype))
            t.set_data_from_numpy(x)
            tensors.append(t)

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.infer(
                    model, tensors, parameters={"latency_budget_ms": float(budgets_s[i] * 1e3)}
                )
                latency[i] = (time.perf_counter() - t0) * 1e3
                tiers[i] = r.get_response().parameters["tier"].string_param
                codes[i] = "OK"
            except InferenceServerException as exc:
                codes[i] = str(exc.status()).removeprefix("StatusCode.")

        start = time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals):
            if at > max_seconds:
                break
            delay = at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=max_seconds + 30)
        wall = time.perf_counter() - start
    return LoadReport(
        _summary(latency, budgets_s, tiers, codes, wall, accuracy), latency, tiers, codes
    )


def _summary(latency, budgets_s, tiers, codes, wall, accuracy) -> dict:
    n = len(latency)
    ok = ~np.isnan(latency)
    met = ok & (latency <= budgets_s * 1e3)
    mix = Counter(t for t in tiers if t)
    served = int(ok.sum())
    mean_acc = None
    if accuracy and served:
        mean_acc = float(np.mean([accuracy[t] for t in tiers if t]))
    return {
        "requests": n,
        "slo_attainment": float(met.sum() / n) if n else 1.0,
        "mean_served_accuracy": mean_acc,
        "tier_mix": {k: v / max(served, 1) for k, v in sorted(mix.items())},
        "p50_latency_ms": float(np.percentile(latency[ok], 50)) if served else None,
        "p99_latency_ms": float(np.percentile(latency[ok], 99)) if served else None,
        "goodput_per_s": float(met.sum() / wall) if wall else 0.0,
        "refused": {k: v for k, v in Counter(codes).items() if k != "OK"},
        "wall_seconds": wall,
    }


def _oip(dtype: np.dtype) -> str:
    return {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32",
            "uint8": "UINT8", "bool": "BOOL"}[np.dtype(dtype).name]  # fmt: skip
