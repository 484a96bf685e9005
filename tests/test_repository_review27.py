"""Second review of the repository, config and CLI code (review 27): each test failed before
its fix. The repositories are torch-free (tests/serverutil.py: ONNX graphs from onnx.helper,
real ONNX Runtime engines, a hand-written frontier) except where an INN is the point."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading

import numpy as np
import pytest
import yaml
from serverutil import add_frontier, add_onnx_model, tiny_cnn

import runtime.atomic
from innfer.cli import main as cli
from runtime.configspec import read_yaml
from runtime.repository import ACTIVE_FILE, FRONTIER_DIR, ActiveTiers, Repository, RepositoryError
from runtime.repository.config import ConfigError, ModelConfig
from sim.tiering import Traffic

IO = {
    "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
}
TIERS = [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}]


def _load_yaml(tmp_path, text: str) -> ModelConfig:
    d = tmp_path / "tiny"
    d.mkdir(exist_ok=True)
    (d / "model.yaml").write_text(text)
    return ModelConfig.load(d / "model.yaml")


# -- interrupted and concurrent writes -----------------------------------------------------
def test_two_writers_of_one_file_in_one_process_each_write_it_whole(tmp_path, monkeypatch):
    """Two threads of one process (or two pods on a shared volume whose apply runs as the same
    pid) shared one temporary name: the second rename found nothing to move."""
    barrier = threading.Barrier(2, timeout=10)
    replace = runtime.atomic.os.replace

    def both_written_first(src, dst):  # both temporaries are complete before either rename
        barrier.wait()
        replace(src, dst)

    monkeypatch.setattr(runtime.atomic.os, "replace", both_written_first)
    path = tmp_path / "profile.json"
    payloads = [{"writer": i, "data": [i] * 10000} for i in range(2)]
    errors = []

    def write(i):
        try:
            runtime.atomic.write_json(path, payloads[i])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text()) in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temporaries left


# -- model.yaml ----------------------------------------------------------------------------
def test_a_key_given_twice_in_model_yaml_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys silently: a second tiers: block further down
    dropped the first one's tiers (w050 was simply not served)."""
    text = yaml.safe_dump({**IO, "tiers": TIERS}, sort_keys=False)
    text += "tiers:\n- {name: w025, width: 0.25}\n"
    with pytest.raises(
        ConfigError, match=r"(?s)model\.yaml: .*key 'tiers' is given twice.*model\.yaml\", line 18"
    ):
        _load_yaml(tmp_path, text)
    # YAML merge keys may still be overridden: that is what they are for.
    (tmp_path / "m.yaml").write_text("base: &b {a: 1, c: 2}\nx:\n  <<: *b\n  a: 3\n")
    assert read_yaml(tmp_path / "m.yaml")["x"] == {"a": 3, "c": 2}


def test_group_counts_keyed_by_number_in_yaml_name_the_group(tmp_path):
    """An nn.Sequential's groups are named '0', '3', ...; YAML reads `{0: 4}` with an int key,
    and the build refused "unknown group 0" while listing group '0'."""
    import torch
    from netgen import tiny_cnn as torch_cnn

    import runtime

    text = yaml.safe_dump({**IO, "tiers": TIERS}, sort_keys=False)
    text = text.replace("tiers:\n", "tiers:\n- {name: custom, width: {0: 4}}\n")
    cfg = _load_yaml(tmp_path, text)
    assert cfg.tier("custom").width == {"0": 4}
    inn = runtime.convert(torch_cnn(), (torch.randn(1, 1, 8, 8),))
    assert inn.sizes(cfg.tier("custom").width)["0"] == 4  # the group the build samples
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.width\.1\.5: got 1\.5, expected a group"):
        ModelConfig.from_dict({**IO, "tiers": [{"name": "c", "width": {1.5: 4}}]})


def test_an_accuracy_floor_needs_an_evaluation():
    """Without an evaluation the frontier's accuracy is the FLOPs fraction: a floor of 0.9
    silently left only the candidates with 90 % of the full width's FLOPs."""
    goals = {"auto_tiers": {"accuracy_floor": 0.9}}
    with pytest.raises(ConfigError, match=r"auto_tiers\.accuracy_floor: got 0\.9.*evaluation"):
        ModelConfig.from_dict({**IO, "tiers": TIERS, **goals})
    cfg = ModelConfig.from_dict(
        {**IO, "tiers": TIERS, **goals, "evaluation": {"dataset": "digits"}}
    )
    assert cfg.auto_tiers.accuracy_floor == 0.9


