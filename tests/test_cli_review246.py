"""Review helper-246's findings on train / calibrate / demo: each test failed before its fix."""

from __future__ import annotations

import argparse

import pytest

from innfer import cli
from runtime.flock import Busy, one_run


def test_a_second_run_on_a_folder_is_refused_while_the_first_holds_it(tmp_path, capsys):
    # Two calibrations (or trainings) of one folder at once each saved over the other's
    # result; both printed "saved". The second is now refused at once, naming the first.
    out = tmp_path / "inn"
    with one_run(out, "calibrated"):
        code = cli.main(["train", "--model", "digits_mlp", "--out", str(out), "--epochs", "1"])
        assert code == 2
        err = capsys.readouterr().err
        assert f"{out} is being calibrated by pid" in err and "another --out" in err
    with (
        one_run(out, "trained"),
        pytest.raises(Busy, match="is being trained"),
        one_run(out, "calibrated"),
    ):
        pass


def test_demo_widths_in_another_order_are_the_same_recipe():
    # --widths 0.25 0.5 0.75 1 retrained what --widths 1 0.75 0.5 0.25 had trained
    args = argparse.Namespace(model="digits_mlp", seed=0, epochs=1, convert=False,
                              widths=[1.0, 0.75, 0.5, 0.25])  # fmt: skip
    again = argparse.Namespace(**{**vars(args), "widths": [0.25, 0.5, 0.75, 1.0, 0.5]})
    assert cli._demo_recipe(again) == cli._demo_recipe(args)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["demo", "--model", "digits_mlp", "--serve"], "--serve: --model minilm's"),
        (["demo", "--model", "digits_mlp", "--calibrate-seconds", "5"], "--calibrate-seconds"),
        (["demo", "--model", "minilm", "--epochs", "3", "--seed", "7"],
         "--epochs, --seed: the image demos'"),
    ],
)  # fmt: skip
def test_flags_another_command_reads_are_refused_not_ignored(tmp_path, capsys, argv, said):
    # The image demo built and exited with --serve; minilm converted as ever with --epochs
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main([*argv, "--repository", str(tmp_path)] if argv[0] == "demo" else argv) == 2
    assert said in capsys.readouterr().err


def test_report_counts_flops_of_a_one_input_id_model():
    # "no input shape (... there is no model.yaml with one input)" of a model.yaml with one
    # int64 input (review helper-248): its example is ids, as the build's profile feeds them
    from runtime.repository.config import ModelConfig

    config = ModelConfig.from_dict({
        "inputs": [{"name": "ids", "dtype": "int64", "shape": [6]}],
        "outputs": [{"name": "logits", "shape": [4]}], "tiers": [{"name": "w100", "width": 1.0}],
    })  # fmt: skip
    (ids,) = cli._report_example(config)
    assert ids.dtype.is_floating_point is False and tuple(ids.shape) == (1, 6)
    floats = ModelConfig.from_dict({
        "inputs": [{"name": "x", "shape": [3]}], "outputs": [{"name": "y", "shape": [2]}],
        "tiers": [{"name": "w100", "width": 1.0}],
    })  # fmt: skip
    assert cli._report_example(floats) is None  # one float input: its shape, as before
