"""The recording rules and alerts of deploy/monitoring, evaluated - not only parsed.

Three parts:

* the counters the rules read, from a ``ModelRuntime`` on fake engines: every request a
  client sends ends in exactly one of ``innfer_deadline_met_total`` or
  ``innfer_deadline_missed_total{reason}`` (one cancelled by its client before its deadline
  in neither), so SLO attainment met / (met + missed) is what clients experience;
* ``promtool check rules`` and ``promtool test rules deploy/monitoring/tests/rules-test.yaml``
  on the PrometheusRule's ``spec.groups``, extracted into a plain rules file in a tmp dir
  (skipped where promtool is absent: ``apt-get install prometheus`` ships it);
* rules-test.yaml covers every recording rule and every alert, firing and not firing.

tests/test_monitoring_live.py runs the same rules in a real Prometheus against a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_model_runtime import _Gate, _run, _until

from runtime.engines.fake import write_model
from runtime.repository import Repository
from server.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from server.metrics import MISS_REASONS, SHED_REASONS, Metrics
from server.model_runtime import ModelRuntime

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
RULES_TEST = MONITORING / "tests" / "rules-test.yaml"
RULES_FILE = "prometheusrule.rules.yaml"  # the name rules-test.yaml's rule_files expects


def extract_rules(dest: Path, interval: str | None = None) -> Path:
    """Write prometheusrule.yaml's ``spec.groups`` as a plain Prometheus rules file ``dest``;
    with ``interval``, every group is evaluated that often (the live test's short one)."""
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    groups = rule["spec"]["groups"]
    if interval is not None:
        groups = [{**g, "interval": interval} for g in groups]
    dest.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return dest


def _rules() -> list[dict]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


# --- the counters the rules read -------------------------------------------------------------

TIERS = {"w100": 1.0, "w050": 0.5}
LATENCY_MS = {"w100": {1: 20.0, 4: 20.0}, "w050": {1: 10.0, 4: 10.0}}


def _served(root: Path, **config):
    write_model(root, "m", TIERS, LATENCY_MS, max_batch=4, **config)
    return Repository(root).load("m", backend="fake")


def _x(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"input": np.full((1, 4), value, np.float32)}


def _value(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, {"model": "m", **labels}) or 0.0


def _slo(metrics: Metrics) -> tuple[float, dict[str, float]]:
    met = _value(metrics, "innfer_deadline_met_total")
    missed = {w: _value(metrics, "innfer_deadline_missed_total", reason=w) for w in MISS_REASONS}
    return met, missed


@contextlib.asynccontextmanager
async def _runtime(served, metrics):
    rt = ModelRuntime(served, metrics)
    rt.start()
    try:
        yield rt
    finally:
        if not rt.stopping:
            await rt.stop()


def test_every_reason_series_exists_from_load(tmp_path):
    """Bound at 0 when the model loads: rate() never loses a first increment and the
    rules' ``or ... * 0`` fallbacks are needed only for pods that predate this."""
    metrics = Metrics()
    ModelRuntime(_served(tmp_path), metrics)
    for why in MISS_REASONS:
        assert metrics.registry.get_sample_value(
            "innfer_deadline_missed_total", {"model": "m", "reason": why}
        ) == 0.0, why  # fmt: skip
    for outcome in ("refused_deadline", "refused_full", "cancelled", "unavailable"):
        labels = {"model": "m", "tier": "", "outcome": outcome}
        assert metrics.registry.get_sample_value("innfer_requests_total", labels) == 0.0
    assert set(SHED_REASONS) < set(MISS_REASONS)


def test_refusals_at_arrival_are_misses_and_say_why(tmp_path):
    """Refused for the work ahead (load), with the queue full (load), or for a budget no tier
    meets even alone (the client's ask): each a miss, told apart by ``reason``."""
    served = _served(tmp_path, max_queue=1)
    metrics = Metrics()

    async def body():
        async with _runtime(served, metrics) as rt:
            await rt.infer(_x(), 1, 1.0)  # met
            with pytest.raises(DeadlineExceeded, match="below the fastest"):
                await rt.infer(_x(), 1, 0.001)  # 1 ms: no tier, even alone
            with _Gate(served) as gate:
                first = asyncio.create_task(rt.infer(_x(), 1, 10.0, pin="w100"))
                await _until(lambda: gate.running() == 1)
                # 20 ms: w050 alone (10 ms) would make it, behind the 20 ms batch it cannot.
                with pytest.raises(DeadlineExceeded, match="behind"):
                    await rt.infer(_x(), 1, 0.02)
                queued = asyncio.create_task(rt.infer(_x(), 1, 10.0))
                await _until(lambda: _value(metrics, "innfer_queue_depth") == 1)
                with pytest.raises(ResourceExhausted, match="queue full"):
                    await rt.infer(_x(), 1, 10.0)
                gate.release()
                await asyncio.gather(first, queued)

    _run(body())
    met, missed = _slo(metrics)
    assert met == 3
    assert missed == {**dict.fromkeys(MISS_REASONS, 0.0), "refused_budget": 1,
                      "refused_deadline": 1, "refused_full": 1}  # fmt: skip
    # One gRPC status (DEADLINE_EXCEEDED) for both kinds of deadline refusal.
    assert _value(metrics, "innfer_requests_total", tier="", outcome="refused_deadline") == 2
    assert _value(metrics, "innfer_requests_total", tier="", outcome="refused_full") == 1
    assert met / (met + sum(missed.values())) == 0.5  # served-only, it would read 1.0


def test_late_and_expired_are_misses_and_the_expired_wait_is_queue_time(tmp_path):
    served = _served(tmp_path)
    metrics = Metrics()

    async def body():
        async with _runtime(served, metrics) as rt:
            with _Gate(served) as gate:
                running = asyncio.create_task(rt.infer(_x(), 1, 0.1, pin="w100"))
                await _until(lambda: gate.running() == 1)
                queued = asyncio.create_task(rt.infer(_x(), 1, 0.08))
                await _until(lambda: _value(metrics, "innfer_queue_depth") == 1)
                await asyncio.sleep(0.5)  # both budgets pass while the engine is held
                gate.release()
                await running  # answered, 0.4 s after its budget
                with pytest.raises(DeadlineExceeded, match="ran out in the queue"):
                    await queued

    _run(body())
    met, missed = _slo(metrics)
    assert met == 0
    assert missed["late"] == 1 and missed["expired"] == 1
    assert sum(missed.values()) == 2
    # The expired request waited to its deadline (80 ms: the expiry timer, while the engine
    # was held) and got nothing: that wait is queue time (the served one started at once).
    # Counting served requests only, the replica read idle. Below the 0.5 s hold: counted
    # at its deadline, not at the release (with 0.32 s to spare for a late timer).
    assert 0.07 <= _value(metrics, "innfer_queue_seconds_total") < 0.4
    assert _value(metrics, "innfer_degraded_requests_total") == 0  # it ran on w100


def test_failed_cancelled_and_unloaded_requests(tmp_path, monkeypatch):
    """An engine failure and an unload are misses; a request its client cancels before its
    deadline is neither met nor missed, one cancelled after it (still queued: the gRPC
    deadline's cancel) expired, as the server's own expiry counts it."""
    served = _served(tmp_path)
    metrics = Metrics()
    # Past its deadline a queued request is expired by the runtime's timer within a few ms;
    # the timer held off, a cancel can come first - the late cancel counted here.
    monkeypatch.setattr(ModelRuntime, "_arm_expiry", lambda self, now: None)

    async def body():
        rt = ModelRuntime(served, metrics)
        rt.start()
        served.engines["w100"].fail = RuntimeError("engine exploded")
        with pytest.raises(Exception, match="engine exploded"):
            await rt.infer(_x(), 1, 1.0, pin="w100")
        served.engines["w100"].fail = None
        with _Gate(served) as gate:
            blocker = asyncio.create_task(rt.infer(_x(), 1, 10.0, pin="w100"))
            await _until(lambda: gate.running() == 1)
            early = asyncio.create_task(rt.infer(_x(), 1, 10.0))
            waited_out = asyncio.create_task(rt.infer(_x(), 1, 0.05))
            await _until(lambda: _value(metrics, "innfer_queue_depth") == 2)
            early.cancel()
            await asyncio.sleep(0.08)  # no pump in between: waited_out is still queued
            waited_out.cancel()
            for t in (early, waited_out):
                with pytest.raises(asyncio.CancelledError):
                    await t
            unloaded = asyncio.create_task(rt.infer(_x(), 1, 10.0))
            await _until(lambda: _value(metrics, "innfer_queue_depth") == 1)
            stopping = asyncio.create_task(rt.stop(drain_s=0.0))
            with pytest.raises(Unavailable):
                await unloaded
            gate.release()
            await blocker
            await stopping

    _run(body())
    met, missed = _slo(metrics)
    assert met == 1  # the blocker
    assert missed == {**dict.fromkeys(MISS_REASONS, 0.0), "failed": 1, "expired": 1,
                      "unavailable": 1}  # fmt: skip
    assert _value(metrics, "innfer_requests_total", tier="", outcome="cancelled") == 1
    assert _value(metrics, "innfer_requests_total", tier="", outcome="refused_deadline") == 1


# --- promtool --------------------------------------------------------------------------------


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not found: `apt-get install prometheus` (Debian) ships it")
    return tool


def test_promtool_check_rules(tmp_path):
    tool = _promtool()
    rules = extract_rules(tmp_path / RULES_FILE)
    out = subprocess.run([tool, "check", "rules", str(rules)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in out.stdout


def test_promtool_unit_tests(tmp_path):
    tool = _promtool()
    extract_rules(tmp_path / RULES_FILE)
    test = tmp_path / RULES_TEST.name
    shutil.copy(RULES_TEST, test)  # rule_files resolve relative to the test file
    out = subprocess.run([tool, "test", "rules", str(test)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_unit_tests_cover_every_rule_and_alert_both_ways():
    """rules-test.yaml checks every recording rule's value, and every alert both firing and
    not firing: a rule added to prometheusrule.yaml without a test fails here."""
    doc = yaml.safe_load(RULES_TEST.read_text())
    assert doc["rule_files"] == [RULES_FILE]
    records = {r["record"] for r in _rules() if "record" in r}
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    checked, fired, silent = set(), set(), set()
    for test in doc["tests"]:
        for t in test.get("promql_expr_test", []):
            if t["exp_samples"]:
                checked |= set(re.findall(r"innfer:[a-z_:]+", t["expr"])) & records
        for t in test.get("alert_rule_test", []):
            (fired if t.get("exp_alerts") else silent).add(t["alertname"])
    assert records - checked == set(), "recording rules without a value check"
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown not firing"
    # The shed reasons the degraded share counts are the server's.
    (share,) = (r["expr"] for r in _rules() if r.get("record") == "innfer:degraded_share")
    for regex in re.findall(r'reason=~"([^"]+)"', share):
        assert set(regex.split("|")) == set(SHED_REASONS)