# -- profile staleness ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo27")
    add_onnx_model(root, "tiny", tiny_cnn, {**IO, "tiers": TIERS, "max_batch": 4}, repeats=3)
    return root


def _copy(src, tmp_path):
    shutil.copytree(src, tmp_path / "repo")
    return tmp_path / "repo"


def test_a_profile_timed_with_other_threads_is_measured_again_at_load(onnx_repo, tmp_path, caplog):
    """model.yaml's threads edited after the build: the engines ran with 2 intra-op threads
    and were planned with the times of 1 (the demo and `innfer build` re-profile for it; a
    load did not)."""
    root = _copy(onnx_repo, tmp_path)
    path = root / "tiny" / "model.yaml"
    stored = json.loads((root / "tiny" / "profile.json").read_text())
    assert stored["threads"] == 1
    assert Repository(root).load("tiny").profile == stored  # as built: kept
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "threads": 2}))
    with caplog.at_level("WARNING", logger="innfer.repository"):
        served = Repository(root).load("tiny")
    assert served.profile["threads"] == 2 and set(served.profile["tiers"]) == {"w100", "w050"}
    assert "measured with 1 intra-op threads" in caplog.text and "re-measured" in caplog.text


def test_a_profile_of_another_backend_version_is_measured_again_at_load(onnx_repo, tmp_path):
    """Its engines are rebuilt (the cache key holds the version), and the profile that timed
    the old ones was trusted."""
    root = _copy(onnx_repo, tmp_path)
    profile = root / "tiny" / "profile.json"
    stored = json.loads(profile.read_text())
    profile.write_text(json.dumps({**stored, "backend_version": "0.0.1"}))
    served = Repository(root).load("tiny")
    assert served.profile["backend_version"] == stored["backend_version"]
    assert served.profile["measured_at"] >= stored["measured_at"]


# -- auto-tiering files and apply ----------------------------------------------------------
CANDIDATES = {"w100": (1.0, 0.90), "w075": (0.75, 0.95), "w050": (0.5, 0.85), "w025": (0.25, 0.7)}


@pytest.fixture(scope="module")
def auto_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto27")
    goals = {"max_tiers": 2, "simulate_requests": 300, "rebuild": {"min_gain": 0.0}}
    config = {**IO, "tiers": TIERS, "max_batch": 4, "default_latency_budget_ms": 200,
              "auto_tiers": goals}  # fmt: skip
    d = add_onnx_model(root, "tiny", tiny_cnn, config, repeats=3)
    add_frontier(d, tiny_cnn, CANDIDATES)
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.exponential(1 / 200, 300))
    Traffic(t - t[0], rng.uniform(20, 100, 300), np.ones(300, dtype=int)).write(root / "t.csv")
    return root


@pytest.mark.parametrize("tiers", [[], ["w075", "w075"], "w075"])
def test_a_choice_that_is_not_a_set_of_names_is_refused(auto_repo, tmp_path, tiers, caplog):
    """auto_tiers.json with no tiers loaded a model without any (the runtime then failed on
    max() of nothing, INTERNAL); a repeated name served one engine twice over; a string was
    read as one tier per letter. Refused as corrupted - and model.yaml's tiers served, as for
    a corrupted frontier (review helper-146)."""
    import logging

    root = _copy(auto_repo, tmp_path)
    path = root / "tiny" / ACTIVE_FILE
    path.write_text(json.dumps({"tiers": tiers, "frontier_sha256": "test-frontier",
                                "chosen_at": "2026-01-01T00:00:00Z", "reason": {}}))  # fmt: skip
    with pytest.raises(RepositoryError, match=r"auto_tiers\.json is corrupted .*tiers: got"):
        ActiveTiers.read(path)
    with caplog.at_level(logging.WARNING, logger="innfer.repository"):
        served = Repository(root).load("tiny")
    assert served.tier_source == "model.yaml" and "tiers: got" in caplog.text


