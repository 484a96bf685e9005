"""Leftovers of interrupted writers in a model's folder (runtime.repository.leftovers): a
SIGKILL runs no ``finally``, and nothing removed what it left (review helper-150)."""

from __future__ import annotations

import os
import time

from runtime.repository.leftovers import STALE_S, sweep


def _aged(path, seconds: float):
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


def _file(path, seconds: float = 2 * STALE_S):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 100)
    return _aged(path, seconds)


def test_stale_temporary_files_and_frontier_builds_go_and_the_rest_stays(tmp_path):
    m = tmp_path / "mnist"
    gone = [
        _file(m / "tiers" / "w050" / ".model.onnx.4242-1a2b3c4d.tmp"),
        _file(m / ".inn.safetensors.17-0badcafe.tmp"),
        _file(m / ".auto_tiers.json.9-00ff00ff.tmp"),
    ]
    stale_build = m / "frontier.build-8da9e7ad"
    _file(stale_build / "w050" / "model.onnx")
    _aged(stale_build, 2 * STALE_S)
    aside = m / "frontier.old-358fd015"  # a replaced frontier: any age
    _file(aside / "frontier.json", 0)
    tier_build = m / "tiers" / "w050.build-0a1b2c3d"  # a tier export's, killed
    _file(tier_build / "model.onnx")
    _aged(tier_build, 2 * STALE_S)
    tier_aside = m / "tiers" / "w050.old-0a1b2c3e"  # a replaced tier: any age
    _file(tier_aside / "tier.json", 0)
    kept = [
        _file(m / "tiers" / "w050" / ".model.onnx.4242-1a2b3c4e.tmp", 60),  # being written
        _file(m / "tiers" / "w050" / "model.onnx"),
        _file(m / ".hidden"),
        _file(m / "frontier" / "w050" / "model.onnx"),
        _file(m / "engines" / "abc" / ".manifest.json.1-1a2b3c4d.tmp"),  # the cache's own
    ]
    young_build = m / "frontier.build-00000000"  # another builder's, still running
    _file(young_build / "w025" / "model.onnx", 0)
    removed = sweep(m)
    assert sorted(removed) == sorted(
        str(p.relative_to(m)) for p in (*gone, stale_build, aside, tier_build, tier_aside)
    )
    assert not any(p.exists() for p in (*gone, stale_build, aside, tier_build, tier_aside))
    assert all(p.exists() for p in kept) and young_build.exists()
    assert sweep(m) == []


def test_a_replaced_folder_with_nothing_in_its_place_is_put_back(tmp_path):
    # A swap killed between its two renames left tiers/w050.old-* and no tiers/w050: the
    # only copy of the tier, which every later sweep deleted (review helper-152). It is put
    # back once older than a swap takes; a younger one may be a swap in progress.
    m = tmp_path / "mnist"
    older = _file(m / "tiers" / "w050.old-0a1b2c3d" / "tier.json").parent
    _aged(older, 2 * STALE_S)
    newest = _file(m / "tiers" / "w050.old-0a1b2c3e" / "model.onnx").parent
    _aged(newest, 120)
    young = _file(m / "frontier.old-0a1b2c3f" / "frontier.json", 0).parent
    _aged(young, 0)
    assert sweep(m) == ["tiers/w050.old-0a1b2c3d"]  # the older copy goes once one is back
    assert (m / "tiers" / "w050" / "model.onnx").exists() and not newest.exists()
    assert young.exists() and not (m / "frontier").exists()  # not yet: maybe mid-swap
    assert sweep(m, now=time.time() + 120) == []
    assert (m / "frontier" / "frontier.json").exists()


def _swap_with(tmp_path, monkeypatch, second):
    """atomic.replace_directory of t.build over t, ``second(out)`` run in place of its
    second rename (the one that puts the new folder in)."""
    from runtime import atomic

    out, new = tmp_path / "t", tmp_path / "t.build"
    _file(out / "mine", 0)
    _file(new / "new", 0)
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            second(out)
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    return atomic.replace_directory(new, out), out


def test_a_swap_keeps_another_builders_folder_that_came_first(tmp_path, monkeypatch):
    # Two builds of one tier at once: the second's rename-in failed ("Directory not
    # empty"), the build exited 2 and left the old folder aside (review helper-152).
    placed, out = _swap_with(tmp_path, monkeypatch, lambda out: _file(out / "theirs", 0))
    assert placed is False and sorted(os.listdir(out)) == ["theirs"]
    assert sorted(os.listdir(tmp_path)) == ["t", "t.build"]  # ours is the caller's to drop


def test_a_swap_interrupted_between_its_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    def interrupted(out):
        raise KeyboardInterrupt

    try:
        _swap_with(tmp_path, monkeypatch, interrupted)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt was swallowed")
    assert sorted(os.listdir(tmp_path / "t")) == ["mine"]  # it was left aside, the only copy


def test_a_sweep_in_the_middle_of_a_swap_leaves_it_alone(tmp_path, monkeypatch):
    # The folder renamed aside kept its own (old) time: a load's sweep between the two
    # renames took it for a killed swap's only copy and put it back, and the build's new
    # folder was then dropped as "another builder's came first" (review of this session).
    _aged(_file(tmp_path / "t" / "mine", 0).parent, 2 * STALE_S)
    placed, out = _swap_with(tmp_path, monkeypatch, lambda out: sweep(out.parent))
    assert placed is True and sorted(os.listdir(out)) == ["new"]


def test_a_folder_kept_fresh_is_touched_while_its_block_runs_and_not_after(tmp_path, monkeypatch):
    from runtime.repository import leftovers

    monkeypatch.setattr(leftovers, "FRESH_EVERY_S", 0.02)
    staging = tmp_path / "frontier.build-0000000a"
    with leftovers.kept_fresh(staging):
        time.sleep(0.05)  # not made yet: nothing to touch, and no error
        staging.mkdir()
        _aged(staging, 2 * STALE_S)
        deadline = time.time() + 10
        while time.time() - staging.stat().st_mtime > 60 and time.time() < deadline:
            time.sleep(0.01)
        assert sweep(tmp_path) == [] and staging.exists()  # a live build's: young
    _aged(staging, 2 * STALE_S)
    time.sleep(0.1)
    assert sweep(tmp_path) == ["frontier.build-0000000a"]  # its builder gone: stale
