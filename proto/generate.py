"""Generate the Python protobuf/gRPC stubs in server/proto_gen from the .proto files here.

    python proto/generate.py            # regenerate server/proto_gen in place
    python proto/generate.py --check    # exit 1, with a summary, if the checked-in stubs are stale
    python proto/generate.py --out DIR  # generate somewhere else

Runs grpc_tools.protoc (grpcio-tools, a dev dependency) into a temporary directory and
then writes a flat package: grpc_service_pb2.py, grpc_service_pb2_grpc.py, model_config_pb2.py,
health_pb2.py, health_pb2_grpc.py (with .pyi stubs) and __init__.py. Two fix-ups are applied
to protoc's output:

* imports: protoc writes absolute imports that follow the .proto paths
  (``from inference import model_config_pb2``, ``from grpc.health.v1 import health_pb2``);
  they become relative (``from . import model_config_pb2``), so the stubs work as the
  ``server.proto_gen`` package and never pick up an unrelated ``grpc.health`` module.
* descriptor pool: protoc registers every file in protobuf's process-wide default pool.
  tritonclient registers Triton's own definitions of the very same ``inference.*`` messages
  there, and a second definition of a symbol is an error ("duplicate symbol
  'inference.DataType'"), so importing both in one process would fail. The stubs register
  in a private pool, ``server.proto_gen.POOL``, instead. The wire format does not depend on
  the pool: both sets of classes read each other's bytes.

The output depends on the grpcio-tools version (its protoc stamps the protobuf version into
the files): regenerate with the version pinned by constraints/dev.txt.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
DEFAULT_OUT = REPO_ROOT / "server" / "proto_gen"

# Paths relative to PROTO_DIR (the -I root); their directories are the protobuf packages.
PROTOS = (
    "inference/model_config.proto",
    "inference/grpc_service.proto",
    "grpc/health/v1/health.proto",
)

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

INIT_PY = '''\
"""Python stubs generated from proto/ by proto/generate.py: do not edit, regenerate.

    from server.proto_gen import grpc_service_pb2 as pb, grpc_service_pb2_grpc as rpc
    from server.proto_gen import model_config_pb2, health_pb2, health_pb2_grpc

The messages live in the private descriptor pool POOL, not in protobuf's default pool,
so that they coexist with tritonclient's definitions of the same ``inference.*`` messages
in one process. Code that looks messages up by name must use POOL. (With protobuf's
pure-Python backend, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, message classes are
still registered in the default pool, so there the two cannot be imported together.)

