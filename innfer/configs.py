"""``innfer config``: the two configuration files' keys, and a check of files before a deploy.

    innfer config keys server        every server.yaml key: default, allowed values, meaning
    innfer config keys model         every model.yaml key, the same way
    innfer config check FILE...      validate server.yaml / model.yaml files as the server
                                     reads them (exit 0 all valid, 2 otherwise)

The keys come from the config classes themselves (``runtime.configspec.reference``), so the
list cannot drift from what the server accepts; the README shows examples, not every key
(TLS, auth and many tuning keys were written down only in source - review 196).

A file named ``model.yaml`` or ``*.model.yaml`` (a deploy's tier set) is a model config, any
other a server config; ``--kind`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

KINDS = ("server", "model")


def add_parser(sub) -> None:
    config = sub.add_parser("config", help="configuration keys, and a check of config files")
    csub = config.add_subparsers(dest="config_command", required=True)
    keys = csub.add_parser("keys", help="every key of server.yaml or model.yaml")
    keys.add_argument("kind", choices=KINDS)
    keys.set_defaults(func=cmd_keys)
    check = csub.add_parser(
        "check", help="validate config files as the server reads them",
        epilog="exit status: 0 every file is valid; 2 one is not (each error printed)",
    )  # fmt: skip
    check.add_argument("files", nargs="+", type=Path)
    check.add_argument(
        "--kind", choices=KINDS,
        help="what every file is (default: model for model.yaml and *.model.yaml, else server)",
    )  # fmt: skip
    check.add_argument(
        "--repository", type=Path,
        help="a server config's repository, as innfer serve --repository gives it (a file of "
        "tuning only names none)",
    )  # fmt: skip
    check.set_defaults(func=cmd_check)


def cmd_keys(args: argparse.Namespace) -> int:
    """Print ``reference(...)`` of the chosen config class.

    Example:
        >>> cmd_keys(argparse.Namespace(kind="server"))  # doctest: +ELLIPSIS
        repository: (required) ...
        0
    """
    from runtime.configspec import reference

    print(reference(_config_class(args.kind)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Load each file with its config class; print ``ok`` or the error, and exit 2 if any
    failed. Relative paths in a server config are checked from its own directory, as
    ``innfer serve --config`` reads them."""
    failed = 0
    for path in args.files:
        kind = args.kind or kind_of(path)
        try:
            if kind == "server" and args.repository is not None:  # (helper-281: a tuning-only
                # file serve takes with --repository was refused here)
                config = _config_class(kind).load(path, repository=args.repository)
            else:
                config = _config_class(kind).load(path)
        except (ValueError, OSError) as exc:  # ConfigError is a ValueError
            if args.kind is None and (other := _as_other(path, kind)) is not None:
                # A server config named *.model.yaml is read by that name as a tier set -
                # the deploy gate (check_tiers.py) and `innfer build` fail on it, so the
                # check does too (review helper-243). A model config named otherwise is
                # read by nothing under its name: said, not failed - unless it is not valid
                # as that either.
                line, valid = other
                failed += kind == "model" or not valid
                print(line, file=sys.stderr if kind == "model" or not valid else sys.stdout)
                continue
            failed += 1
            print(f"{_said(exc, path)} (as a {kind} config)", file=sys.stderr)
            continue
        refused, warnings = _serve_would_say(config) if kind == "server" else (None, [])
        if kind == "model" and refused is None:
            refused = _linked_out(Path(path))
        if kind == "model" and getattr(config, "auto_tiers_empty_note", None):
            # (build and serve print it; the check said "ok" alone: helper-281)
            warnings = [*warnings, config.auto_tiers_empty_note]
        if refused is not None:
            failed += 1
            print(f"{path}: `innfer serve` would refuse it: {refused}", file=sys.stderr)
            continue
        print(f"{path}: {kind} config ok{_not_there_yet(config)}")
        for said in warnings:
            print(f"{path}: warning (innfer serve logs it at start): {said}")
    return 2 if failed else 0


def _linked_out(path: Path) -> str | None:
    """What ``innfer serve`` says of a model.yaml that is a link out of its model's folder
    (it refuses to read one); None for any other file. The check said "ok" (helper-281)."""
    folder = path.absolute().parent
    if path.name != "model.yaml" or not path.is_symlink():
        return None
    if path.resolve().is_relative_to(folder.resolve()):
        return None  # (a ConfigMap's ..data link inside the folder is fine)
    return (f"{folder.name}/model.yaml is a link out of the model's folder; copy the file "
            "into the folder instead")  # fmt: skip


