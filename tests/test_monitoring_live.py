"""deploy/monitoring against a real Prometheus scraping real servers under load.

A Prometheus (the Debian ``prometheus`` binary; skipped where it is absent) is started on
127.0.0.1 with a tmp config and storage: it scrapes three innfer servers (``ServerThread``)
as the PodMonitor would - its path, and the ``namespace``/``pod`` labels the operator's
relabelling adds, given here as target labels - every second, plus a stand-in for
kube-state-metrics, and evaluates prometheusrule.yaml's groups every second. Then a bounded
load (tritonclient, 8 s) runs:

  innfer-a  model tiny, one client, the default budget: everything in time, top tier
  innfer-b  model mlp (w100 ~5 ms, w025 ~0.3 ms), one client, first 3 s: budgets only w025
            meets - in time, and not degraded (the budget's doing, not load's)
  innfer-c  model mlp, eight clients, last 5 s: mostly the default budget, some tight, one
            in eight impossible - more than it can take: queued, refused, shed

and the test asks Prometheus' HTTP API for every recording rule (values in the range the
load implies: SLO attainment of mlp near the share of requests clients got in time,
queue:compute and the degraded share highest where load exceeded capacity), the exact
queries prometheus-adapter serves the HPA (templates substituted as the adapter does; one
series per pod), every Grafana panel's and variable's query (variables substituted), and
the alerts the load should make pending. With INNFER_MONITORING_REPORT=<file> the measured
values are written there (and printed with -s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from serverutil import TIERS, ServerThread, add_onnx_model, tiny_cnn, wide_mlp
from test_deploy import _FakeNvml
from test_prometheus_rules import extract_rules

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
NAMESPACE = "innfer"
PODS = {"innfer-a": "tiny", "innfer-b": "mlp", "innfer-c": "mlp"}
MLP_TIERS = [{"name": "w100", "width": 1.0}, {"name": "w025", "width": 0.25}]
MODEL_TIERS = {"tiny": {t["name"] for t in TIERS}, "mlp": {t["name"] for t in MLP_TIERS}}
LOAD_S = 8.0  # how long the clients send: b for the first B_LOAD_S, then c
B_LOAD_S = 3.0
# innfer-c's clients cycle through these budgets (ms; None: the model's default, 500 ms):
# three in eight impossible (1 µs: refused_budget), three tight (w025 only, and not behind
# a queue: mostly refused for the work ahead), two generous (they queue, max_queue 2, and
# push the scheduler to w025; the rest are refused_full). Refusals return at once, so most
# of c's requests are refused: the measured case, where a served-only SLO reads high.
C_BUDGETS_MS = (0.001, 3.0, None, 3.0, 0.001, 3.0, 0.001, None)
MAX_PER_CLIENT = 2000  # and at most this many requests each
RATE_INTERVAL = "1m"  # Grafana's $__rate_interval (4 x the PodMonitor's 15 s)
# kube-state-metrics' series the dashboard and InnferDegradedAtMaxReplicas read: the HPA
# is at its maximum, so the alert's replica condition holds.
KSM = "\n".join(
    f'{name}{{namespace="{NAMESPACE}",{kind}="innfer"}} {value}'
    for name, kind, value in (
        ("kube_deployment_status_replicas", "deployment", 3),
        ("kube_horizontalpodautoscaler_status_desired_replicas", "horizontalpodautoscaler", 3),
        ("kube_horizontalpodautoscaler_status_current_replicas", "horizontalpodautoscaler", 3),
        ("kube_horizontalpodautoscaler_spec_max_replicas", "horizontalpodautoscaler", 3),
    )
) + "\n"  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _ksm():
    """kube-state-metrics' series on 127.0.0.1, from a static exposition."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = KSM.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class Prometheus:
    """A Prometheus process on 127.0.0.1 with a tmp config and storage."""

    def __init__(self, binary: str, workdir: Path, targets: dict[str, str], ksm: str) -> None:
        rules = extract_rules(workdir / "rules.yaml", interval="1s")
        (podmonitor,) = [
            d for d in yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text()) if d
        ]
        (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
        labels = {"namespace": NAMESPACE, "container": "server", "endpoint": endpoint["port"]}
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    # What the PodMonitor's relabelling yields: the pod's namespace and name
                    # (and container, endpoint) as target labels.
                    "job_name": "innfer",
                    "metrics_path": endpoint["path"],
                    "static_configs": [
                        {"targets": [addr], "labels": {**labels, "pod": pod}}
                        for pod, addr in targets.items()
                    ],
                },
                {"job_name": "kube-state-metrics", "static_configs": [{"targets": [ksm]}]},
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait(lambda: self._get("/-/ready", raw=True), 30, "Prometheus did not become ready")

    def _get(self, path: str, raw: bool = False, **params):
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read()
        except OSError:
            if raw:
                return None
            raise
        return body if raw else json.loads(body)

    def wait(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"{what}\n{self.tail()}")
            time.sleep(0.2)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def query(self, expr: str) -> list[dict]:
        out = self._get("/api/v1/query", query=expr)
        assert out["status"] == "success", (expr, out)
        return out["data"]["result"]

    def alerts(self) -> list[dict]:
        return self._get("/api/v1/alerts")["data"]["alerts"]

    def series(self, match: str) -> list[dict]:
        return self._get("/api/v1/series", **{"match[]": match})["data"]

    def targets_up(self, n: int) -> bool:
        active = self._get("/api/v1/targets")["data"]["activeTargets"]
        return len(active) == n and all(
            t["health"] == "up" and not t["lastScrape"].startswith("0001") for t in active
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _values(result: list[dict], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def _gauge(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} not in {url}")


def _counter_sum(url: str, name: str, label: str, values: set[str], **labels) -> float:
    """The sum of ``name``'s samples that carry ``labels`` and whose ``label`` is one of
    ``values`` (each must be there: the server creates its series at load)."""
    return sum(_gauge(url, name, **labels, **{label: v}) for v in sorted(values))


SHED_REASONS = {"refused_deadline", "refused_full", "expired"}  # innfer:degraded_share's


def _totals(s: ServerThread, model: str) -> dict[str, float]:
    """A server's own counters after the load: what the queue:compute and degraded-share
    rules must reproduce from Prometheus' rates."""
    url, tiers = s.metrics_url, MODEL_TIERS[model]
    return {
        "queue_s": _gauge(url, "innfer_queue_seconds_total", model=model),
        "compute_s": _gauge(url, "innfer_compute_seconds_total", model=model),
        "degraded": _gauge(url, "innfer_degraded_requests_total", model=model),
        "shed": _counter_sum(url, "innfer_deadline_missed_total", "reason", SHED_REASONS,
                             model=model),
        "served": _counter_sum(url, "innfer_requests_total", "tier", tiers, model=model,
                               outcome="served"),
    }  # fmt: skip


# --- load ------------------------------------------------------------------------------------


async def _client_loop(address, model, x, budget_ms, pause_s, until, counts):
    """Requests one at a time until ``until``; ``budget_ms(i)`` gives the i-th budget (None:
    the model's default). Counts the gRPC status codes."""
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as tca
    from tritonclient.utils import InferenceServerException

    client = tca.InferenceServerClient(address)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    try:
        for i in range(MAX_PER_CLIENT):
            if time.monotonic() >= until:
                break
            budget = budget_ms(i)
            params = {} if budget is None else {"latency_budget_ms": budget}
            try:
                await client.infer(model, [inp], parameters=params)
                status = "OK"
            except InferenceServerException as exc:
                status = str(exc.status()).removeprefix("StatusCode.")
            counts[status] += 1
            await asyncio.sleep(pause_s)
    finally:
        await client.close()


async def _load(servers: dict[str, ServerThread], tight_ms: float) -> dict[str, Counter]:
    """a all along; b first (a calm machine: its budgets, not contention, pick the tier);
    then c's overload."""
    start = time.monotonic()
    end, b_end = start + LOAD_S, start + B_LOAD_S
    counts = {pod: Counter() for pod in PODS}
    rng = np.random.default_rng(0)
    tiny = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    address = {pod: s.address for pod, s in servers.items()}

    async def overload():
        await asyncio.sleep(max(0.0, b_end - time.monotonic()))
        await asyncio.gather(*(
            _client_loop(address["innfer-c"], "mlp", x, lambda i, k=k: C_BUDGETS_MS[(i + k) % 8],
                         0.002, end, counts["innfer-c"])
            for k in range(8)
        ))  # fmt: skip

    await asyncio.gather(
        _client_loop(address["innfer-a"], "tiny", tiny, lambda i: None, 0.02, end,
                     counts["innfer-a"]),
        _client_loop(address["innfer-b"], "mlp", x, lambda i: tight_ms, 0.01, b_end,
                     counts["innfer-b"]),
        overload(),
    )  # fmt: skip
    return counts


# --- the test --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """'tiny' (tests/serverutil.py's CNN) and 'mlp': 784-4096-4096-10 with tiers w100 and
    w025 (~5 ms and ~0.3 ms a batch on a CPU core), so a budget between them is wide enough
    to pick w025 on a busy machine; queue of 2, batches of 4."""
    root = tmp_path_factory.mktemp("monitoring-repository")
    io = {"outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}], "max_batch": 4}
    add_onnx_model(root, "tiny", tiny_cnn, {
        **io, "tiers": TIERS, "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}],
    })  # fmt: skip
    add_onnx_model(root, "mlp", lambda w: wide_mlp(2 * w), {
        **io, "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 28, 28]}],
        "tiers": MLP_TIERS,
        "max_queue": 2, "default_latency_budget_ms": 500,
        # Admission at the planning quantile, as the rules' scenario was written for: the
        # overloaded pod must be refusal-heavy (the median admits most 3 ms budgets).
        "admit_quantile": 0.999,
    })  # fmt: skip
    return root


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not found: `apt-get install prometheus` (Debian) ships it")
    return binary


def test_rules_adapter_and_dashboard_against_live_servers(
    prometheus_binary, repository, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    servers: dict[str, ServerThread] = {}
    prom = None
    try:
        for pod, model in PODS.items():
            # Budgets planned with the margin alone, as the rules' scenario was written for:
            # the learned overhead's reserve moves which of c's tight budgets are admitted.
            servers[pod] = ServerThread(
                {"repository": str(repository), "models": [model], "plan_overhead": False}
            ).start()  # fmt: skip
        with _ksm() as ksm:
            targets = {
                pod: s.metrics_url.removeprefix("http://").removesuffix("/metrics")
                for pod, s in servers.items()
            }
            prom = Prometheus(prometheus_binary, tmp_path, targets, ksm)
            # Every counter sampled at 0 before the load: rate() sees all of it.
            prom.wait(lambda: prom.targets_up(len(PODS) + 1), 20, "targets not up")
            time.sleep(1.5)
            # A budget between the tiers' planned times for one row (b's requests): w025
            # meets it, w100 does not; w025 is planned at < 1/4 of w100, and on a busy CPU
            # its overheads can triple it: 0.6 leaves room. (From the exported full-batch
            # plan it fitted w100's one row where the load-time timing put one row under 60 %
            # of four: b's requests served on w025 then counted degraded, 0.35 in 2 of 5
            # runs on a slow hour, at this tree's start too.)
            b = servers["innfer-b"]
            assert _gauge(b.metrics_url, "innfer_tier_planned_latency_seconds", model="mlp",
                          tier="w100") > 0  # exported  # fmt: skip
            (lane,) = b.server.plane.models["mlp"].lanes.values()
            planned = {t: float(lane.latency.planned(t)[1]) for t in ("w100", "w025")}
            assert planned["w100"] > 4 * planned["w025"], planned
            tight_ms = b.config.budget_margin_ms + 1e3 * 0.6 * planned["w100"]
            counts = asyncio.run(_load(servers, tight_ms))
            time.sleep(3.0)  # the last scrapes, then the rules on them
            # Each server's own totals, final once the load has returned (every request
            # answered): what the queue:compute and degraded-share rules must reproduce.
            totals = {pod: _totals(s, PODS[pod]) for pod, s in servers.items()}
            _check(prom, counts, tight_ms, totals)
    except BaseException:
        if prom is not None:
            print("prometheus log:\n" + prom.tail(), file=sys.stderr)
        raise
    finally:
        if prom is not None:
            prom.stop()
        for s in servers.values():
            s.stop()


def _check(
    prom: Prometheus,
    counts: dict[str, Counter],
    tight_ms: float,
    totals: dict[str, dict[str, float]],
) -> None:
    """``totals``: per pod, its server's counters after the load (``_totals``)."""
    report: dict[str, object] = {"client_status_counts": {p: dict(c) for p, c in counts.items()},
                                 "tight_budget_ms": round(tight_ms, 3)}  # fmt: skip
    ns = f'{{namespace="{NAMESPACE}"}}'
    for pod, c in counts.items():
        assert sum(c.values()) >= 20, (pod, c)  # the load ran
    heavy = counts["innfer-c"]
    assert heavy["OK"] > 20 and heavy["OK"] < 0.5 * sum(heavy.values()), heavy  # refused-heavy

    # --- recording rules -------------------------------------------------------------------
    qc = _values(prom.query(f"innfer:queue_compute_ratio{ns}"), "pod")
    ds = _values(prom.query(f"innfer:degraded_share{ns}"), "pod")
    slo = _values(prom.query(f"innfer:slo_attainment{ns}"), "model")
    acc = _values(prom.query(f"innfer:served_accuracy_mean{ns}"), "model")
    refused = _values(prom.query(f"innfer:refused_share{ns}"), "model")
    report.update(server_totals=totals)
    report.update(queue_compute_ratio=qc, degraded_share=ds, slo_attainment=slo,
                  served_accuracy_mean=acc, refused_share=refused)  # fmt: skip
    # What the served-only rule of before would say, from the same counters.
    late_ns = f'{{namespace="{NAMESPACE}",reason="late"}}'
    met = f"sum by (model) (rate(innfer_deadline_met_total{ns}[5m]))"
    late = f"sum by (model) (rate(innfer_deadline_missed_total{late_ns}[5m]))"
    served_only = _values(prom.query(f"{met} / ({met} + {late})"), "model")
    by_reason = _values(prom.query(
        f"sum by (reason) (increase(innfer_deadline_missed_total{ns}[5m]))"
    ), "reason")  # fmt: skip
    by_pod_reason = {
        f"{r['metric']['pod']}/{r['metric']['reason']}": round(float(r["value"][1]), 1)
        for r in prom.query(
            f"sum by (pod, reason) (increase(innfer_deadline_missed_total{ns}[5m])) > 0"
        )
    }
    # The refused-heavy pod alone, with the rule's formula and with the served-only one.
    c_met = 'sum(rate(innfer_deadline_met_total{pod="innfer-c"}[5m]))'
    c_missed = 'sum(rate(innfer_deadline_missed_total{pod="innfer-c"}[5m]))'
    c_late = 'sum(rate(innfer_deadline_missed_total{pod="innfer-c",reason="late"}[5m]))'
    c_slo = _values(prom.query(f"{c_met} / ({c_met} + {c_missed})"), "")[""]
    c_served_only = _values(prom.query(f"{c_met} / ({c_met} + {c_late})"), "")[""]
    c = counts["innfer-c"]
    report.update(innfer_c_slo_attainment=c_slo, innfer_c_served_only_slo=c_served_only,
                  innfer_c_client_refused_share=1 - c["OK"] / sum(c.values()))  # fmt: skip
    served_b = _values(prom.query(
        'sum by (tier) (increase(innfer_requests_total{pod="innfer-b",outcome="served"}[5m]))'
    ), "tier")  # fmt: skip
    mlp = counts["innfer-b"] + counts["innfer-c"]
    ok_share = mlp["OK"] / sum(mlp.values())
    report.update(served_only_slo=served_only, missed_by_reason=by_reason,
                  missed_by_pod_and_reason=by_pod_reason,
                  served_by_tier_innfer_b=served_b, mlp_client_ok_share=ok_share)  # fmt: skip
    _write_report(report)

    assert set(qc) == set(ds) == set(PODS), (qc, ds)
    assert set(slo) == set(acc) == set(refused) == {"tiny", "mlp"}
    for v in (*qc.values(), *ds.values(), *slo.values(), *acc.values(), *refused.values()):
        assert math.isfinite(v) and v >= 0, report
    for v in (*ds.values(), *slo.values(), *acc.values(), *refused.values()):
        assert v <= 1, report
    # Queue : compute is each pod's own queue and compute seconds over the window, which
    # holds the whole load (the counters were scraped at 0 before it, both series in the same
    # scrapes: rate()'s extrapolation cancels in the ratio). Not compared across pods: b's
    # and a's batches take 50-300 us, so the GIL the other servers in this process hold
    # decides their ratio (a 3.5 and b 0.84 in contended runs, above c's 0.39-0.46); in a
    # cluster each pod is its own process. The overloaded pod queued (max_queue 2 behind
    # 5 ms batches).
    for pod, t in totals.items():
        want = min(t["queue_s"] / t["compute_s"], 20.0)
        assert qc[pod] == pytest.approx(want, rel=1e-3), (pod, qc)
    assert qc["innfer-c"] > 0.1, qc
    # Degraded share, the same way: (served below the top tier + shed) / (served + shed) of
    # each pod's own counters. Which of c's requests are shed for load and which refused as
    # impossible (refused_budget, left out) depends on how fast the machine profiled: one CI
    # run read 0.21 for c (0.83-0.99 in runs here) - few shed, most served at w100, as when
    # its 3 ms budgets are refused as impossible and the generous clients are served alone
    # (its b missed 206 of 212 budgets too: a machine far slower than profiled). So the rule is
    # checked against the pod's own totals, and c's shed must be in it (a rule without the
    # shed terms reads (degraded / served) and fails here).
    for pod, t in totals.items():
        want = (t["degraded"] + t["shed"]) / max(t["served"] + t["shed"], 1e-9)
        assert ds[pod] == pytest.approx(want, rel=1e-3, abs=1e-6), (pod, ds, t)
    c_totals = totals["innfer-c"]
    assert c_totals["shed"] > 0.1 * (c_totals["served"] + c_totals["shed"]), c_totals
    # 0 where all ran on the top tier; where budgets alone forced the narrow tier (b) none
    # of the answers counts: more replicas would serve b's requests no better (it read
    # > 0.5, and an idle fleet sat at maxReplicas; review 159). What b's share holds is its
    # shed alone: tight budgets refused behind the work ahead on a slow hour - 0.08-0.20 of
    # b's requests in such runs, and 0.97 in one CI run where w025's learned time rose to
    # 2.1 ms against the 2.0 ms b planned with (a bound < 0.5 failed there; 8 of b's 230
    # requests were served) - so the share is checked against that shed, not against a
    # bound the machine's speed decides: with no degraded answer, the exact check of the
    # rule against the pod's totals above is that. High where load exceeded capacity (c:
    # its shed).
    assert ds["innfer-a"] < 0.05, ds
    assert totals["innfer-b"]["degraded"] == 0, totals["innfer-b"]
    assert served_b.get("w025", 0) > max(served_b.get("w100", 0), 2), served_b
    # SLO attainment is what clients got: for mlp, at most the share of OK answers (an OK
    # answer can still be late), and not far below it.
    assert slo["mlp"] <= ok_share + 0.05, report
    assert slo["mlp"] >= ok_share - 0.15, report
    assert slo["mlp"] < 0.9 and slo["tiny"] > 0.95, slo
    assert served_only["mlp"] > slo["mlp"] + 0.2, report  # served-only overstated it
    c_ok = 1 - report["innfer_c_client_refused_share"]
    assert c_ok - 0.15 <= c_slo <= c_ok + 0.05 and c_served_only > c_slo + 0.3, report
    # tiny: under InnferRequestsRefused' 5 %. Not 0: its 50 ms default budget, waiting for
    # the GIL behind c's overload on a contended machine, was refused once in 300 (a run
    # beside a busy core).
    assert refused["mlp"] > 0.3 and refused["tiny"] < 0.05, refused
    assert acc["tiny"] >= acc["mlp"], acc
    for reason in ("refused_budget", "refused_full"):
        assert by_reason.get(reason, 0) > 0, by_reason

    # --- what prometheus-adapter serves the HPA --------------------------------------------
    values = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())
    pods = "|".join(PODS)
    for rule in values["rules"]["custom"]:
        series_query = rule["seriesQuery"]
        found = prom.series(series_query)
        assert {s["pod"] for s in found} == set(PODS), (series_query, found)
        (name,) = {s["__name__"] for s in found}
        # The adapter's templating for a pod list: the series, the namespace and pod
        # matchers, grouped by the pod resource's label.
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", name)
            .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{pods}"')
            .replace("<<.GroupBy>>", "pod")
        )
        assert "<<" not in query, query
        got = prom.query(query)
        assert sorted(r["metric"]["pod"] for r in got) == sorted(PODS), (query, got)
        recorded = _values(prom.query(f"{name}{ns}"), "pod")
        for r in got:
            assert math.isfinite(float(r["value"][1]))
            assert float(r["value"][1]) == pytest.approx(recorded[r["metric"]["pod"]])

    # --- Grafana ---------------------------------------------------------------------------
    dash = json.loads((MONITORING / "innfer-dashboard.json").read_text())

    def substitute(expr: str) -> str:
        return (
            expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$namespace", NAMESPACE)
            .replace("$model", "tiny|mlp")
        )

    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        got = {s.get(m.group(2)) for s in prom.series(substitute(m.group(1)))}
        want = {NAMESPACE} if var["name"] == "namespace" else {"tiny", "mlp"}
        assert got == want, (var["name"], got)
    empty, row = [], ""
    for panel in dash["panels"]:
        row = panel["title"] if panel["type"] == "row" else row
        if row == "Auto-tiering":
            # Series of models with auto_tiers (these have none), the gain and swap ones
            # only after a choice: test_auto_tiers' live swap reads them from a server,
            # test_deploy checks these queries' names and labels.
            continue
        for target in panel.get("targets", []):
            expr = substitute(target["expr"])
            assert "$" not in expr, expr
            result = prom.query(expr)
            # Data: at least one finite series (a ratio over a tier that served nothing is
            # NaN, which Grafana draws as a gap).
            if not any(math.isfinite(float(r["value"][1])) for r in result):
                empty.append((panel["title"], expr, result))
    assert not empty, empty

    # --- alerts: pending (their `for` is minutes) where the load says so ---------------------
    alerts = prom.alerts()
    active = {(a["labels"]["alertname"], a["labels"].get("model", "")) for a in alerts}
    report["alerts"] = sorted(active)
    assert ("InnferSLOAttainmentLow", "mlp") in active, active
    assert ("InnferRequestsRefused", "mlp") in active, active
    assert ("InnferDegradedAtMaxReplicas", "") in active, active
    assert not {a for a, _ in active} & {"InnferModelNotReady", "InnferRequestsFailing"}, active
    _write_report(report)


def _write_report(report: dict) -> None:
    text = json.dumps(report, indent=1, default=str)
    print("\nlive monitoring:", text)
    if os.environ.get("INNFER_MONITORING_REPORT"):
        Path(os.environ["INNFER_MONITORING_REPORT"]).write_text(text)