Needs protobuf >= the "Protobuf Python Version" in the headers and grpcio >= the
GRPC_GENERATED_VERSION in the *_grpc.py files (both are checked at import).
"""

from google.protobuf import descriptor_pool as _descriptor_pool

POOL = _descriptor_pool.DescriptorPool()
'''

_POOL_IMPORT = "from . import POOL as _POOL\n"
_DEFAULT_POOL_CALL = "_descriptor_pool.Default().AddSerializedFile("
_VERSION_LINE = re.compile(r"^# Protobuf Python Version: (\S+)$", re.MULTILINE)


class GenerateError(RuntimeError):
    pass


def _proto_packages() -> list[str]:
    return sorted({str(Path(p).parent).replace("/", ".") for p in PROTOS})


def _fix_imports(text: str, name: str) -> str:
    packages = "|".join(re.escape(p) for p in _proto_packages())
    pattern = re.compile(rf"^from (?:{packages}) import (\w+_pb2) as (\w+)$", re.MULTILINE)
    text = pattern.sub(r"from . import \1 as \2", text)
    leftover = re.search(rf"^(?:from|import) (?:{packages})\b.*$", text, re.MULTILINE)
    if leftover:
        raise GenerateError(f"{name}: import not rewritten: {leftover.group(0)!r}")
    return text


def _fix_pool(text: str, name: str, module: str) -> str:
    if text.count(_DEFAULT_POOL_CALL) != 1:
        raise GenerateError(f"{name}: expected one {_DEFAULT_POOL_CALL!r}")
    text = text.replace(_DEFAULT_POOL_CALL, "_POOL.AddSerializedFile(")
    anchor = "# @@protoc_insertion_point(imports)\n"
    if anchor not in text:
        raise GenerateError(f"{name}: no {anchor.strip()!r} line")
    text = text.replace(anchor, anchor + "\n" + _POOL_IMPORT, 1)
    # Classes get __module__ = the module they are really imported as.
    module_arg = f"(DESCRIPTOR, '{module}', _globals)"
    if module_arg not in text:
        raise GenerateError(f"{name}: no {module_arg!r}")
    return text.replace(module_arg, "(DESCRIPTOR, __name__, _globals)")


def _run_protoc(raw_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={raw_dir}",
        f"--pyi_out={raw_dir}",
        f"--grpc_python_out={raw_dir}",
        *(str(PROTO_DIR / p) for p in PROTOS),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GenerateError(f"protoc failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")


def render() -> dict[str, str]:
    """Run protoc and return {file name: text} of the package to write (flat, fixed up)."""
    files: dict[str, str] = {"__init__.py": INIT_PY}
    with tempfile.TemporaryDirectory(prefix="proto_gen_raw_") as tmp:
        raw_dir = Path(tmp)
        _run_protoc(raw_dir)
        for proto in PROTOS:
            rel = Path(proto).with_suffix("")
            stem = rel.name
            module = str(rel).replace("/", ".") + "_pb2"
            for suffix in GENERATED_SUFFIXES:
                src = raw_dir / rel.parent / (stem + suffix)
                if not src.is_file():
                    raise GenerateError(f"protoc did not write {src.relative_to(raw_dir)}")
                text = src.read_text(encoding="utf-8")
                name = stem + suffix
                if suffix == "_pb2_grpc.py" and "def add_" not in text:
                    continue  # no service in this .proto: nothing worth shipping
                if name in files:
                    raise GenerateError(f"two .proto files map to {name}")
                text = _fix_imports(text, name)
                if suffix == "_pb2.py":
                    text = _fix_pool(text, name, module)
                files[name] = text
    return files


def _existing(out_dir: Path) -> dict[str, str]:
    if not out_dir.is_dir():
        return {}
    return {
        p.name: p.read_text(encoding="utf-8")
        for p in sorted(out_dir.iterdir())
        if p.is_file() and (p.name == "__init__.py" or p.name.endswith(GENERATED_SUFFIXES))
    }


def generate(out_dir: Path = DEFAULT_OUT) -> list[str]:
    """Write the stubs into out_dir (removing stale generated files); return the names written."""
    files = render()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _existing(out_dir):
        if name not in files:
            (out_dir / name).unlink()
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return sorted(files)


def check(out_dir: Path = DEFAULT_OUT) -> list[str]:
    """Compare out_dir with a fresh generation; return one line per difference (empty: clean)."""
    fresh = render()
    current = _existing(out_dir)
    problems: list[str] = []
    for name in sorted(fresh.keys() - current.keys()):
        problems.append(f"missing: {name}")
    for name in sorted(current.keys() - fresh.keys()):
        problems.append(f"stale (not generated any more): {name}")
    for name in sorted(fresh.keys() & current.keys()):
        if fresh[name] == current[name]:
            continue
        diff = list(
            difflib.unified_diff(
                current[name].splitlines(),
                fresh[name].splitlines(),
                f"checked-in/{name}",
                f"fresh/{name}",
                n=0,
                lineterm="",
            )
        )
        changed = sum(1 for line in diff[2:] if line[:1] in "+-")
        detail = f"differs: {name} ({changed} changed lines)"
        old_v, new_v = _VERSION_LINE.search(current[name]), _VERSION_LINE.search(fresh[name])
        if old_v and new_v and old_v.group(1) != new_v.group(1):
            detail += (
                f"; generated for protobuf {old_v.group(1)}, this grpcio-tools emits"
                f" {new_v.group(1)}"
            )
        problems.append(detail)
        problems.extend("    " + line[:160] for line in diff[2:12])
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output package directory")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(args.out)
            if problems:
                print(f"{args.out}: stubs differ from a fresh generation:", file=sys.stderr)
                print("\n".join(problems), file=sys.stderr)
                print("run: python proto/generate.py", file=sys.stderr)
                return 1
            print(f"{args.out}: up to date")
            return 0
        names = generate(args.out)
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(names)} files to {args.out}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