def test_apply_never_writes_a_set_whose_onnx_the_frontier_did_not_measure(auto_repo, tmp_path):
    """apply built and ran a rewritten candidate's ONNX and wrote the set; the next load then
    refused it (its sha256 is not the frontier's) and served nothing of the model."""
    root = _copy(auto_repo, tmp_path)
    frontier = root / "tiny" / FRONTIER_DIR
    shutil.copy(frontier / "w050" / "model.onnx", frontier / "w075" / "model.onnx")
    code = cli(["tiers", "apply", str(root), "tiny", "--traffic", str(root / "t.csv")])
    assert code == 2
    assert not (root / "tiny" / ACTIVE_FILE).exists()
    assert sorted(Repository(root).load("tiny").engines) == ["w050", "w100"]


def test_a_chosen_candidates_onnx_mismatch_names_the_frontier_file(auto_repo, tmp_path, caplog):
    """The load named frontier/<tier>/tier.json, a file that does not exist. (Since review
    168 such a load serves model.yaml's tiers, saying why.)"""
    root = _copy(auto_repo, tmp_path)
    ActiveTiers(("w075", "w025"), "test-frontier", "2026-01-01T00:00:00Z", {}).write(
        root / "tiny" / ACTIVE_FILE
    )
    assert sorted(Repository(root).load("tiny").engines) == ["w025", "w075"]
    frontier = root / "tiny" / FRONTIER_DIR
    shutil.copy(frontier / "w050" / "model.onnx", frontier / "w075" / "model.onnx")
    with caplog.at_level("WARNING", logger="innfer.repository"):
        served = Repository(root).load("tiny")
    assert served.tier_source == "model.yaml"
    assert re.search(r"w075/model\.onnx does not match .*frontier\.json", caplog.text)


def test_an_atomic_write_reaches_the_disk_before_its_rename(tmp_path, monkeypatch):
    """Without an fsync of the temporary file, a node losing power after the rename can come
    back with the new name on an empty or partial file (the rename is journalled first)."""
    events = []
    fsync, replace = runtime.atomic.os.fsync, runtime.atomic.os.replace

    def recorded_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_replace(src, dst):
        events.append(("replace", str(src)))
        replace(src, dst)

    monkeypatch.setattr(runtime.atomic.os, "fsync", recorded_fsync)
    monkeypatch.setattr(runtime.atomic.os, "replace", recorded_replace)
    path = tmp_path / "tier.json"
    runtime.atomic.write_json(path, {"x": 1})
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] == events[1][1]  # the temporary file itself, before its rename
    assert events[2][1] == str(tmp_path)  # then the directory that holds the new name
    assert json.loads(path.read_text()) == {"x": 1}


def test_a_model_yaml_that_is_a_broken_link_or_a_folder_is_listed_and_says_what_it_is(tmp_path):
    # Review helper-183: a model.yaml linked to a ConfigMap's missing ..data was "no
    # model.yaml: write one" and "unknown model" - for a file that is there.
    from runtime.configspec import ConfigError
    from runtime.repository import Repository

    for name in ("linked", "folder"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "inn.json").write_text("{}")
    (tmp_path / "linked" / "model.yaml").symlink_to("..data/model.yaml")
    (tmp_path / "folder" / "model.yaml").mkdir()
    repo = Repository(tmp_path)
    assert repo.names() == ["folder", "linked"] and repo.unconfigured() == []
    with pytest.raises(ConfigError, match=r"a link to \.\.data/model\.yaml, which does not exist"):
        repo.config("linked")
    with pytest.raises(ConfigError, match="is a directory"):
        repo.config("folder")


def test_a_model_folder_that_cannot_be_read_is_not_said_to_be_missing(tmp_path, monkeypatch):
    # An unreadable folder (mode 000, another owner) read as "not found: the repository has
    # no mlp/model.yaml (models here: mlp, ...)" - listed, yet missing - where its load's
    # PermissionError names the owner/mode fix (review helper-271). Root reads any folder,
    # so the check's answer is made as an unreadable folder's.
    import pathlib

    from runtime.repository import ModelNotFound, Repository

    (tmp_path / "mlp").mkdir()
    (tmp_path / "mlp" / "model.yaml").write_text("{}")
    real = pathlib.Path.is_symlink

    def denied(self):
        if self.name == "model.yaml":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "is_symlink", denied)
    assert Repository(tmp_path).model_dir("mlp") == tmp_path / "mlp"
    with pytest.raises(ModelNotFound, match=r"no nope/model\.yaml"):
        monkeypatch.setattr(pathlib.Path, "is_symlink", real)
        Repository(tmp_path).model_dir("nope")
