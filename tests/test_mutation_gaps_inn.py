"""``IntegralModel.sample(..., calibrated=False)`` after a tier was calibrated (review
helper-304, mutation N02: the flag was ignored and the calibrated weights came back)."""

from __future__ import annotations

import torch
from torch import nn

from runtime import convert


def test_sample_uncalibrated_returns_the_resampled_network_not_the_stored_tier():
    # A second `innfer calibrate`, distillation and the sensitivity pass start from (and
    # report "before" as) sample(sizes, calibrated=False): given the stored tier instead,
    # they started from the old calibration and reported it as the uncalibrated network.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 3)).eval()  # fmt: skip
    x = torch.randn(4, 8)
    inn = convert(net, (x,))
    sizes = inn.sizes(0.5)
    with torch.no_grad():
        before = inn.sample(sizes)(x)
        tuned = inn.sample(sizes)
        for p in tuned.parameters():
            p.zero_()  # recognisable "calibrated" weights
        inn.set_tier(sizes, tuned.state_dict())
        calibrated = inn.sample(sizes)(x)
        uncalibrated = inn.sample(sizes, calibrated=False)(x)
    assert (calibrated == 0).all()  # sample() serves the stored tier
    assert not (before == 0).all()
    torch.testing.assert_close(uncalibrated, before, rtol=0, atol=0)  # as before calibration
