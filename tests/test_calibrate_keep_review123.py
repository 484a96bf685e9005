"""Calibration keeps a new tier only if it beats what the build would serve without it
(review helper-123): a BatchNorm width with no statistics of its own was judged with the
full width's resampled ones (0.24 on the check) where the build re-estimates them (0.94),
so a worse calibrated tier (0.87) replaced it. Fails without the fix."""

from __future__ import annotations

import torch

from runtime.demo.training import train_inn
from runtime.inn.calibrate import NORM_SAMPLES, calibrate, recompute_norm_stats, unnormed
from runtime.inn.report import evaluate


def test_the_uncalibrated_tier_is_judged_as_the_build_serves_it():
    torch.manual_seed(0)
    inn, data = train_inn("digits_cnn_bn", epochs=1, progress=False)
    x, y = data.x_train, data.y_train
    held = (x[1000:], y[1000:])
    sizes = inn.sizes(0.375, 8)
    served = inn.sample(sizes)
    assert unnormed(inn, served, sizes)  # no statistics stored for these counts
    recompute_norm_stats(served, x[:NORM_SAMPLES])  # as runtime/build/sampling.py does
    tuned = calibrate(inn, x[:1000], [0.375], max_steps=1, multiple_of=8, labels=y[:1000],
                      holdout=held, progress=False)  # fmt: skip
    (decision,) = tuned.info["calibration"].values()
    assert decision["stored"] == evaluate(served, *held)


def test_a_small_batch_judges_the_uncalibrated_tier_too():
    # 40 samples in batches of 32 pass calibrate's check; judging the uncalibrated tier
    # re-estimated its statistics in batches of 64: "need at least one batch of 64"
    # (review helper-131).
    torch.manual_seed(0)
    inn, data = train_inn("digits_cnn_bn", epochs=1, progress=False)
    x, y = data.x_train, data.y_train
    tuned = calibrate(inn, x[:40], [0.375], max_steps=1, multiple_of=8, labels=y[:40],
                      batch_size=32, holdout=(x[1000:], y[1000:]), progress=False)  # fmt: skip
    assert len(tuned.info["calibration"]) == 1
