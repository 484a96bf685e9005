"""Write constraints/serve.txt: the serving image's dependency closure, pinned.

The serving images (deploy/docker) install the innfer wheel's base dependencies only (no
torch). Unpinned, each image build resolves whatever the index holds that day - a new
onnxruntime or grpcio in production that no test ran. This walks the installed
environment's metadata from innfer's base requirements (extras and environment markers
evaluated for this interpreter) and pins every package reached to its installed version:
run it in the environment the tests passed in (the README's dev install), and commit the
file with the change that moved a version.

    .venv/bin/python deploy/tools/lock_serving.py [--out constraints/serve.txt] [--check]

``--check`` exits 1 if the file differs from what the environment gives (CI's drift check
is tests/test_deploy.py, which reads the same closure).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "constraints" / "serve.txt"
HEADER = (
    "# The serving images' dependency closure (innfer's base dependencies, no torch), pinned\n"
    "# to the versions the tests ran with. Written by deploy/tools/lock_serving.py; the\n"
    "# Dockerfiles install the wheel with -c this file.\n"
)


def _requirements(dist: metadata.Distribution, extras: frozenset[str]) -> list[Requirement]:
    """``dist``'s requirements that apply here (markers true for this interpreter and the
    ``extras`` asked for)."""
    out = []
    for line in dist.requires or []:
        req = Requirement(line)
        env = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is None or any(req.marker.evaluate(e) for e in env):
            out.append(req)
    return out


def closure(root: str = "innfer") -> dict[str, str]:
    """{canonical name: installed version} of every package ``root``'s base requirements
    reach, ``root`` itself left out. Raises if one is not installed."""
    pins: dict[str, str] = {}
    todo = [(req, frozenset(req.extras)) for req in _requirements(metadata.distribution(root),
                                                                  frozenset())]  # fmt: skip
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in pins:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} (required as {req}) is not installed here") from None
        pins[name] = dist.version
        todo += [(r, frozenset(r.extras)) for r in _requirements(dist, extras)]
    return dict(sorted(pins.items()))


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in pins.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    text = render(closure())
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'differs from this environment'}")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"wrote {args.out} ({text.count('==')} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
