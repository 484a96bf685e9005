"""Norm statistics belong to the sampling they were measured with (review helper-123):
stored under the channel counts alone, `innfer train`'s point-sampled statistics were
applied to model.yaml's `method: cell` network too (accuracy 0.26 where its own statistics
gave 0.84), and the build skipped re-estimating them because the counts were "calibrated"."""

from __future__ import annotations

import torch
from netgen import tiny_cnn

import runtime
from runtime.inn.calibrate import reestimate_norms, unnormed
from runtime.inn.model import load


def _means(module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers() if n.endswith("running_mean")}


def test_statistics_apply_only_to_the_sampling_they_were_measured_on(tmp_path):
    torch.manual_seed(0)
    inn = runtime.convert(tiny_cnn(), (torch.randn(2, 1, 8, 8),), fold_norms=False)
    x = torch.randn(256, 1, 8, 8)
    sizes = inn.sizes(0.5)
    resampled = {m: _means(inn.sample(sizes, m, calibrated=False)) for m in ("point", "cell")}
    reestimate_norms(inn, 0.5, x, method="point")  # as innfer train stores them
    assert inn.calibrated(sizes, "point") and not inn.calibrated(sizes, "cell")
    point, cell = inn.sample(sizes, "point"), inn.sample(sizes, "cell")
    assert any(not torch.equal(v, resampled["point"][k]) for k, v in _means(point).items())
    for k, v in _means(cell).items():  # cell-averaged weights keep their own resampling
        assert torch.equal(v, resampled["cell"][k]), k
    assert unnormed(inn, cell, sizes, "cell") and not unnormed(inn, point, sizes, "point")
    # "auto" at 50 % is point sampling: the same network, the same statistics
    assert inn.calibrated(sizes, "auto")

    inn.save(tmp_path / "m")
    back = load(tmp_path / "m")  # the record survives a save
    assert back.calibrated(sizes, "point") and not back.calibrated(sizes, "cell")


def test_statistics_stored_before_the_sampling_was_recorded_apply_as_before():
    torch.manual_seed(0)
    inn = runtime.convert(tiny_cnn(), (torch.randn(2, 1, 8, 8),), fold_norms=False)
    sizes = inn.sizes(0.5)
    reestimate_norms(inn, 0.5, torch.randn(256, 1, 8, 8), method="point")
    del inn.info["norm_stats_sampling"]  # an INN saved before it was recorded
    assert inn.calibrated(sizes, "cell")
    cell, point = _means(inn.sample(sizes, "cell")), _means(inn.sample(sizes, "point"))
    assert all(torch.equal(cell[k], point[k]) for k in cell)
