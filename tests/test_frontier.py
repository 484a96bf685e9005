"""The frontier of a real INN (runtime/build/frontier.py): `innfer build` of a model with
auto_tiers measures uniform and sensitivity-shaped candidates, stores them with the model,
and reads them back on a rebuild. Auto-tiering's choice and swap: tests/test_auto_tiers.py."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_build import CONFIG as BUILD_CONFIG
from test_build import build_tiny

from runtime.build.frontier import candidate_sizes
from runtime.build.pipeline import build_model
from runtime.inn.model import load
from runtime.repository import FRONTIER_DIR, FRONTIER_FILE, Frontier, Repository, sha256_file

CONFIG = {**BUILD_CONFIG, "auto_tiers": {"widths": [1.0, 0.75, 0.5, 0.25]}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("repo"), CONFIG, repeats=3)


def test_the_accuracy_source_says_the_samples_scored_not_the_limit(tmp_path):
    # digits' test split holds 500: "evaluation digits (1000 samples)" said the limit
    # (review 176).
    from runtime.build.frontier import _accuracy_source
    from runtime.demo.data import load as load_data
    from runtime.repository.config import ModelConfig

    split = len(load_data("digits").x_test)
    for limit, said in ((10**6, split), (64, 64)):
        config = ModelConfig.from_dict({**CONFIG, "evaluation": {"dataset": "digits",
                                                                 "limit": limit}})  # fmt: skip
        assert _accuracy_source(config) == f"evaluation digits ({said} samples)"


def test_build_measures_the_frontier(built):
    root, report = built
    f = report.frontier
    assert f == Frontier.read(root / "tiny" / FRONTIER_DIR / FRONTIER_FILE)
    names = [c.name for c in f.candidates]
    assert names[:4] == ["w100", "w075", "w050", "w025"]
    assert any(c.shaped for c in f.candidates) and all(n[0] in "ws" for n in names)
    assert f.accuracy_source.startswith("evaluation digits (64 samples)")
    assert set(f.sensitivity) == {g.name for g in load(root / "tiny").groups}
    for c in f.candidates:
        assert 0 <= c.accuracy <= 1 and set(c.latency) == {"1", "2", "4"}
        onnx_path = root / "tiny" / FRONTIER_DIR / c.name / "model.onnx"
        assert sha256_file(onnx_path) == c.onnx_sha256
    assert f.pareto() and not all(c.pareto for c in f.candidates)  # something is beaten
    w = {c.name: c for c in f.candidates}
    assert w["w100"].flops > w["w050"].flops > w["w025"].flops


def test_shaped_candidates_keep_the_uniform_channel_total_and_differ_from_it(built):
    root, _ = built
    inn = load(root / "tiny")
    config = Repository(root).config("tiny")
    groups = [g.name for g in inn.groups]
    sensitivity = {g: 10.0**i for i, g in enumerate(groups)}  # later groups matter more
    out = candidate_sizes(inn, config, sensitivity)
    _, uniform, _ = out["w050"]
    _, shaped, is_shaped = out["s050"]
    assert is_shaped and shaped != uniform
    assert abs(sum(shaped.values()) - sum(uniform.values())) <= len(groups)  # rounding
    assert shaped[groups[-1]] > uniform[groups[-1]] and shaped[groups[0]] < uniform[groups[0]]
    assert not any(n.startswith("s") for n in candidate_sizes(inn, config, {}))


def test_rebuild_reads_the_frontier_back(built):
    root, report = built
    again = build_model(Repository(root), "tiny", progress=False, repeats=3)
    assert again.frontier.measured_at == report.frontier.measured_at  # not measured again
    assert np.isclose(again.frontier.candidates[0].accuracy, report.frontier.candidates[0].accuracy)


def test_a_candidate_at_stored_counts_is_the_network_they_describe(tmp_path):
    """Norm statistics the INN stores for a width (``innfer demo`` estimates them on 1,024
    inputs for each tier) are what a candidate at those channel counts keeps; a candidate
    without them has its statistics re-estimated on the calibration inputs."""
    import onnxruntime as ort
    import torch
    from netgen import tiny_cnn

    import runtime
    from runtime.build.pipeline import add_model
    from runtime.inn.calibrate import reestimate_norms

    inn = runtime.convert(tiny_cnn(), (torch.randn(1, 1, 8, 8),), fold_norms=False)
    odd = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 2
    reestimate_norms(inn, 0.5, odd)  # statistics of other inputs than the calibration set
    add_model(tmp_path, "tiny", inn, CONFIG)
    build_model(Repository(tmp_path), "tiny", progress=False, repeats=2)
    frontier = Frontier.read(tmp_path / "tiny" / FRONTIER_DIR / FRONTIER_FILE)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))

    def run(name):
        path = tmp_path / "tiny" / FRONTIER_DIR / name / "model.onnx"
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x.numpy()})[0]

    stored = load(tmp_path / "tiny")
    half = frontier.candidate("w050").sizes
    assert stored.calibrated(half) and not stored.calibrated(frontier.candidate("w075").sizes)
    with torch.no_grad():
        np.testing.assert_allclose(run("w050"), stored.sample(half)(x).numpy(), atol=1e-4)
        wider = frontier.candidate("w075").sizes
        resampled = stored.sample(wider)(x).numpy()  # no stored statistics: re-estimated
    assert not np.allclose(run("w075"), resampled, atol=1e-4)


def test_a_chosen_set_on_a_frontier_of_a_replaced_inn_is_refused(built, tmp_path):
    # Tiers from model.yaml were checked against the INN the directory holds; a chosen set
    # from the frontier was not, and served the old model under the new one's name.
    import json
    import shutil

    import torch

    from runtime.inn.model import load as load_inn
    from runtime.repository import ACTIVE_FILE, ActiveTiers, RepositoryError
    from runtime.repository.records import inn_fingerprint

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    d = root / "tiny"
    frontier = Frontier.read(d / FRONTIER_DIR / FRONTIER_FILE)
    assert frontier.inn_sha256 == inn_fingerprint(json.loads((d / "inn.json").read_text()))
    ActiveTiers(("w075",), frontier.source_sha256, "2026-01-01T00:00:00Z", {}).write(
        d / ACTIVE_FILE
    )
    assert sorted(Repository(root).load("tiny").engines) == ["w075"]
    inn = load_inn(d)
    with torch.no_grad():
        next(iter(inn.state.values())).mul_(1.5)  # "retrained" and saved over the old one
    inn.save(d)
    with pytest.raises(RepositoryError, match=r"another INN.*run `innfer build`"):
        Repository(root).load("tiny")


def test_a_choice_outlives_a_rebuild_that_measured_the_same_networks(built, tmp_path, caplog):
    # A build by a newer innfer measures the frontier again (a new source hash): the choice
    # was set aside, model.yaml's tiers served until auto-tiering chose again, even with
    # every chosen network byte-identical (review 143 F4).
    from runtime.repository import ACTIVE_FILE, ActiveTiers

    root = _copy(built, tmp_path)
    d = root / "tiny"
    frontier = Frontier.read(d / FRONTIER_DIR / FRONTIER_FILE)
    hashes = {c.name: c.onnx_sha256 for c in frontier.candidates}

    def served(tiers, recorded) -> list[str]:
        ActiveTiers(tiers, "an-older-frontier", "2026-01-01T00:00:00Z", {}, recorded).write(
            d / ACTIVE_FILE
        )
        runtime = Repository(root).load("tiny")
        return sorted(runtime.engines) if runtime.tier_source == "frontier" else []

    assert served(("w075", "w025"), hashes) == ["w025", "w075"]
    assert served(("w075", "w025"), {**hashes, "w025": "0" * 64}) == []  # one changed
    assert served(("w075",), None) == []  # chosen by an innfer that did not record them
    assert ActiveTiers.read(d / ACTIVE_FILE).onnx_sha256 is None


def test_apply_refuses_a_frontier_of_a_replaced_inn(built, tmp_path, capsys):
    # Loading checked which INN the frontier was measured on; `tiers suggest` and `apply`
    # did not: suggest recommended from the stale frontier, and apply wrote an
    # auto_tiers.json every load refused (the server then restored it and tried again
    # every min_interval_s).
    import torch

    from innfer.cli import main as cli
    from runtime.inn.model import load as load_inn
    from runtime.repository import ACTIVE_FILE

    root = _copy(built, tmp_path)
    d = root / "tiny"
    inn = load_inn(d)
    with torch.no_grad():
        next(iter(inn.state.values())).mul_(1.5)  # "retrained" and saved over the old one
    inn.save(d)
    lines = [f"{i * 0.01:.2f},{20 + i % 50}" for i in range(200)]
    (tmp_path / "t.csv").write_text("arrival_s,budget_ms\n" + "\n".join(lines) + "\n")
    traffic = ["--traffic", str(tmp_path / "t.csv")]
    argv = ["tiers", "apply", str(root), "tiny", *traffic, "--live", "frontier:w025", "--force"]
    assert cli(argv) == 2
    assert "was measured on another INN" in capsys.readouterr().err
    assert not (d / ACTIVE_FILE).exists()
    assert cli(["tiers", "suggest", str(d), *traffic]) == 2
    assert "was measured on another INN" in capsys.readouterr().err


def _copy(built, tmp_path):
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    return root


def test_an_interrupted_frontier_rebuild_leaves_the_chosen_set_served(built, tmp_path):
    # Candidates were overwritten in place: during a rebuild (or after one was cut short)
    # the chosen set's ONNX no longer matched frontier.json, and every load of the model
    # failed. The rebuild is staged beside the frontier and installed whole.
    from runtime.build import frontier as frontier_module
    from runtime.repository import ACTIVE_FILE, ActiveTiers

    root = _copy(built, tmp_path)
    d = root / "tiny"
    before = Frontier.read(d / FRONTIER_DIR / FRONTIER_FILE)
    ActiveTiers(("w075",), before.source_sha256, "2026-01-01T00:00:00Z", {}).write(d / ACTIVE_FILE)
    calls = []
    measure = frontier_module._Measure.__call__

    def interrupted(self, *args):
        calls.append(args[0].name)
        if len(calls) == 2:  # sampling the second candidate: Ctrl-C
            raise KeyboardInterrupt
        return measure(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(frontier_module._Measure, "__call__", interrupted)
        with pytest.raises(KeyboardInterrupt):  # another backend: a new source, a rebuild
            frontier_module.build_frontier(Repository(root), "tiny", False, 3, "torch")
    assert calls == ["w100", "w075"]
    served = Repository(root).load("tiny")
    assert served.tier_source == "frontier" and sorted(served.engines) == ["w075"]
    assert Frontier.read(d / FRONTIER_DIR / FRONTIER_FILE) == before
    assert sorted(p.name for p in root.glob("tiny/frontier.*")) == []  # staging removed


def test_a_sweep_during_a_long_candidate_leaves_the_frontier_build_alone(built, tmp_path):
    # The staging folder's age was its last new entry's: a candidate measured for over an
    # hour let another builder's (or a load's) sweep remove the folder under the build.
    from runtime.build import frontier as frontier_module
    from runtime.repository import leftovers

    root = _copy(built, tmp_path)
    measure, swept = frontier_module._Measure.__call__, []

    def long_candidate(self, where, *args):
        out = measure(self, where, *args)
        leftovers.os.utime(where.parent, (1, 1))  # an hour and more since its last entry
        deadline = time.time() + 10
        while where.parent.stat().st_mtime < 2 and time.time() < deadline:
            time.sleep(0.01)
        swept.extend(leftovers.sweep(root / "tiny"))  # what another builder's sweep does
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(leftovers, "FRESH_EVERY_S", 0.02)
        mp.setattr(frontier_module._Measure, "__call__", long_candidate)
        f = frontier_module.build_frontier(Repository(root), "tiny", False, 3, "torch")
    assert swept == []
    for c in f.candidates:  # every candidate measured is installed
        assert sha256_file(root / "tiny" / FRONTIER_DIR / c.name / "model.onnx") == c.onnx_sha256


def test_the_frontier_is_measured_with_the_backend_the_build_names(built, tmp_path):
    # innfer build --backend torch built the tiers with torch but the frontier with
    # model.yaml's first backend: auto-tiering chose on another engine's latencies.
    from runtime.build.frontier import build_frontier

    root = _copy(built, tmp_path)
    assert Frontier.read(root / "tiny" / FRONTIER_DIR / FRONTIER_FILE).backend == "onnxruntime"
    f = build_frontier(Repository(root), "tiny", False, 3, backend="torch")
    assert f.backend == "torch" and f.device.startswith("cpu-")  # cpu-<machine>-<isa>
    assert Frontier.read(root / "tiny" / FRONTIER_DIR / FRONTIER_FILE) == f
    for c in f.candidates:  # the installed files are the ones measured
        assert sha256_file(root / "tiny" / FRONTIER_DIR / c.name / "model.onnx") == c.onnx_sha256


def test_stale_frontier_builds_are_swept_and_a_young_one_is_left(tmp_path):
    import os

    from runtime.repository.leftovers import sweep

    names = ("frontier.build-0000000a", "frontier.build-0000000b", "frontier.old-0000000c")
    old, young, aside = (tmp_path / n for n in names)
    (tmp_path / "frontier").mkdir()  # in place: the one aside is a cut-short removal
    for p in (old, young, aside):
        (p / "w050").mkdir(parents=True)
    os.utime(old, (0, 0))
    sweep(tmp_path)
    assert not old.exists() and not aside.exists() and young.exists()


def test_the_frontiers_full_width_is_the_built_full_tier(tmp_path):
    # The frontier re-estimated BatchNorm statistics at every width the INN stored none
    # for - the full width included, whose own statistics are the trained ones - so its
    # w100 was another network than the tier innfer build serves. Both now sample through
    # runtime/build/sampling.py.
    import torch
    from netgen import tiny_cnn

    import runtime
    from runtime.build.pipeline import add_model

    inn = runtime.convert(tiny_cnn(), (torch.randn(1, 1, 8, 8),), fold_norms=False)
    add_model(tmp_path, "bn", inn, CONFIG)
    report = build_model(Repository(tmp_path), "bn", progress=False, repeats=2)
    by_name = {c.name: c for c in report.frontier.candidates}
    tier = Repository(tmp_path).load_record("bn", "w100")
    assert by_name["w100"].onnx_sha256 == tier.onnx_sha256
    assert by_name["w050"].onnx_sha256 != tier.onnx_sha256


def test_simulate_and_bench_plan_the_tiers_auto_tiering_chose(built, tmp_path, capsys):
    # They read profile.json (model.yaml's tiers) while the server served the chosen set:
    # `innfer simulate` predicted another server than the one running.
    from innfer.cli import main
    from runtime.repository import ACTIVE_FILE, ActiveTiers
    from sim.simulator import tiers_from_model_dir

    root = _copy(built, tmp_path)
    d = root / "tiny"
    before = {t.name for t in tiers_from_model_dir(d)[0]}
    frontier = Frontier.read(d / FRONTIER_DIR / FRONTIER_FILE)
    shaped = next(c.name for c in frontier.candidates if c.shaped)
    ActiveTiers(("w075", shaped), frontier.source_sha256, "2026-01-01T00:00:00Z", {}).write(
        d / ACTIVE_FILE
    )

    tiers, p50 = tiers_from_model_dir(d)
    assert before != {"w075", shaped} == {t.name for t in tiers} == set(p50)
    acc = {c.name: c.accuracy for c in frontier.candidates}
    assert {t.name: t.accuracy for t in tiers} == {"w075": acc["w075"], shaped: acc[shaped]}
    args = ["simulate", str(d), "--duration", "1", "--load", "0.01", "--policy", "innfer"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"the tiers auto-tiering chose (w075, {shaped}; auto_tiers.json)" in out.splitlines()[0]
    assert "tier mix" in out and "w100" not in out


def test_a_rewritten_npz_evaluation_set_is_measured_again_on_the_frontier(tmp_path):
    # The frontier's source hash named the .npz by name only: a rebuild after the file was
    # rewritten kept the candidates' old accuracies (the tiers' records hash the content).
    import torch
    from netgen import tiny_cnn

    import runtime
    from runtime.build.pipeline import add_model

    inn = runtime.convert(tiny_cnn(), (torch.randn(2, 1, 8, 8),))
    config = {**CONFIG, "evaluation": {"dataset": "mine.npz"},
              "auto_tiers": {"widths": [1.0, 0.5]}}  # fmt: skip
    d = add_model(tmp_path, "tiny", inn, config)
    x = np.random.default_rng(0).random((100, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        y = inn.sample(1.0)(torch.from_numpy(x)).argmax(1).numpy()  # the full width's answers
    np.savez(d / "mine.npz", x=x, y=y)
    report = build_model(Repository(tmp_path), "tiny", progress=False, repeats=2)
    assert report.frontier.candidate("w100").accuracy == 1.0
    np.savez(d / "mine.npz", x=x, y=(y + 1) % 10)  # every label now wrong for w100
    report = build_model(Repository(tmp_path), "tiny", progress=False, repeats=2)
    assert report.frontier.candidate("w100").accuracy == 0.0


def test_a_frontier_and_a_choice_with_fields_of_a_newer_innfer_are_read(built, tmp_path):
    # A rollback, or an older replica on the same volume, called them corrupted (review
    # helper-143).
    import json

    from runtime.repository.frontier import ActiveTiers

    root, report = built
    path = tmp_path / FRONTIER_FILE
    data = json.loads((root / "tiny" / FRONTIER_DIR / FRONTIER_FILE).read_text())
    data["measured_by"] = "innfer 9"
    for c in data["candidates"]:
        c["energy_mj"] = 1.0
    path.write_text(json.dumps(data))
    assert Frontier.read(path) == report.frontier
    choice = tmp_path / "auto_tiers.json"
    choice.write_text(json.dumps({"tiers": ["w050"], "frontier_sha256": "ab",
                                  "chosen_at": "2026-01-01T00:00:00Z", "reason": {},
                                  "undo_of": None}))  # fmt: skip
    assert ActiveTiers.read(choice).tiers == ("w050",)


def test_a_frontier_of_an_older_innfer_is_served_with_a_warning(built, tmp_path, caplog):
    import json
    import logging
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    path = root / "tiny" / FRONTIER_DIR / FRONTIER_FILE
    data = json.loads(path.read_text())
    del data["inn_sha256"], data["settings"]
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="innfer.repository"):
        Repository(root).check_frontier_inn("tiny", Frontier.read(path))
    assert "does not record the INN and model.yaml settings" in caplog.text


def test_a_corrupted_choice_serves_the_hand_written_tiers(built, tmp_path, caplog):
    # It failed the whole model ("delete it to serve the hand-written tiers" - on a
    # read-only volume there was no deleting it), where a corrupted frontier falls back
    # (review helper-146).
    import logging
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(built[0], root)
    (root / "tiny" / "auto_tiers.json").write_text("{garbage")
    with caplog.at_level(logging.WARNING, logger="innfer.repository"):
        served = Repository(root).load("tiny")
    assert served.tier_source == "model.yaml" and len(served.engines) == 2
    assert "auto_tiers.json is corrupted" in caplog.text


def test_a_choice_without_a_field_names_the_field(tmp_path):
    # "corrupted (ActiveTiers.__init__() missing 1 required positional argument: 'reason')"
    # (review helper-228): the record readers name what is missing.
    from runtime.repository import ActiveTiers, RepositoryError

    path = tmp_path / "auto_tiers.json"
    path.write_text(
        '{"tiers": ["w100"], "frontier_sha256": "x", "chosen_at": "2026-01-01T00:00:00Z"}'
    )
    with pytest.raises(RepositoryError, match=r"corrupted \(it has no reason\)"):
        ActiveTiers.read(path)


def test_report_says_a_frontier_of_a_replaced_inn_is_out_of_date(built, tmp_path, capsys):
    # innfer report printed and plotted it as current (a calibrated tier shown at its old
    # accuracy) and, with a choice on disk, failed with exit 2 (review helper-300).
    import torch

    from innfer.cli import main as cli
    from runtime.inn.model import load as load_inn

    root = _copy(built, tmp_path)
    d = root / "tiny"
    assert cli(["report", str(d), "--widths", "1", "0.5"]) == 0
    assert "out of date" not in capsys.readouterr().out
    inn = load_inn(d)
    with torch.no_grad():
        next(iter(inn.state.values())).mul_(1.5)
    inn.save(d)
    assert cli(["report", str(d), "--widths", "1", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "(out of date: " in out and "was measured on another INN" in out
    assert out.index("(out of date: ") < out.index("frontier (")


def test_the_frontier_plots_line_joins_the_batch_1_frontier_it_draws(tmp_path, monkeypatch):
    # frontier.json marks a candidate Pareto at batch 1 or max_batch; the plot (batch 1)
    # drew its line through one beaten at batch 1 - 0.1 us faster only at batch 4
    # (review helper-300).
    import matplotlib.axes

    from innfer.tiers import plot_frontier
    from runtime.repository.frontier import Candidate, Frontier, mark_pareto

    def cand(name, acc, b1, b4):
        lat = {"1": {"p50_ms": b1}, "4": {"p50_ms": b4}}
        return Candidate(name, {}, 1.0, 1, 1, acc, lat, "")

    cands = mark_pareto([cand("w100", 0.99, 4.0, 9.0), cand("w025", 0.90, 1.0, 3.0),
                         cand("s025", 0.89, 1.2, 2.9999)], (1, 4))  # fmt: skip
    assert [c.pareto for c in cands] == [True, True, True]  # s025: at batch 4 only
    frontier = Frontier(cands, "evaluation", "x", "onnxruntime", "cpu", 1, 4)
    lines = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda ax, *a, **k: lines.append(a) or real(ax, *a, **k))  # fmt: skip
    plot_frontier(frontier, [], tmp_path / "f.png")
    ((xs, ys, _),) = lines
    assert list(xs) == [1.0, 4.0] and list(ys) == [0.90, 0.99]
    # out of date: said, and not "no tier set chosen yet" (its set is not drawn; helper-303)
    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, t, **k: titles.append(t))
    plot_frontier(frontier, [], tmp_path / "f.png", stale=True)
    assert "out of date" in titles[-1] and "no tier set chosen" not in titles[-1]
