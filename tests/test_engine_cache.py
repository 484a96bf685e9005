"""The engine cache and the ONNX Runtime engine's lifetime: findings of the engine review of
session 32 (runtime/repository/cache.py, runtime/engines/onnxruntime.py), on the real ONNX
Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from test_build_review28 import _add_onnx

from runtime.engines import BuildOptions, EngineError
from runtime.engines.onnxruntime import OnnxRuntimeBackend
from runtime.repository import EngineCache


def test_a_closed_engine_lets_its_session_go_and_refuses_to_run(tmp_path):
    # close() did nothing: the session (its memory and threads) lived as long as anything
    # held the engine.
    onnx_path = _add_onnx(tmp_path / "tier" / "model.onnx")
    engine, _ = EngineCache(tmp_path / "engines").get(OnnxRuntimeBackend(), onnx_path,
                                                      BuildOptions())  # fmt: skip
    x = {"x": np.zeros((1, 4), np.float32)}
    assert engine.run(x)["y"].tolist() == [[1.0] * 4]
    engine.close()
    assert engine.session is None
    with pytest.raises(EngineError, match="closed"):
        engine.run(x)


def test_a_file_where_an_entry_should_be_is_removed_not_swept_forever(tmp_path, caplog):
    # The entry was renamed aside as unusable, and rmtree(ignore_errors=True) cannot delete
    # a file: every later load logged "removed 1 interrupted engine builds", removing nothing.
    onnx_path = _add_onnx(tmp_path / "tier" / "model.onnx")
    cache, backend = EngineCache(tmp_path / "engines"), OnnxRuntimeBackend()
    cache.get(backend, onnx_path, BuildOptions())
    (entry,) = cache.root.iterdir()
    for f in entry.iterdir():
        f.unlink()
    entry.rmdir()
    entry.write_bytes(b"not a directory")
    engine, built = cache.get(backend, onnx_path, BuildOptions())
    assert built and engine.run({"x": np.zeros((1, 4), np.float32)})["y"].shape == (1, 4)
    assert [p.name for p in cache.root.iterdir()] == [entry.name] and entry.is_dir()
    assert cache.sweep() == []
