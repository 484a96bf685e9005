"""Engines a read-only repository lacks are built in ``engine_cache_spare``
(runtime/repository/cache.py ``EngineCache.spare``): KServe mounts the repository
read-only, and a pod on a node whose device or ONNX Runtime version the engines were not
built for could not load the model at all (review 205). The read-only volume is simulated:
this suite may run as root, whom file modes do not stop, so the repository cache's build
raises the PermissionError a read-only mount gives (the rest is the real ONNX Runtime)."""

from __future__ import annotations

import logging
import shutil

import pytest

from runtime.engines import EngineError
from runtime.repository import Repository
from runtime.repository.cache import EngineCache


@pytest.fixture
def read_only(monkeypatch):
    """Builds into any cache under ``roots`` fail as on a read-only mount."""
    roots = []
    real = EngineCache._build

    def build(self, backend, onnx_path, entry, options, fields):
        if any(entry.is_relative_to(r) for r in roots):
            raise PermissionError(13, "Permission denied", str(entry))
        return real(self, backend, onnx_path, entry, options, fields)

    monkeypatch.setattr(EngineCache, "_build", build)
    return roots


def test_a_read_only_repository_missing_an_engine_builds_it_in_the_spare(
    tmp_path, model_repository, read_only, caplog
):
    root = tmp_path / "repo"
    shutil.copytree(model_repository, root, ignore=shutil.ignore_patterns("linked"))
    shutil.rmtree(root / "tiny" / "engines")  # built for another node kind: no entry here
    read_only.append(root)
    with pytest.raises(EngineError, match="give it a writable engine_cache_spare"):
        Repository(root).load("tiny")  # as before: the model fails, and says how to fix it

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
