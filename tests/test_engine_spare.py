"""Engines a read-only repository lacks are built in ``engine_cache_spare``
(runtime/repository/cache.py ``EngineCache.spare``): KServe mounts the repository
read-only, and a pod on a node whose device or ONNX Runtime version the engines were not
built for could not load the model at all (review 205). The read-only volume is simulated:
this suite may run as root, whom file modes do not stop, so the repository cache's build
raises the PermissionError a read-only mount gives (the rest is the real ONNX Runtime)."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest

from runtime.engines import EngineError
from runtime.repository import Repository
from runtime.repository import cache as cache_module
from runtime.repository.cache import EngineCache


@pytest.fixture
def read_only(monkeypatch):
    """Any cache under ``roots`` cannot be written, as on a read-only mount: its probe
    fails, and a build started there anyway fails (counted in ``roots.builds``)."""
    roots = _Roots()
    real_build, real_writable = EngineCache._build, cache_module._writable

    def build(self, backend, onnx_path, entry, options, fields):
        if roots.under(entry):
            roots.builds += 1
            raise PermissionError(13, "Permission denied", str(entry))
        return real_build(self, backend, onnx_path, entry, options, fields)

    monkeypatch.setattr(EngineCache, "_build", build)
    monkeypatch.setattr(cache_module, "_writable", lambda p: not roots.under(p) and
                        real_writable(p))  # fmt: skip
    return roots


class _Roots(list):
    builds = 0

    def under(self, path) -> bool:
        return any(path.is_relative_to(r) for r in self)


def test_a_read_only_repository_missing_an_engine_builds_it_in_the_spare(
    tmp_path, model_repository, read_only, caplog
):
    root = tmp_path / "repo"
    shutil.copytree(model_repository, root, ignore=shutil.ignore_patterns("linked"))
    shutil.rmtree(root / "tiny" / "engines")  # built for another node kind: no entry here
    read_only.append(root)
    with pytest.raises(EngineError, match="give the server a writable engine_cache_spare"):
        Repository(root).load("tiny")  # as before: the model fails, and says how to fix it

    read_only.builds = 0  # (without a spare the build is tried, and fails)
    spare = tmp_path / "spare"
    with caplog.at_level(logging.WARNING, logger="innfer.repository"):
        served = Repository(root, engine_spare=spare).load("tiny")
    try:
        assert set(served.engines) == {"w100", "w050"}
        assert len(list((spare / "tiny").iterdir())) == 2  # one entry per tier, in the spare
        assert "cannot be written" in caplog.text
    finally:
        for e in served.engines.values():
            e.close()
    # The next load (a reload, a restart on the same emptyDir) finds them: nothing built.
    built = []
    again = Repository(root, engine_spare=spare).load("tiny", on_build=lambda *a: built.append(a))
    for e in again.engines.values():
        e.close()
    assert built == []
    assert not (root / "tiny" / "engines").exists()  # the repository untouched
    # No build was even started in the repository once it was known read-only (TensorRT's
    # ran minutes, then failed to be placed, then ran again in the spare: review 206).
    assert read_only.builds == 0


def test_an_entry_that_does_not_load_on_a_read_only_repository_is_built_in_the_spare(
    tmp_path, model_repository, read_only, monkeypatch
):
    # It verified but did not load (another node's TensorRT plan under the same key): a
    # fresh build beside it failed on the read-only volume and the model failed, the spare
    # never looked at (review 206).
    root = tmp_path / "repo"
    shutil.copytree(model_repository, root, ignore=shutil.ignore_patterns("linked"))
    read_only.append(root)
    from runtime.engines.onnxruntime import OnnxRuntimeBackend

    real_load = OnnxRuntimeBackend.load

    def load(self, entry, options):
        if entry.is_relative_to(root):
            raise EngineError("does not deserialize on this node")
        return real_load(self, entry, options)

    monkeypatch.setattr(OnnxRuntimeBackend, "load", load)
    served = Repository(root, engine_spare=tmp_path / "spare").load("tiny")
    for e in served.engines.values():
        e.close()
    assert len(list((tmp_path / "spare" / "tiny").iterdir())) == 2


def test_the_spare_is_swept_of_interrupted_builds(tmp_path, model_repository):
    root = tmp_path / "repo"
    shutil.copytree(model_repository, root, ignore=shutil.ignore_patterns("linked"))
    left = tmp_path / "spare" / "tiny" / "deadbeef.tmp-1-abcd"  # a build killed mid-way
    left.mkdir(parents=True)
    old = time.time() - 2 * 3600
    os.utime(left, (old, old))
    served = Repository(root, engine_spare=tmp_path / "spare").load("tiny")
    for e in served.engines.values():
        e.close()
    assert not left.exists()
