"""Review of the simulators (session 28): each test failed before its fix."""

from __future__ import annotations

from types import SimpleNamespace as Pod

from sim.autoscaler import Autoscaler, Completions
from sim.hpa import HPAConfig


def test_the_latency_baseline_keeps_its_replicas_through_a_window_with_no_answers():
    # An empty window read as 0 ms and scaled the latency-only baseline down - in an outage
    # (every request refused or timed out), to the minimum. A Kubernetes HPA without a
    # metric value keeps the replicas it has.
    scaler = Autoscaler("latency", HPAConfig(min_replicas=1), latency_target_s=0.8)
    pods = [Pod(ready_at=0.0) for _ in range(6)]
    assert scaler.evaluate(100.0, pods, Completions()) == 6
    assert scaler.ticks[-1]["latency_q_s"] is None and scaler.ticks[-1]["desired_raw"] == 6
    done = Completions()
    done.add(90.0, 0.1)  # answered, fast: now it recommends fewer (the HPA's window holds)
    scaler.evaluate(115.0, pods, done)
    assert scaler.ticks[-1]["desired_raw"] == 1
