"""The import graph: the folder a module lives in says what it may import.

Rules (docs/design.md, "Layout"): nothing in ``runtime`` imports ``server``, ``sim`` or the
CLI; production server code never imports the simulators or torch; the scheduling policy
never imports grpc; the torch side (``runtime.inn``, ``runtime.build``) never imports the
serving modules; nothing but the CLI's own package imports ``innfer``. The static check reads
every ``import`` (lazy ones inside functions too); the dynamic check imports every serving
module in a fresh interpreter where torch and ``sim`` cannot be imported at all.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "server", "sim", "innfer")

# (importer prefix, forbidden import prefixes, reason)
RULES = [
    ("runtime", ("server", "sim", "innfer"), "the library never reaches into the server"),
    (
        "server",
        ("sim", "innfer", "torch", "runtime.inn", "runtime.build", "runtime.demo"),
        "the serving side is torch-free and ships without the simulators",
    ),
    (
        "server.scheduling",
        (
            "grpc",
            "server.app",
            "server.service",
            "server.dataplane",
            "server.model_runtime",
            "prometheus_client",
            "runtime",
        ),
        "the policy is pure: requests in, decisions out",
    ),
    (
        "runtime.repository",
        ("torch", "runtime.inn", "runtime.build", "runtime.demo"),
        "the repository is read by the torch-free server",
    ),
    (
        "runtime.engines",
        ("runtime.build", "runtime.demo", "runtime.repository"),
        "engines know nothing of repositories or builds",
    ),
    (
        "runtime.inn",
        ("runtime.build", "runtime.demo", "runtime.repository", "runtime.engines"),
        "the INN library stands alone",
    ),
    ("runtime.hashing", ("torch", "runtime.inn", "runtime.repository"), "a leaf module"),
    ("runtime.atomic", ("torch", "runtime.inn", "runtime.repository"), "a leaf module"),
    ("runtime.inn_files", ("torch", "runtime.inn", "runtime.repository"), "a leaf module"),
    ("sim", ("innfer", "torch", "grpc"), "simulators run on a virtual clock, torch-free"),
]
# The torch backend runs a sampled tier as torch modules: torch is its whole point, imported
# lazily inside its methods. It is the one serving-side module allowed to do so.
EXCEPTIONS = {("runtime.engines.torch", "torch"), ("runtime.engines.torch", "runtime.inn")}
# sim.loadgen drives a live server through tritonclient (which brings grpc): a client tool.
EXCEPTIONS |= {("sim.loadgen", "grpc")}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "proto_gen" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{a.name}" for a in node.names)
    return out


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_static_import_rules():
    modules = _modules()
    assert len(modules) > 40, "the walk found the packages"
    broken = []
    for name, path in sorted(modules.items()):
        imported = _imports(name, path)
        for owner, forbidden, reason in RULES:
            if not _matches(name, owner):
                continue
            for imp in sorted(imported):
                bad = next((f for f in forbidden if _matches(imp, f)), None)
                if bad and (name, bad) not in EXCEPTIONS:
                    broken.append(f"{name} imports {imp} ({reason})")
        if not _matches(name, "innfer"):
            broken += [f"{name} imports the CLI {i}" for i in imported if _matches(i, "innfer")]
    assert not broken, "\n".join(sorted(set(broken)))


def test_rules_catch_a_backward_edge(tmp_path):
    """The checker itself: a server module importing the simulator is reported."""
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from sim.simulator import simulate\n")
    assert "sim.simulator" in _imports("server.bad", fake)
    assert "sim.simulator.simulate" in _imports("server.bad", fake)


SERVING = [
    "server.app",
    "server.service",
    "server.dataplane",
    "server.model_runtime",
    "server.codec",
    "server.metrics",
    "server.config",
    "server.errors",
    "server.scheduling",
    "runtime",
    "runtime.engines",
    "runtime.engines.onnxruntime",
    "runtime.engines.tensorrt",
    "runtime.engines.torch",
    "runtime.engines.feeds",
    "runtime.engines.fp16",
    "runtime.repository",
    "runtime.repository.profile",
    "innfer.cli",
]

_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "sim", "torchvision"):
            raise ImportError(f"{name} is blocked: the serving side must not need it")
        return None
sys.meta_path.insert(0, Block())
import importlib
for m in MODULES:
    importlib.import_module(m)
assert not {"torch", "sim"} & set(sys.modules), sorted({"torch", "sim"} & set(sys.modules))
print("ok", len(MODULES))
"""


def test_serving_modules_import_without_torch_or_simulators():
    code = f"MODULES = {SERVING!r}\n" + _BLOCKER
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ok {len(SERVING)}"


@pytest.mark.parametrize("module", ["server.app", "runtime.repository"])
def test_blocker_really_blocks(module):
    """Importing torch under the blocker fails, so the test above can fail."""
    code = f"MODULES = [{module!r}, 'torch']\n" + _BLOCKER
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr
