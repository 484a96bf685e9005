"""Init-container gate: is the model repository built for the tier sets in this ConfigMap?

Run in the serving image before ``innfer serve``:

    python3 /etc/innfer/check_tiers.py /etc/innfer/server.yaml /etc/innfer

For every ``<model>.model.yaml`` next to the server config, the repository the server
config names must hold ``<model>/model.yaml`` with the same settings (tiers, widths,
backends, precision, batch, ...) and, for every tier, the files ``innfer build`` writes
(``tiers/<tier>/model.onnx`` and ``tier.json``) and, where the tier set asks for
auto-tiering, a frontier it can choose from (``frontier/``, as the server checks it at load:
without one auto-tiering never ran, and only the pod's log said so) with a candidate that
meets its goals (``accuracy_floor``, ``max_memory_mb``: else auto-tiering is off, which the
server's InnferAutoTieringOff alert said 15 minutes after the rollout). Exit 0 when all match;
otherwise print what differs and how to fix it, and exit 1, so a rollout of a new tier set
waits (the old pods keep serving, maxUnavailable is 0) until the repository has been rebuilt
for it. Engines are not checked: the server rebuilds missing or stale ones from each tier's
ONNX at start-up.

Of the server config it reads the repository alone (``GateConfig``), not the whole
ServerConfig: that one checks that ``tls.*`` and ``auth.bearer_token_file`` exist, and this
container mounts only the config, the models and /tmp - with auth or TLS configured the gate
failed on the missing secret and the pod never started (Init:CrashLoopBackOff). The server
checks the rest of its config when it starts.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from runtime.configspec import Where, parse, read_yaml, spec
from runtime.repository import Repository
from runtime.repository.config import ConfigError, ModelConfig

SUFFIX = ".model.yaml"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GateConfig:
    """What the gate reads of the server config (every other key is the server's)."""

    repository: Path = spec(  # noqa: RUF009 - spec() is a dataclasses.field() with rules
        doc="model repository root (relative paths: from the config file's directory)"
    )


def read_repository(server_yaml: Path) -> Path:
    """The repository ``server_yaml`` names, resolved as the server resolves it; no other
    key is read or checked (ConfigError where the file or its repository is unusable)."""
    data = read_yaml(server_yaml)
    where = Where(str(server_yaml), base=server_yaml.parent)
    if not isinstance(data, dict):
        where.fail(data, "a mapping of server settings (repository: ...)")
    read = {k: data[k] for k in ("repository",) if k in data}
    return parse(GateConfig, read, where).repository


def check(server_yaml: Path, tier_dir: Path) -> list[str]:
    """Problems found (empty: the repository matches every tier set)."""
    try:
        repo = read_repository(server_yaml)
    except ConfigError as exc:
        return [str(exc)]
    problems = []
    wanted = sorted(tier_dir.glob("*" + SUFFIX))
    if not wanted:
        return [f"{tier_dir}: no <model>{SUFFIX} tier sets to check"]
    for path in wanted:
        model = path.name[: -len(SUFFIX)]
        try:
            expected = ModelConfig.load(path)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        built_yaml = repo / model / "model.yaml"
        try:
            built = ModelConfig.load(built_yaml)
        except ConfigError as exc:
            problems.append(f"{exc}: copy {path.name} there and run `innfer build {repo}`")
            continue
        expected = dataclasses.replace(expected, name=model)
        for f in dataclasses.fields(ModelConfig):
            if f.compare and getattr(built, f.name) != getattr(expected, f.name):
                problems.append(
                    f"{built_yaml}: {f.name} is {getattr(built, f.name)!r}, the deployed tier "
                    f"set {path.name} says {getattr(expected, f.name)!r}: rebuild the "
                    f"repository for this tier set (`innfer build`) or deploy the one it has"
                )
        for tier in expected.tiers:
            for name in ("model.onnx", "tier.json"):
                p = repo / model / "tiers" / tier.name / name
                if not p.is_file():
                    problems.append(f"{p} is missing: run `innfer build {repo}`")
        if expected.auto_tiers is not None:
            store = Repository(repo)
            problem = store.frontier_problem(model, built) or store.unmet_goals(model, built)
            if problem:
                problems.append(f"{path.name} asks for auto_tiers, and {problem}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: check_tiers.py SERVER_YAML TIER_DIR", file=sys.stderr)
        return 2
    problems = check(Path(argv[0]), Path(argv[1]))
    for p in problems:
        print(f"check_tiers: {p}", file=sys.stderr)
    if not problems:
        print(f"check_tiers: repository matches the tier sets in {argv[1]}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