def _serve_would_say(config) -> tuple[str | None, list[str]]:
    """What ``innfer serve`` says of a valid server config at start, beyond the file: its
    refusal of the repository (when it is a directory here: models it lacks, a model's own
    folder, none at all) and its start-up warnings. The check said "ok" to configs serve
    then refused at once, and showed none of its warnings (review helper-243)."""
    from innfer.cli import _check_backend, _check_repository
    from server.app import cleartext_token_warning
    from server.limits import stream_limits_warning

    warnings = [w for w in (cleartext_token_warning(config),
                            stream_limits_warning(config.limits)) if w is not None]  # fmt: skip
    from server.trace import trace_file_problem

    if (trace := trace_file_problem(config.trace)) is not None:
        return trace, warnings
    try:  # (serve stops at start on it; a warning: the check may run elsewhere - helper-281)
        _check_backend(config.backend, f"{config.source}: backend")
    except ValueError as exc:
        warnings.append(f"{exc} (innfer serve stops at start on a machine without it)")
    if not Path(config.repository).is_dir():
        return None, warnings  # _not_there_yet says so
    try:
        _check_repository(config)
    except ValueError as exc:
        return str(exc), warnings
    return _limits_refuse(config), warnings


def _limits_refuse(config) -> str | None:
    """A served model no request to which passes the config's ``limits`` (serve starts, the
    model not ready; the check said ok: helper-281), or None."""
    from runtime.repository import Repository
    from server.limits import model_unservable

    repo = Repository(config.repository)
    for name in config.models or repo.names():
        try:
            model = repo.config(name)
        except (ValueError, OSError):  # its own file's error: said where serve loads it
            continue
        if (why := model_unservable(config.limits, model)) is not None:
            return (f"model {name}: no request to it passes this server's request limits: "
                    f"{why}; raise it under limits:")  # fmt: skip
    return None


def _as_other(path: Path, kind: str) -> tuple[str, bool] | None:
    """Where a file whose name made it a ``kind`` config is the other kind by its keys: its
    line as that kind, with how to name it, and whether it is valid as that. A model config
    saved as mymodel.yaml was refused as a server config field by field ("inputs: expected
    a known field ...") with no word of --kind (review helper-225) - and where it was also
    invalid as a model config, still so, its own error hidden (review helper-295)."""
    other = "server" if kind == "model" else "model"
    name = "model.yaml or NAME.model.yaml" if other == "model" else "anything but *model.yaml"
    hint = f"by its keys: its name made it a {kind} config - name it {name}, or pass --kind {other}"
    try:
        config = _config_class(other).load(path)
    except (ValueError, OSError) as exc:
        if not _keys_of(path, other, kind):
            return None
        return f"{_said(exc, path)} (as a {other} config, {hint})", False
    return f"{path}: {other} config ok{_not_there_yet(config)} ({hint})", True


def _keys_of(path: Path, kind: str, not_kind: str) -> bool:
    """Whether ``path``'s top-level keys are all fields of a ``kind`` config and not all of
    a ``not_kind`` one."""
    import dataclasses

    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    if not isinstance(data, dict) or not data:
        return False
    fields = {k: {f.name for f in dataclasses.fields(_config_class(k))} for k in (kind, not_kind)}
    keys = set(data)
    return keys <= fields[kind] and not keys <= fields[not_kind]


def _not_there_yet(config) -> str:
    """For a server config whose repository is not a directory here: a note that serve
    refuses it until it is (valid: a repository is often mounted later, in a pod). The
    check said only "ok", and serve then refused it (review helper-219)."""
    repository = getattr(config, "repository", None)
    if repository is None or Path(repository).is_dir():
        return ""
    return (
        f" (note: its repository {repository} is not a directory here: `innfer serve` refuses "
        "it until it is - mounted or built - and checks its models then)"
    )


def kind_of(path: Path) -> str:
    """``model`` for ``model.yaml`` and ``*.model.yaml``, else ``server``.

    Example:
        >>> kind_of(Path("k8s/mnist.model.yaml")), kind_of(Path("server.yaml"))
        ('model', 'server')
    """
    name = path.name
    return "model" if name == "model.yaml" or name.endswith(".model.yaml") else "server"


def _config_class(kind: str) -> type:
    if kind == "model":
        from runtime.repository.config import ModelConfig

        return ModelConfig
    from server.config import ServerConfig

    return ServerConfig


def _said(exc: BaseException, path: Path) -> str:
    """An error as one message that names the file (the config errors name it already)."""
    said = str(exc)
    return said if said.startswith(str(path)) else f"{path}: {said}"
