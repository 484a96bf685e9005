"""A loss that becomes NaN stops the run before its weights are saved (review helper-123):
`innfer calibrate --lr 1e9` saved a NaN tier and `innfer train --lr 1e6` a NaN INN and
checkpoint, each answering NaN at every width, with exit code 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from netgen import tiny_cnn

import runtime
from innfer.cli import main
from runtime.inn.distill import budgeted_steps
from runtime.inn.divergence import Diverged
from runtime.inn.model import load


def _calibrate(tmp_path, capsys, *flags: str, nan: bool = False) -> tuple[int, str, bytes]:
    """`innfer calibrate` of a tiny converted CNN at width 0.5 on 140 random samples (one
    NaN where ``nan``): (exit code, stderr, the INN's weights file before)."""
    torch.manual_seed(0)
    runtime.convert(tiny_cnn(), (torch.randn(2, 1, 8, 8),)).save(tmp_path / "m")
    before = (tmp_path / "m" / "inn.safetensors").read_bytes()
    x = np.random.default_rng(0).random((140, 1, 8, 8), dtype=np.float32)
    if nan:
        x[3, 0, 2, 2] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(140) % 10)
    code = main(["calibrate", str(tmp_path / "m"), "--data", str(tmp_path / "d.npz"),
                 "--widths", "0.5", *flags])  # fmt: skip
    return code, capsys.readouterr().err, before


def test_calibrate_that_diverges_fails_and_leaves_the_inn_as_it_was(tmp_path, capsys):
    code, err, before = _calibrate(tmp_path, capsys, "--seconds", "2", "--lr", "1e9")
    assert code == 2, err
    assert "the loss became" in err and "Lower the learning rate (--lr)" in err
    assert (tmp_path / "m" / "inn.safetensors").read_bytes() == before
    assert load(tmp_path / "m").tiers == {}


def test_training_that_diverges_saves_no_checkpoint(tmp_path):
    from runtime.demo.training import train_inn

    with pytest.raises(Diverged, match=r"train digits_mlp at width .*: the loss became"):
        train_inn("digits_mlp", epochs=1, lr=1e6, batch_size=64, seed=0, progress=False,
                  checkpoint=tmp_path / "ckpt")  # fmt: skip
    assert not (tmp_path / "ckpt" / "checkpoint.json").exists()


def test_distillation_stops_at_the_first_nan_step():
    losses = iter([0.5, 0.4, math.inf, 0.3])
    calls = []

    def step():
        calls.append(1)
        return next(losses)

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(Diverged, match=r"distil h050: the loss became inf at step 3"):
        budgeted_steps(step, opt, 0.1, 60.0, 10, "distil h050", False, 0)
    assert len(calls) == 3


def test_the_last_update_is_checked_before_a_tier_is_saved(tmp_path, capsys):
    # One step at --lr 1e12: its loss was finite, its update made the weights infinite, and
    # no later loss read them - a tier answering -inf was saved, exit 0 (review helper-134).
    code, err, before = _calibrate(tmp_path, capsys, "--steps", "1", "--lr", "1e12")
    assert code == 2, err
    assert "the last update made the weights (or the network's outputs) NaN" in err
    assert (tmp_path / "m" / "inn.safetensors").read_bytes() == before


def test_nan_in_the_data_is_named_not_blamed_on_the_learning_rate(tmp_path, capsys):
    # A NaN feature made the first loss NaN, and the error said to lower --lr.
    code, err, _ = _calibrate(tmp_path, capsys, "--steps", "2", nan=True)
    assert code == 2 and "NaN or infinite values (1 of its" in err and "--lr" not in err
    with pytest.raises(Diverged, match="before any weight was updated"):
        budgeted_steps(lambda: math.nan, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))],
                       lr=0.1), 0.1, 60.0, 3, "distil", False, 0)  # fmt: skip


def test_a_batch_larger_than_the_norm_sample_still_judges_the_stored_tier():
    # _keep_better re-estimated BatchNorm statistics on x[:512] in batches of batch_size:
    # "need at least one batch of 600 samples, got 512" (review helper-134).
    from runtime.inn.calibrate import calibrate

    torch.manual_seed(0)
    inn = runtime.convert(tiny_cnn(), (torch.randn(2, 1, 8, 8),), fold_norms=False)
    held = (torch.rand(200, 1, 8, 8), torch.arange(200) % 10)
    out = calibrate(inn, torch.rand(1200, 1, 8, 8), [0.5], max_steps=1, batch_size=600,
                    holdout=held, progress=False)  # fmt: skip
    assert out.info["calibration"]


def test_a_width_kept_uncalibrated_is_stored_with_the_statistics_it_was_judged_with(
    monkeypatch,
):
    # Judged with BatchNorm statistics re-estimated (as a build with an evaluation set
    # serves it), then stored without them: a build without one served the full width's
    # statistics resampled - 13.5 % where the judged network scored 85.4 % (review
    # helper-288).
    import runtime.inn.report as report
    from runtime.inn.calibrate import NORM_SAMPLES, calibrate, recompute_norm_stats, unnormed

    torch.manual_seed(0)
    inn = runtime.convert(tiny_cnn(), (torch.randn(2, 1, 8, 8),), fold_norms=False)
    x = torch.rand(600, 1, 8, 8)
    half = inn.sizes(0.5)
    scores = iter([1.0, 0.0])  # the stored (uncalibrated) width wins
    monkeypatch.setattr(report, "evaluate", lambda *a, **k: next(scores))
    held = (torch.rand(200, 1, 8, 8), torch.arange(200) % 10)
    out = calibrate(inn, x, [0.5], max_steps=1, holdout=held, progress=False)
    assert out.info["calibration"][inn.sizes_key(half)]["kept"] == "uncalibrated"
    judged = inn.sample(half)
    recompute_norm_stats(judged, x[:NORM_SAMPLES], 64)
    served = out.sample(half)
    assert not unnormed(out, served, half)  # the build re-estimates nothing more
    probe = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(served.eval()(probe), judged.eval()(probe))
