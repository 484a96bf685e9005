"""``innfer simulate`` on a model with ``instances`` > 1: the server runs that many batches
at once and the simulated device ran one, with nothing said (review helper-314)."""

from __future__ import annotations

from test_auto_tiers import _auto_model

from innfer.cli import main as cli


def _with_instances(tmp_path, n: int):
    d = _auto_model(tmp_path)
    path = d / "model.yaml"
    path.write_text(path.read_text() + f"instances: {n}\n")
    return d


def test_simulate_says_where_instances_differ_from_its_slots(tmp_path, capsys):
    d = _with_instances(tmp_path, 2)
    argv = ["simulate", str(d), "--duration", "0.05", "--policy", "innfer"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "model.yaml has instances: 2" in out and "pass --slots 2" in out
    assert cli([*argv, "--slots", "2"]) == 0  # simulating the server's two: nothing to say
    assert "model.yaml has instances" not in capsys.readouterr().out


def test_simulate_says_nothing_for_one_instance(tmp_path, capsys):
    d = _with_instances(tmp_path, 1)
    assert cli(["simulate", str(d), "--duration", "0.05", "--policy", "innfer"]) == 0
    assert "model.yaml has instances" not in capsys.readouterr().out


def test_simulate_says_nothing_for_a_torch_model_which_the_server_plans_with_one(tmp_path, capsys):
    # The torch backend runs one batch per tier at a time (one module behind a lock): the
    # server plans such a model with 1 whatever instances says, and the note told the user
    # to simulate --slots 4 (helper-316).
    import json

    d = _with_instances(tmp_path, 4)
    profile = d / "profile.json"
    profile.write_text(json.dumps({**json.loads(profile.read_text()), "backend": "torch"}))
    assert cli(["simulate", str(d), "--duration", "0.05", "--policy", "innfer"]) == 0
    assert "model.yaml has instances" not in capsys.readouterr().out
