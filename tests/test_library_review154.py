"""innfer as a Python library, the way a notebook uses it (review helper-154): numbers as
numpy and torch give them, a meta-device model, a repository written from Python, a report
on a data set of the documented Protocol, a float64 model's build."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import runtime
from runtime.build.pipeline import add_model, build_model
from runtime.inn.layout import ConversionError
from runtime.repository import InvalidModelName, Repository

CONFIG = {
    "inputs": [{"name": "input", "dtype": "float32", "shape": [4]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [2]}],
    "tiers": [{"name": "w100", "width": 1.0}],
    "max_batch": 2,
}


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).to(dtype).eval()


@pytest.fixture(scope="module")
def inn():
    return runtime.convert(_mlp(), (torch.randn(2, 4),))


@pytest.mark.parametrize("width", [np.float32(0.5), torch.tensor(0.5), torch.linspace(0, 1, 3)[1]])
def test_a_width_from_numpy_or_torch_is_a_width(inn, width):
    assert inn.sizes(width) == inn.sizes(0.5)  # "not a number" before (np.float64 was)


def test_a_count_from_numpy_is_a_count_and_multiple_of_must_be_an_int(inn):
    (group,) = [g.name for g in inn.groups if not g.discrete]
    assert inn.sizes({group: np.int64(8)}) == inn.sizes({group: 8})
    with pytest.raises(ValueError, match=r"multiple_of must be an int >= 1, got 2\.5"):
        inn.sizes(0.5, multiple_of=2.5)  # a raw TypeError from math.lcm before


def test_a_model_on_the_meta_device_is_refused_with_the_way_out():
    with torch.device("meta"):
        model = _mlp()
    with pytest.raises(ConversionError, match=r"'meta' device.*load its weights first"):
        runtime.convert(model, (torch.randn(2, 4),))


@pytest.mark.parametrize("name", ["../outside", "resnet 18"])
def test_add_model_refuses_a_name_that_is_no_model_folder(inn, tmp_path, name):
    with pytest.raises(InvalidModelName):
        add_model(tmp_path / "repo", name, inn, CONFIG)
    assert not (tmp_path / "outside").exists()  # written outside the repository before
    assert not any((tmp_path / "repo").glob("*"))


def test_a_report_needs_only_the_documented_protocol(inn):
    from types import SimpleNamespace

    from runtime.inn.report import width_report

    data = SimpleNamespace(x_test=torch.randn(8, 4), y_test=torch.zeros(8, dtype=torch.long),
                           input_shape=(4,))  # fmt: skip
    rows = width_report(inn, [1.0, 0.5], data)  # AttributeError: 'x_train' before
    assert [r.width for r in rows] == [1.0, 0.5]


def test_a_float64_models_build_says_to_convert_it_in_float32(tmp_path):
    double = runtime.convert(_mlp(torch.float64), (torch.randn(2, 4, dtype=torch.float64),))
    add_model(tmp_path, "double", double, CONFIG)
    with pytest.raises(Exception, match=r"weights are float64.*model\.float\(\)"):
        build_model(Repository(tmp_path), "double", progress=False, repeats=2)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3)).eval()  # fmt: skip
    return runtime.convert(model, (torch.randn(2, 1, 6, 6),))


@pytest.mark.parametrize(
    "call, said",
    [({"widths": 0.5}, "widths must be a list of widths"),
     ({"widths": ["0.5"]}, "width must be a number in \\(0, 1\\] or a mapping, got '0.5'"),
     ({"x": torch.randn(64, 6, 6)}, r"samples of shape \[6, 6\]; the model was converted "
                                    r"with \[1, 6, 6\]"),
     ({"x": torch.randn(64, 1, 6, 6, dtype=torch.float64)}, "x is torch.float64, the model's "
                                                            "weights are torch.float32"),
     ({"x": torch.zeros(64, 1, 6, 6, dtype=torch.uint8)}, "/ 255 for 8-bit images"),
     ({"labels": torch.zeros(64)}, "labels must be class indices"),
     # one past the model's 3 classes: torch's IndexError after grid tuning (helper-298)
     ({"labels": torch.arange(64) % 4}, r"labels must be class indices in \[0, 3\) - the "
                                        r"model returns 3 classes; 16 are not \(the first: 3\)"),
     ({"seconds": float("nan")}, "seconds must be a number of seconds > 0, got nan"),
     ({"max_steps": 0}, "max_steps must be a whole number >= 1"),
     ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
     ({"keep": 0.5}, r"keep must be a list of widths"),
     ({"holdout": (torch.randn(64, 1, 6, 6),)}, r"holdout must be \(inputs, labels\)"),
     ({"holdout": (torch.randn(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))},
      r"holdout must be \(inputs, labels\): two tensors of the same non-zero length")],
)  # fmt: skip
def test_calibrate_says_what_is_wrong_with_its_arguments_before_it_runs(cnn, call, said):
    # Raw errors before: "'float' object is not iterable", "'<' not supported", a conv's
    # shape or dtype error, a cross-entropy dtype error only once fine-tuning ran.
    from runtime.inn.calibrate import calibrate

    args = {"x": torch.randn(64, 1, 6, 6), "widths": [0.5], "seconds": 1.0, "max_steps": 1,
            **call}  # fmt: skip
    with pytest.raises(ValueError, match=said):
        calibrate(cnn, args.pop("x"), args.pop("widths"), progress=False, **args)


def test_set_tier_says_it_takes_channel_counts(cnn):
    with pytest.raises(ValueError, match=r"sizes must be channel counts per group"):
        cnn.set_tier(0.5, {})


def test_a_count_for_a_fixed_group_says_it_is_fixed_not_unknown(cnn):
    # The output layer's group exists, discrete: "unknown group '4'" sent the user looking
    # for a misspelling (review helper-298).
    with pytest.raises(ValueError, match=r"group '4' is fixed at its 3 channels \(a model "
                       r"input or output.*the continuous groups are \['0'\]"):  # fmt: skip
        cnn.sample({"4": 2})
    with pytest.raises(ValueError, match=r"unknown group 'nope'"):
        cnn.sample({"nope": 2})


def test_a_model_with_two_outputs_is_scored_and_calibrated_on_its_first(tmp_path):
    # The build scored outputs[0]; evaluate (innfer report) and calibrate took .argmax of
    # the tuple: "internal error: AttributeError: 'tuple' object has no attribute 'argmax'"
    # (review helper-300).
    from runtime.inn.calibrate import calibrate
    from runtime.inn.report import evaluate

    class TwoOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
            self.head, self.embed = nn.Linear(8, 3), nn.Linear(8, 4)

        def forward(self, x):
            h = self.body(x)
            return self.head(h), self.embed(h)

    torch.manual_seed(0)
    x = torch.randn(128, 1, 6, 6)
    inn = runtime.convert(TwoOut().eval(), (x[:2],))
    full = inn.sample(1.0)
    with torch.no_grad():
        y = full(x)[0].argmax(1)
    assert evaluate(full, x, y) == 1.0
    tuned = calibrate(inn, x, [0.5], max_steps=2, labels=y, progress=False)
    small = tuned.sample(0.5)
    assert 0.0 <= evaluate(small, x, y) <= 1.0
    assert [t.shape for t in small(x[:2])] == [(2, 3), (2, 4)]
