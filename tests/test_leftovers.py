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
        [str(p.relative_to(m)) for p in gone]
        + [stale_build.name, aside.name]
        + [tier_build.name, tier_aside.name]
    )
    assert not any(p.exists() for p in (*gone, stale_build, aside, tier_build, tier_aside))
    assert all(p.exists() for p in kept) and young_build.exists()
    assert sweep(m) == []
