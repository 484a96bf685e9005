"""The serving images install the dependency versions the tests ran with:
constraints/serve.txt pins innfer's base dependency closure (deploy/tools/lock_serving.py),
the dev/CI install (Makefile) and both Dockerfiles install with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints" / "serve.txt"
TOOL = ROOT / "deploy" / "tools" / "lock_serving.py"


def _pins() -> dict[str, str]:
    lines = [ln for ln in LOCK.read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[\w.+!-]+", ln) for ln in lines), lines
    return dict(ln.split("==") for ln in lines)


def test_the_lock_is_this_environments_serving_closure():
    """A version moved in the environment the tests ran in (or a dependency added to
    pyproject.toml) without the lock: the images would ship something untested."""
    out = subprocess.run([sys.executable, str(TOOL), "--check"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr + "\nrun deploy/tools/lock_serving.py"
    pins = _pins()
    for base in ("numpy", "onnxruntime", "grpcio", "protobuf", "prometheus-client",
                 "tokenizers", "numba", "pyyaml"):  # fmt: skip
        assert base in pins, base
    assert "torch" not in pins  # the serving side never needs it


def test_lock_tool_pins_installed_versions_of_what_the_base_requirements_reach():
    sys.path.insert(0, str(TOOL.parent))
    try:
        import lock_serving
    finally:
        sys.path.pop(0)
    from importlib import metadata

    pins = lock_serving.closure()
    assert pins["onnxruntime"] == metadata.version("onnxruntime")
    # reached through a dependency, not named by innfer: onnxruntime needs flatbuffers
    assert "flatbuffers" in pins and "innfer" not in pins
    assert lock_serving.render({"a": "1"}).endswith("a==1\n")


def test_the_dev_install_and_both_images_install_with_the_lock():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints/serve\.txt", make)
    for kind in ("cpu", "gpu"):
        docker = (ROOT / "deploy" / "docker" / f"Dockerfile.{kind}").read_text()
        assert "COPY constraints/serve.txt /wheels/constraints.txt" in docker, kind
        assert re.search(r"pip install [^\n]*-c /tmp/wheels/constraints\.txt", docker), kind
        ignore = (ROOT / "deploy" / "docker" / f"Dockerfile.{kind}.dockerignore").read_text()
        assert "!constraints/serve.txt" in ignore.split(), kind
