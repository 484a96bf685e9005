"""The offline operator tools' edges (review 191): `tiers apply --live` naming a tier
twice, `simulate` with an unknown policy after good ones, `--host-ms inf`, and a timestamp
file that opens with a comment holding a comma."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from test_auto_tiers import _auto_model, _traffic

from innfer.cli import main as cli
from sim.shared_core import host_ms
from sim.traces import recorded


def test_apply_refuses_a_live_set_naming_a_tier_twice(tmp_path, capsys):
    """Counted twice for memory, a set within the goals read as breaking them and was
    applied again (its rebuild interval reset)."""
    _auto_model(tmp_path)
    _traffic(200, (20, 100), n=50).write(tmp_path / "t.csv")
    argv = ["tiers", "apply", str(tmp_path), "tiny", "--traffic", str(tmp_path / "t.csv"),
            "--live", "frontier:w075,w075"]  # fmt: skip
    assert cli(argv) == 2
    assert "--live: got 'frontier:w075,w075', which names w075 twice" in capsys.readouterr().err


def test_simulate_refuses_an_unknown_policy_before_it_runs_any(tmp_path, capsys):
    """One after good ones was refused once they had run: their results and --json lost."""
    _auto_model(tmp_path)
    out = tmp_path / "s.json"
    argv = ["simulate", str(tmp_path / "tiny"), "--policy", "innfer", "--policy", "bogus",
            "--duration", "0.05", "--json", str(out)]  # fmt: skip
    assert cli(argv) == 2
    said = capsys.readouterr()
    assert "unknown policy 'bogus'" in said.err and "innfer (poisson" not in said.out
    assert not out.exists()


@pytest.mark.parametrize("text", ["inf,1", "1,1e308", "-1,1"])
def test_host_ms_must_be_finite_and_bounded(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"each in \[0, 10000\]"):
        host_ms(text)
    assert host_ms("1.1,0.7") == (1.1, 0.7, 0.0)


def test_a_timestamp_file_opening_with_a_comment_is_timestamps(tmp_path):
    """'# arrivals, in seconds' on the first line was read as a misspelt CSV header."""
    f = tmp_path / "t.txt"
    f.write_text("# arrivals, in seconds: a comment longer than sixty-four bytes, still\n"
                 "0.0\n0.1\n0.2\n")  # fmt: skip
    assert recorded(f) is None  # bare timestamps, not a traffic CSV
    g = tmp_path / "t.csv"
    g.write_text("# recorded by innfer, at a replica\narrival_s,budget_ms\n0.0,20\n0.5,30\n")
    traffic = recorded(g)
    assert traffic is not None
    np.testing.assert_allclose(traffic.budget_ms, [20.0, 30.0])


def test_suggest_json_holds_the_verdict_the_table_prints(tmp_path, capsys):
    """The JSON had the gain but not the verdict nor min_gain: a script had to re-derive
    the rule (gain >= min_gain, or the live set breaking a goal, or the same set)."""
    import json

    _auto_model(tmp_path)
    _traffic(200, (20, 100), n=300).write(tmp_path / "t.csv")
    out = tmp_path / "s.json"
    argv = ["tiers", "suggest", str(tmp_path / "tiny"), "--traffic", str(tmp_path / "t.csv"),
            "--json", str(out)]  # fmt: skip
    assert cli(argv) == 0
    table = capsys.readouterr().out
    said = json.loads(out.read_text())
    assert said["verdict"] in ("apply", "keep") and said["min_gain"] >= 0
    shown = f"-> {said['verdict']} ({said['reason']})" if said["reason"] else said["verdict"]
    assert shown in table, (shown, table)


def test_report_with_png_plots_the_frontier_beside_it_not_in_the_model(tmp_path, capsys):
    """`report --png PATH` still wrote <model>/frontier.png: a read-only model folder failed
    although the user had said where to write."""
    import torch
    from netgen import tiny_cnn

    import runtime

    _auto_model(tmp_path / "repo")
    model = tmp_path / "repo" / "tiny"
    runtime.convert(tiny_cnn(), (torch.randn(1, 1, 8, 8),)).save(model)  # report reads an INN
    png = tmp_path / "out" / "r.png"
    png.parent.mkdir()
    argv = ["report", str(model), "--widths", "1.0", "0.5", "--png", str(png)]
    assert cli(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "r-frontier.png").is_file()
    assert not (model / "frontier.png").exists()


def test_bench_says_a_short_windows_length_and_a_recorded_files_own_rate(
    tmp_path, monkeypatch, capsys
):
    """'over 0 s' for a 0.2 s run; a 3-request file of 1 s read '0.1/s over 30 s' where
    `tiers suggest` said 3/s of the same file."""
    from serverutil import fake_run_load
    from test_sim_review import _bench_model

    d = _bench_model(tmp_path)
    fake_run_load(monkeypatch)
    assert cli(["bench", str(d), "--duration", "0.2", "--load", "5"]) == 0
    assert " over 0.2 s to " in capsys.readouterr().out
    f = tmp_path / "t.csv"
    f.write_text("arrival_s,budget_ms\n0.0,50\n0.5,50\n1.0,50\n")
    argv = ["bench", str(d), "--trace", "file", "--trace-file", str(f), "--duration", "30"]
    assert cli(argv) == 0
    assert "(2.0/s over the 1 s they came in)" in capsys.readouterr().out  # 2 gaps in 1 s


def test_traffic_csv_comments_anywhere_keep_the_files_line_numbers(tmp_path):
    """Comments after the header were read as data, errors counted lines from the header,
    a file of only comments had "unknown columns", and a long preamble made the file read
    as bare timestamps (review 193)."""
    from sim.tiering import Traffic
    from sim.traces import read_trace

    f = tmp_path / "t.csv"
    f.write_text("# a\n# b\narrival_s,budget_ms\n# warm-up below\n0.0,10\n0.1,abc\n")
    with pytest.raises(ValueError, match=r"t.csv:6: not numbers"):
        Traffic.read(f)
    f.write_text("# only, comments\n\n# still nothing\n")
    with pytest.raises(ValueError, match="no header: the file holds only comments"):
        Traffic.read(f)
    f.write_text("".join(f"# preamble line {i}, long enough\n" for i in range(300))
                 + "arrival_s,budget_ms\n0.0,10\n0.5,12\n")  # fmt: skip
    assert recorded(f) is not None
    np.testing.assert_allclose(read_trace(f), [0.0, 0.5])


def test_a_timestamp_file_with_a_bom_reads_and_csv_rows_without_a_header_say_so(tmp_path):
    # A file saved with a UTF-8 BOM was refused ("not a timestamp in seconds: '\ufeff0'")
    # while a traffic CSV with one was read; rows of a CSV without its header were called
    # "not a timestamp" with no word of the header (review helper-236).
    from sim.traces import read_trace

    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff0\n0.5\n2\n".encode())
    assert read_trace(bom).tolist() == [0.0, 0.5, 2.0]
    rows = tmp_path / "rows.csv"
    rows.write_text("0.5,30\n0.7,40\n")
    with pytest.raises(ValueError, match=r"needs its header first: arrival_s,budget_ms"):
        read_trace(rows)
