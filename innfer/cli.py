"""The ``innfer`` command line.

innfer demo                 train the demo CNN as an INN, build its tiers (reused next time)
innfer inspect DIR          list a saved INN's continuous groups and sizes at a width
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from innfer.outputs import output_dir, output_file, png_file


def _width(text: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"width must be a number in (0, 1], got {text!r}"
        ) from None
    if not 0 < w <= 1:
        raise argparse.ArgumentTypeError(f"width must be in (0, 1], got {text}")
    return w


DEMO_FILE = "demo.json"  # beside the INN in the model directory: how the demo trained it
# simulate and bench: seconds of arrivals without --duration; simulate takes fewer where
# they would be more requests than this (~40 s of simulation per policy here).
DEFAULT_DURATION_S = 30.0
DEFAULT_SIM_REQUESTS = 300_000


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the demo model as an INN (or convert a trained one), report, build, serve.

    A model directory whose ``demo.json`` records the same recipe (model, seed, epochs,
    widths, --convert) for the INN that is there is reused: no training, and the build
    re-does only what changed (tier source hashes, engine cache, profile). ``--retrain``
    starts over."""
    _refuse_flags_of_the_other_demo(args)
    if args.model == "minilm":
        return _demo_minilm(args)
    # mnist_resnet is served as "mnist" (the README's name); another recipe under its own
    # name: defaulting every recipe to "mnist" trained over the MNIST demo
    args.name = args.name or _demo_name(args.model)
    model_dir = args.repository / args.name
    _demo_tiers(args.widths)  # before minutes of training: a clash found after lost them
    recipe = _demo_recipe(args)
    if not args.retrain:
        record, why = _demo_reusable(model_dir, recipe)
        if record is not None:
            print(f"reusing {model_dir} (trained {record.get('trained_at', '?')}: "
                  f"{_describe(recipe)}); {_start_over(args, model_dir)}")  # fmt: skip
            return _demo_rebuild(args, model_dir)
        if why in (NOT_THE_DEMOS, NO_DEMO_RECORD):  # someone's model: not ours to train over
            if not (model_dir / "model.yaml").is_file():
                raise ValueError(
                    f"{model_dir}: {why}, and no model.yaml to build it with; give the demo "
                    "another --name, or --retrain to train the demo over it"
                )
            print(f"using {model_dir} as it is: {why} (calibrated, replaced or converted "
                  f"since?); `{_demo_again(args)}` trains the demo over it")  # fmt: skip
            return _demo_rebuild(args, model_dir, as_it_is=True)
        if why:
            print(f"not reusing {model_dir}: {why}; training again")
    import torch

    from runtime.inn.calibrate import reestimate_norms
    from runtime.inn.report import format_report, width_report

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.convert:
        inn, data = _demo_convert(args)
    else:
        from runtime.demo.training import train_inn

        print(f"training {args.model} as an INN at random widths (seed {args.seed}) ...")
        inn, data = train_inn(args.model, seed=args.seed, epochs=args.epochs, progress=True)
    for w in args.widths:
        reestimate_norms(inn, w, data.x_train[:1024])
    seconds = time.perf_counter() - t0
    print(f"ready in {seconds:.1f} s; test accuracy by width:")
    print(format_report(width_report(inn, args.widths, data)))
    return _demo_repository(args, inn, data, recipe, seconds)


def _demo_minilm(args: argparse.Namespace) -> int:
    """all-MiniLM-L6-v2: convert, calibrate on text, build; then serve (unless --no-serve).
    The INN is reused when the repository holds the one this recipe made."""
    import torch

    from runtime.build.pipeline import build_model
    from runtime.demo import minilm_demo
    from runtime.repository import Repository

    torch.set_num_threads(args.threads)
    args.name = args.name or "minilm"
    model_dir = args.repository / args.name
    seconds = args.calibrate_seconds
    if not args.retrain and minilm_demo.reusable(model_dir, seconds):
        print(f"reusing {model_dir} (same recipe); {_start_over(args, model_dir)}")
        from runtime.demo.minilm import MAX_LENGTH

        config = minilm_demo.model_config(1, MAX_LENGTH, calibrated=seconds > 0)
        minilm_demo.write_files(model_dir, config)
    else:
        minilm_demo.write_repository(args.repository, args.name, seconds, threads=1)
    repo = Repository(args.repository)
    _print_build(build_model(repo, args.name), repo)
    print(f"\nmodel repository: {model_dir}")
    if args.serve is False:
        return 0
    import asyncio

    from server.app import serve, setup_logging
    from server.config import ServerConfig

    setup_logging("INFO")
    config = {"repository": str(args.repository), "models": [args.name]}
    asyncio.run(serve(ServerConfig.from_dict(config)))
    return 0


def _demo_recipe(args: argparse.Namespace) -> dict:
    """What the demo's INN depends on; a saved INN trained by another recipe is not reused
    (nor one another innfer's training made: ``TRAINER_VERSION``)."""
    from runtime.demo.training import TRAIN_DEFAULTS, TRAINER_VERSION

    epochs = args.epochs if args.epochs is not None else TRAIN_DEFAULTS[args.model].epochs
    return {"model": args.model, "seed": args.seed, "epochs": epochs,
            # (as a set: the same widths in another order retrained - review helper-246)
            "widths": sorted({float(w) for w in args.widths}, reverse=True),
            "convert": bool(args.convert), "trainer": TRAINER_VERSION}  # fmt: skip


def _describe(recipe: dict) -> str:
    how = "converted" if recipe["convert"] else "INN"
    widths = " ".join(f"{w:g}" for w in recipe["widths"])
    return (f"{recipe['model']} ({how}), seed {recipe['seed']}, {recipe['epochs']} epochs, "
            f"widths {widths}")  # fmt: skip


def _start_over(args: argparse.Namespace, model_dir: Path) -> str:
    return f"`{_demo_again(args)}` or `rm -rf {model_dir}` to start over"


def _demo_name(model: str) -> str:
    """The model name ``innfer demo --model MODEL`` serves by default."""
    return {"mnist_resnet": "mnist", "minilm": "minilm"}.get(model, model)


def _refuse_flags_of_the_other_demo(args: argparse.Namespace) -> None:
    """The image demos train and never serve; the MiniLM demo converts a trained model: the
    flags of the other kind were ignored without a word (review helper-246: --serve built
    and exited, --epochs 3 on minilm converted as ever)."""
    defaults = vars(build_parser().parse_args(["demo"]))
    if args.model == "minilm":
        theirs = ("convert", "epochs", "widths", "seed")
        what = "the image demos' (minilm converts the trained model; its tiers are fixed)"
    else:
        theirs = ("serve", "calibrate_seconds")
        what = (
            "--model minilm's (the image demos build their repository; serve it with innfer serve)"
        )
    # (--no-serve on an image demo says what it does anyway)
    given = [k for k in theirs if getattr(args, k) not in (defaults[k], False)]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags}: {what}; leave {'it' if len(given) == 1 else 'them'} out")


def _demo_again(args: argparse.Namespace) -> str:
    """``innfer demo ... --retrain`` for this run: its model, repository and name, and the
    recipe flags it gave ("innfer demo --retrain" alone retrained the MNIST demo in
    runs/demo, whatever was asked; review helper-240, helper-242), quoted for a shell."""
    import shlex

    # the parser's own defaults (the name's is derived from the model)
    defaults = {**vars(build_parser().parse_args(["demo"])), "name": _demo_name(args.model)}
    recipe = ("model", "repository", "name", "seed", "epochs", "convert", "widths",
              "calibrate_seconds")  # fmt: skip
    parts = ["innfer", "demo"]
    for key in recipe:
        value, default = getattr(args, key, defaults[key]), defaults[key]
        if value == default:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *(f"{v:g}" for v in value)]
        else:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join([*parts, "--retrain"])


# Why a demo directory is not reused, where it holds an INN the demo did not make.
NOT_THE_DEMOS = "the INN there is not the one the demo trained"
NO_DEMO_RECORD = f"it holds an INN the demo did not make (no {DEMO_FILE})"


def _say_unbuilt(repo, name: str) -> None:
    """After a build of ``name`` stopped (an error, Ctrl-C, a full disk): which of its tiers
    are built for model.yaml as it is and which are not - "interrupted" alone left a mixed
    set to be found by the next load (review 157)."""
    from runtime.repository import RepositoryError

    _close_progress_bars()
    try:
        left = repo.unbuilt(name)
        every = [t.name for t in repo.config(name).tiers]
    except (RepositoryError, OSError, ValueError):
        return  # model.yaml itself is the error, said next
    if not left:
        return
    done = [t for t in every if t not in left]
    built = f" ({', '.join(done)} are)" if done else ""
    print(f"innfer build: {name}: tiers {', '.join(left)} are not built for its model.yaml"
          f"{built}; a server refuses the model until `innfer build` completes",
          file=sys.stderr)  # fmt: skip


def _demo_reusable(model_dir: Path, recipe: dict) -> tuple[dict | None, str]:
    """(the demo record, "") when ``model_dir`` holds an INN trained by ``recipe``, else
    (None, why not; "" when there is nothing there yet)."""
    import json

    if not (model_dir / DEMO_FILE).is_file():
        if (model_dir / "inn.json").is_file():
            return None, NO_DEMO_RECORD
        return None, "" if not model_dir.exists() else f"it has no {DEMO_FILE}"
    try:
        record = json.loads((model_dir / DEMO_FILE).read_text())
        inn_sha = json.loads((model_dir / "inn.json").read_text())["weights_sha256"]
        if not isinstance(record, dict):  # valid JSON, not the record's object ([] read as
            raise TypeError(f"{DEMO_FILE} is not an object")  # a bug, via record.get)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"its files are unreadable ({exc})"
    if not (model_dir / "model.yaml").is_file():
        return None, "model.yaml is missing"
    if record.get("inn_sha256") != inn_sha:
        return None, NOT_THE_DEMOS
    if record.get("recipe") != recipe:
        old = record.get("recipe")
        if isinstance(old, dict) and {**old, "trainer": None} == {**recipe, "trainer": None}:
            return None, (f"another innfer's training made it (trainer version "
                          f"{old.get('trainer', 1)}, this one's {recipe['trainer']})")  # fmt: skip
        try:
            return None, f"it was trained with {_describe(record['recipe'])}"
        except (KeyError, TypeError):
            return None, "it was trained with another recipe"
    return record, ""


def _demo_rebuild(args: argparse.Namespace, model_dir: Path, as_it_is: bool = False) -> int:
    """Build the reused model: tiers, engines and the profile are redone only if stale.
    ``as_it_is``: a model the demo did not make - its model.yaml is not rewritten (the
    demo's own gets the --threads it runs with)."""
    import torch
    import yaml

    from runtime.atomic import write_bytes
    from runtime.build.pipeline import build_model
    from runtime.configspec import read_yaml
    from runtime.repository import Repository
    from runtime.repository.config import ModelConfig

    torch.set_num_threads(args.threads)
    # Read as every command reads it (a syntax error, a key given twice, an empty file: a
    # ConfigError naming the file, not "internal error ... (a bug)" nor a silent rewrite).
    ModelConfig.load(model_dir / "model.yaml")
    config = read_yaml(model_dir / "model.yaml")
    if config.get("threads") != args.threads and not as_it_is:
        text = yaml.safe_dump({**config, "threads": args.threads}, sort_keys=False)
        write_bytes(model_dir / "model.yaml", text.encode())  # whole, or not at all
    repo = Repository(args.repository)
    report = build_model(repo, args.name, profile=False)
    if _profile_stale(repo, args.name, report):
        report = _built_by_either(report, build_model(repo, args.name))
    _print_build(report, repo)
    print(f"\nmodel repository: {model_dir} (reused next time; {_start_over(args, model_dir)})")
    return 0


def _built_by_either(first, second):
    """``second`` (the build that profiled) with each tier exported or its engine built
    where ``first`` did it: the second found all built, and the table said "cached" of
    engines this run had just built (review helper-240)."""
    import dataclasses

    done = {t.name: t for t in first.tiers}
    second.tiers = [
        dataclasses.replace(
            t, exported=t.exported or done[t.name].exported,
            engine_built=t.engine_built or done[t.name].engine_built,
        ) if t.name in done else t
        for t in second.tiers
    ]  # fmt: skip
    return second


def _profile_stale(repo, name: str, report) -> bool:
    """Whether profile.json must be measured again: a tier or engine was (re)built, or the
    profile is missing or from another backend, version, device or thread count."""
    from runtime.engines import get_backend

    if any(t.exported or t.engine_built for t in report.tiers):
        return True
    profile = repo.read_profile(name)
    if profile is None or set(profile.get("tiers", {})) != {t.name for t in report.tiers}:
        return True
    backend = get_backend(report.backend)
    now = {"backend": backend.name, "backend_version": backend.version(),
           "device": backend.device(), "threads": repo.config(name).threads}  # fmt: skip
    return any(profile.get(k) != v for k, v in now.items())


def _demo_convert(args: argparse.Namespace):
    from runtime.demo.training import evaluate, train_model
    from runtime.inn.conversion import convert
    from runtime.inn.report import accuracy_by_width, format_table

    print(f"training {args.model} (seed {args.seed}) ...")
    model, data = train_model(args.model, seed=args.seed, epochs=args.epochs, progress=True)
    full = evaluate(model, data.x_test, data.y_test)
    inn = convert(model, (data.x_test[:2],), seed=args.seed, progress=True, fold_norms=False)
    inn.info["input_shape"] = list(data.input_shape)
    print(f"trained: test accuracy {full:.2%}; continuous groups:")
    for g in inn.groups:
        print(f"  {g.name:<28} {g.size:>5} channels, {len(g.members)} tensors")
    print("\ntest accuracy by width right after conversion (no data, no fine-tuning):")
    print(format_table(accuracy_by_width(convert(model, (data.x_test[:2],)), data, args.widths),
                       reference=full))  # fmt: skip
    return inn, data


def _demo_tiers(widths: list[float]) -> list[dict]:
    """model.yaml's tiers for the demo's ``--widths``, named by percent (``w050``); two
    widths that round to one name are refused.

    Example:
        >>> [t["name"] for t in _demo_tiers([1.0, 0.5])]
        ['w100', 'w050']
    """
    tiers = [{"name": f"w{round(w * 100):03d}", "width": w} for w in widths]
    names = [t["name"] for t in tiers]
    for name in dict.fromkeys(n for n in names if names.count(n) > 1):
        clash = [w for w, n in zip(widths, names, strict=True) if n == name]
        raise ValueError(
            f"--widths {' and '.join(map(str, clash))} both make tier {name} (tiers are named "
            "by percent); give each width once, at least 0.01 apart"
        )
    return tiers


def _demo_repository(args: argparse.Namespace, inn, data, recipe: dict, seconds: float) -> int:
    import json

    from runtime.build.pipeline import add_model, build_model
    from runtime.repository import Repository

    tiers = _demo_tiers(args.widths)
    config = {
        "inputs": [{"name": "input", "dtype": "float32", "shape": list(data.input_shape)}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [data.num_classes]}],
        "tiers": tiers,
        "backends": ["onnxruntime"],
        "max_batch": 8,
        "threads": args.threads,
        "default_latency_budget_ms": 50,
        "evaluation": {"dataset": data.name},
    }
    model_dir = add_model(args.repository, args.name, inn, config)
    inn_sha = json.loads((model_dir / "inn.json").read_text())["weights_sha256"]
    record = {"recipe": recipe, "inn_sha256": inn_sha, "train_seconds": round(seconds, 1),
              "trained_at": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    (model_dir / DEMO_FILE).write_text(json.dumps(record, indent=1))
    print(f"\nmodel repository: {model_dir}")
    report = build_model(Repository(args.repository), args.name)
    _print_build(report, Repository(args.repository))
    print(f"\nmodel repository: {model_dir} (reused next time; {_start_over(args, model_dir)})")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from runtime.build.pipeline import build_model
    from runtime.repository import Repository

    _check_repository_dir(args.repository)
    _check_backend(args.backend, "--backend")  # not each model.yaml's fault, after the work
    repo = Repository(args.repository)
    names = list(dict.fromkeys(args.model)) if args.model else repo.names()  # once each
    if not args.model:
        for name in repo.skipped():  # they were passed over without a word
            print(f"warning: {args.repository}/{name} is not built: {repo.skip_reason(name)}",
                  file=sys.stderr)  # fmt: skip
        for said in repo.unconfigured():
            print(f"warning: {args.repository}/{said}; it is not built", file=sys.stderr)
    if not names:
        raise ValueError(_no_models(args.repository))
    failed = []
    for name in names:
        # One broken model no longer stops the others (it built none after it): each model
        # is its own directory, so a failure leaves the rest as they were; every failure is
        # said at once and again at the end, and the exit status is 2.
        try:
            report = build_model(repo, name, backend=args.backend, profile=not args.no_profile,
                                 prune=not args.keep_engines)  # fmt: skip
        except (ValueError, OSError, RuntimeError, KeyboardInterrupt) as exc:
            _say_unbuilt(repo, name)
            if len(names) == 1 or isinstance(exc, KeyboardInterrupt):
                raise
            print(f"innfer build: {name}: error: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        _print_build(report, repo)
    if failed:
        built = len(names) - len(failed)
        raise RuntimeError(
            f"{len(failed)} of {len(names)} models failed: {', '.join(failed)} (errors above; "
            f"{built} built)"
        )
    return 0


def _print_build(report, repo) -> None:
    from runtime.repository import RepositoryError

    profile = repo.read_profile(report.model) or {"tiers": {}}
    other = profile.get("backend") not in (None, report.backend)
    if other:  # (build --no-profile on another backend: its latencies stood under this one's
        # name; helper-276)
        measured, profile = profile.get("backend"), {"tiers": {}}
    lengths = sorted(map(int, profile.get("lengths", {})))
    # A sequence model: latency at its shortest profiled length (the longest is in tiers).
    tables = profile["lengths"][str(lengths[0])] if lengths else profile["tiers"]
    at = f", latency at {lengths[0]} tokens (profiled {lengths})" if lengths else ""
    config = repo.config(report.model)
    fidelity = config.evaluation is not None and config.evaluation.text is not None  # text
    top = max(config.batch_sizes)  # the largest batch profiled: model.yaml's max_batch
    rows = []
    for t in report.tiers:
        rec = repo.load_record(report.model, t.name)
        lat = tables.get(t.name, {})
        b1 = lat.get("1", {}).get("p50_ms")
        bmax = lat.get(str(top), {}).get("p50_ms")
        acc = "-" if t.accuracy is None else format(t.accuracy, ".4f" if fidelity else ".2%")
        state = "built" if t.engine_built else "cached"
        rows.append((t.name, f"{rec.flops / 1e6:.2f}", f"{rec.params:,}", acc, _ms(b1),
                     _ms(bmax), state))  # fmt: skip
    head = ("tier", "MFLOPs", "params", "cosine" if fidelity else "accuracy", "p50 b=1",
            f"p50 b={top}", "engine")  # fmt: skip
    # Each column as wide as its widest cell (an 11,176,842-parameter ResNet-18 overflowed
    # a fixed 9): the tier name left-aligned, numbers right.
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    widths = [max(w, m) for w, m in zip(widths, (8, 9, 9, 9, 9, 9, 8), strict=True)]
    print(f"\n{report.model} ({report.backend}{at}):")
    for r in [head, *rows]:
        print(" ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))))  # fmt: skip
    if other:
        print(
            f"(no latency: profile.json was measured with {measured}, not {report.backend}; "
            "build without --no-profile to measure it, or innfer serve measures it at load)"
        )
    try:
        chosen = repo.auto_tiers(report.model, config) if config.auto_tiers else None
    except RepositoryError:  # (a broken choice: the server's load says it, with its fix)
        chosen = None
    if chosen is not None:
        # The server serves that set, not the table's: a review of the table reviewed the
        # wrong tiers (deploy/README's step 2; review helper-151).
        print(f"served: auto-tiering's choice in auto_tiers.json ({', '.join(chosen[1])}), "
              "not the tiers above (`innfer tiers frontier` shows them)")  # fmt: skip
    with contextlib.suppress(RepositoryError, OSError, ValueError):  # (said by the load)
        if unlisted := repo.unlisted_tiers(report.model):
            mib = sum(n for _, n in unlisted) / 2**20
            folders = ", ".join(f"tiers/{t}" for t, _ in unlisted)
            print(f"kept, not served: {folders} ({mib:.1f} MiB) - model.yaml no longer lists "
                  f"{'them' if len(unlisted) > 1 else 'it'}; put back, a tier serves without "
                  "a rebuild; deleted, its cached engines go at the next build")  # fmt: skip
    removed, freed = report.pruned
    if removed:
        n = len(removed)
        print(f"removed {n} cached engine{'s' * (n != 1)} no tier uses any more (built from "
              f"replaced ONNX, or filed under an old cache key; {freed / 2**20:.1f} MiB; "
              f"--keep-engines keeps them)")  # fmt: skip
    for warning in report.warnings:
        print(f"warning: {warning}")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}ms"


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    # gRPC's C core logs each failed TLS handshake or bad preface at INFO, to stderr as
    # plain text: a client without a token wrote a line per connection, unthrottled, among
    # the JSON lines log pipelines parse (review 199). Its errors still show; an operator's
    # own GRPC_VERBOSITY wins. Read when gRPC starts, so set before the server is made.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from server.app import serve, setup_logging
    from server.config import ServerConfig

    setup_logging(args.log_level)
    if args.config:
        config = ServerConfig.load(args.config, repository=args.repository)
    elif args.repository:
        config = ServerConfig.from_dict({"repository": str(args.repository)})
    else:
        raise ValueError("give --repository DIR or --config FILE")
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "grpc_port": args.port,
            "metrics_port": args.metrics_port,
            "http_port": args.http_port,
            "policy": args.policy,
            "backend": args.backend,
            "budget_margin_ms": args.budget_margin_ms,
            "plan_overhead": args.plan_overhead,
            "overhead_quantile": args.overhead_quantile,
            "tune_malloc": args.tune_malloc,
            "gil_switch_ms": args.gil_switch_ms,
        }.items()
        if v is not None
    }
    config = _override(config, overrides)  # validated like the file: --policy fixed: is refused
    _check_repository(config)
    _check_backend(config.backend, "--backend" if args.backend else f"{config.source}: backend")
    asyncio.run(serve(config))
    return 0


def _check_backend(name: str | None, given: str) -> None:
    """A backend forced on every model (``given``: where - serve's or build's --backend, the
    server config's backend) that this machine lacks stops the command at start: serve
    started, failed every model's load with "<model>/model.yaml: none of the backends
    ['tensorrt'] is available ...; rebuild it with innfer build" - the wrong file and the
    wrong fix - and, without model control, stayed up not ready; build said the same of
    every model.yaml."""
    if name is None:
        return
    from runtime.engines import get_backend

    reason = get_backend(name).unavailable_reason()
    if reason is not None:
        raise ValueError(
            f"{given}: {name} is not available on this machine ({reason}); run where it is, "
            "or leave backend unset (null) to use each model's own preference (model.yaml)"
        )


# innfer serve's flags by the server config field they set (where the names differ).
SERVE_FLAGS = {"grpc_port": "--port"}


def _override(config, overrides: dict):
    """``config`` with the command line's ``overrides``, validated like the file; a value
    refused is named by its flag (it was "<config>: policy: got 'foo'" for ``--policy foo``,
    or the config file's name, which did not hold it)."""
    try:
        return config.replace(**overrides)
    except ValueError as exc:
        flags = {f: SERVE_FLAGS.get(f, "--" + f.replace("_", "-")) for f in overrides}
        for field, flag in flags.items():
            prefix = f"{config.source}: {field}: "
            if str(exc).startswith(prefix):
                raise ValueError(f"{flag}: {str(exc)[len(prefix) :]}") from None
        # A field the file holds, refused for one a flag set (http_port clashing with
        # --port's grpc_port was blamed on the file alone: review helper-243)
        named = [f"{field} from {flag} {overrides[field]}" for field, flag in flags.items()
                 if field in str(exc)]  # fmt: skip
        if named:
            raise ValueError(f"{exc} ({', '.join(named)} on the command line)") from None
        raise


def _check_repository(config) -> None:
    """A server that can serve nothing is a mistake, not a ready server (it answered
    readiness SERVING with no models): a missing repository, or - with no way to load
    models later - one without any."""
    from runtime.repository import Repository

    repo = Path(config.repository)
    _check_repository_dir(repo)
    if config.model_control != "none":
        return
    names = Repository(repo).names()
    if not config.models and not names:
        raise ValueError(_no_models(repo))
    # A configured model the repository lacks could never load (nothing loads models later):
    # the server started and stayed not ready for good (review 160).
    if missing := [m for m in config.models if m not in names]:
        held = ", ".join(sorted(names)[:8]) or "none"
        raise ValueError(
            f"models {', '.join(missing)} (models: in the server config) are not in {repo} "
            f"(it holds: {held}); with model_control none nothing could load them later: "
            "fix the names, or add and build the models"
        )


def _check_repository_dir(repo: Path) -> None:
    """``innfer serve`` and ``build`` say the same of a repository that is not there."""
    if not Path(repo).is_dir():
        # (not "build one with `innfer build`" - said to `innfer build` itself)
        raise ValueError(
            f"repository {repo} is not a directory: give the folder that holds the models' "
            "folders (<repository>/<model>/model.yaml; `innfer demo` makes one)"
        )


def _no_models(repo: Path) -> str:
    """What ``serve`` and ``build`` say of a repository without models (a model's own folder,
    given for its repository, is the usual cause)."""
    from runtime.repository import Repository

    own = (Path(repo) / "model.yaml").is_file()
    hint = " (it is a model's own folder: give its parent)" if own else ""
    if not own:  # a folder passed over (a link, a name that is not a model name), or one
        # holding an INN but no model.yaml, are the next usual causes - each said as the
        # repository says it (a linked folder read "holds an INN but no model.yaml: write
        # one" beside its model.yaml: review helper-228)
        r = Repository(repo)
        said = [f"{name}: {r.skip_reason(name)}" for name in r.skipped()] + r.unconfigured()
        if said:
            hint = f" ({'; '.join(said[:4])})"
    return f"no models in {repo}: each is a folder <model>/model.yaml{hint}"


def _budget_range(text: str) -> tuple[float, float]:
    try:
        lo, _, hi = text.partition(":")
        lo_f, hi_f = float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be LO:HI in ms, got {text!r}") from None
    if not 0 < lo_f <= hi_f < math.inf:
        raise argparse.ArgumentTypeError(f"budget must satisfy 0 < LO <= HI < inf, got {text!r}")
    return lo_f, hi_f


def _positive(text: str) -> float:
    """A finite number > 0 (an infinite load or duration reached the trace's arithmetic)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


# runtime.demo.data.DATASETS' names (that module imports torch: not at parse time).
BUNDLED_DATA = ("digits", "mnist5k", "mnist1d")


def _data_name(text: str) -> str:
    """A bundled data set's name or a .npz file (``runtime.demo.data.load``): refused at
    parse time otherwise, as the choices were."""
    if text in BUNDLED_DATA or text.endswith(".npz"):
        return text
    raise argparse.ArgumentTypeError(
        f"got {text!r}: give {', '.join(BUNDLED_DATA)} or a .npz file of your own"
    )


def _at_least(lo: int, hi: int | None = None):
    """An argparse type: an int >= ``lo`` (and <= ``hi``), refused at parse time with the
    option's name (``--slots 0`` reached the simulator as "negative dimensions are not
    allowed"; ``demo --threads 300`` trained for a minute, then blamed the model.yaml the
    demo wrote).

    Example:
        >>> _at_least(1)("3")
        3
    """

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            within = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"expected a whole number {within}, got {text!r}")
        return v

    parse.__name__ = f"int >= {lo}" if hi is None else f"int in [{lo}, {hi}]"
    return parse


# What --threads and --seed take: model.yaml's threads bound, and numpy's and torch's seeds
# (-1 was "expected non-negative integer" after the work, naming no flag).
_threads = _at_least(1, 256)
_seed = _at_least(0, 2**32 - 1)


def _model_name(text: str) -> str:
    """An argparse type: a model name the repository accepts (one directory name):
    ``demo --name ../escaped`` trained, then wrote its INN outside the repository."""
    from runtime.repository.store import InvalidModelName, check_model_name

    try:
        check_model_name(text)
    except InvalidModelName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _at_most(hi: float, why: str, zero: bool = False):
    """An argparse type: a finite number in (0, ``hi``] - [0, ``hi``] with ``zero`` -
    (``why``: what more would do)."""

    def parse(text: str) -> float:
        v = (_non_negative if zero else _positive)(text)
        if v > hi:
            raise argparse.ArgumentTypeError(f"expected at most {hi:g} ({why}), got {text!r}")
        return v

    parse.__name__ = f"number in {'[' if zero else '('}0, {hi:g}]"
    return parse


# A gamma trace drawn from t = 0 holds about rate * duration + (cv2 - 1) / 2 arrivals: a CV2
# of 1e8 drew 10 million (past every bound on requests); 100 is burstier than any trace
# the benchmarks use (4, 8). A log-normal sigma of 3 makes the p99 engine time ~1000x the
# median; 1e308 made it infinite (NaN in the JSON).
_cv2 = _at_most(100.0, "a burstier trace holds about CV2 / 2 requests at its start")
_noise = _at_most(3.0, "a log-normal sigma of 3 is a p99 ~1000x the median", zero=True)


def _non_negative(text: str) -> float:
    """A finite number >= 0 (a noise sigma, a squared CV, seconds that may be 0)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= v < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def _sim_config(args: argparse.Namespace, policy: str):
    """The simulation's settings: the trace from the flags; the scheduler's from the model's
    model.yaml, as the server would run it (max_batch, max_queue, slo_target,
    admit_quantile)."""
    from runtime.repository.config import ModelConfig
    from sim.simulator import SimConfig

    model = ModelConfig.load(Path(args.model_dir) / "model.yaml")
    if args.cv2 is not None and args.trace != "gamma":  # read by the gamma trace alone
        raise ValueError(
            f"--cv2 shapes a gamma trace; --trace is {args.trace or 'poisson'}: add --trace "
            "gamma, or drop --cv2"
        )
    simulated = {  # simulate's own flags (bench sends to a server, which has its own)
        k: getattr(args, k) for k in ("noise", "budget_margin_ms") if k in args
    }
    return SimConfig(
        policy=policy, trace=args.trace, load=args.load, cv2=args.cv2 or 1.0,
        duration_s=args.duration if args.duration is not None else DEFAULT_DURATION_S,
        budget_ms=args.budget, seed=args.seed,
        slots=args.slots, trace_file=args.trace_file, max_batch=model.max_batch,
        max_queue=model.max_queue, slo_target=model.slo_target,
        admit_quantile=model.admit_quantile, **simulated,
    )  # fmt: skip


def _say_instances(args: argparse.Namespace) -> None:
    """Say where the model's ``instances`` (batches at once on the server, within its
    device_slots) differ from the simulated device's ``--slots``: simulate ran one slot
    for a model of 2 or 4 and said nothing, its figures those of another server (review
    helper-314)."""
    from runtime.repository import Repository
    from runtime.repository.config import ModelConfig

    d = Path(args.model_dir).resolve()
    instances = ModelConfig.load(d / "model.yaml").instances
    backend = Repository(d.parent).served_tiers(d.name)[1].get("backend")
    if backend == "torch":  # one module per tier: the server plans such a model with 1
        instances = 1  # (server.model_runtime._instances; helper-316)
    if instances != args.slots:
        print(
            f"note: model.yaml has instances: {instances} (the server runs up to that many "
            f"batches at once, within its device_slots); this simulates --slots {args.slots}"
            + (f": pass --slots {instances} to simulate that" if args.host_ms is None
               and args.clients is None else "")
        )  # fmt: skip


def _offered(args: argparse.Namespace) -> str:
    """The load a simulation's title names: a file trace is replayed as recorded, whatever
    ``--load`` says."""
    lo, hi = args.budget
    drawn = f"budgets U({lo:g}, {hi:g}) ms"  # (every attainment figure depends on them)
    if args.clients is not None:
        return f"closed loop, {args.clients} clients, {drawn}"
    if args.trace == "file":
        budgets = "its budgets" if _recorded_budgets(args.trace_file) else drawn
        return f"trace {Path(args.trace_file).name}, {budgets}"
    return f"{args.trace}, load {args.load}x, {drawn}"


def _resolve_closed_loop(args: argparse.Namespace) -> None:
    """``--clients`` sends as answers come back, so the flags that shape an open loop's
    arrivals have nothing to shape: given with it, they are refused (not ignored); without
    it ``--load`` defaults to 1."""
    if args.clients is not None:
        flags = (("--trace", args.trace), ("--trace-file", args.trace_file),
                 ("--load", args.load), ("--cv2", args.cv2))  # fmt: skip
        given = [flag for flag, v in flags if v is not None]
        if given:
            raise ValueError(
                f"--clients {args.clients} runs a closed loop: each client sends when its last "
                f"request is answered, so {', '.join(given)} (an open loop's arrivals) "
                f"{'do' if len(given) > 1 else 'does'} not apply; drop "
                f"{'them' if len(given) > 1 else 'it'}, or drop --clients"
            )
    args.load = 1.0 if args.load is None else args.load


def _resolve_trace(args: argparse.Namespace) -> None:
    """``--trace-file`` means ``--trace file`` (it was ignored beside the default Poisson
    trace, a missing file included); with another ``--trace`` it is an error."""
    _resolve_closed_loop(args)
    if args.trace_file is not None and args.trace not in (None, "file"):
        raise ValueError(
            f"--trace-file goes with --trace file, not --trace {args.trace}: drop it, or give "
            "--trace file"
        )
    args.trace = args.trace or ("file" if args.trace_file is not None else "poisson")
    if args.trace == "file" and args.trace_file is None:  # it said "needs trace_file"
        raise ValueError("--trace file needs --trace-file PATH (timestamps in seconds, one a line)")
    if args.trace_file is not None and not Path(args.trace_file).is_file():
        what = "a directory" if Path(args.trace_file).is_dir() else "no such file"
        raise ValueError(f"--trace-file {args.trace_file}: {what}; give a file")


def _load_unit(tiers, p50, cfg, host_ms: tuple | None = None, batch_ms: float = 0.0) -> str:
    """What ``--load`` 1 means for this model - the rate of its full tier's engine at
    max_batch (the same trace with and without --host-ms) - and, with ``host_ms``, what one
    core serves once each request's handling (parse + answer ms, and ``batch_ms`` per full
    batch) shares it: for a small model far less (the demo CNN: 11,869 against 531
    requests/s), which --load 2 ignored."""
    from sim.engine_time import full_capacity, profiled_ms

    max_batch = cfg.max_batch or min(t.max_batch for t in tiers)
    unit = full_capacity(tiers, p50, max_batch, cfg.slots)
    top = max(tiers, key=lambda t: t.accuracy).name  # (w075 where it beats w100: said)
    line = (f"load {cfg.load:g}x of {unit:,.0f} requests/s (the most accurate tier's engine, "
            f"{top}, at batch {max_batch})")  # fmt: skip
    if not host_ms:
        return line + "; --host-ms PARSE,ANSWER says what one core serves with request handling"
    handling = (sum(host_ms[:2]) / 1e3, batch_ms / 1e3)
    served = full_capacity(tiers, p50, max_batch, 1, *handling)
    # The fastest tier's is what the planner can fall back to: the queue grows only past
    # it (judged on the full tier's, a text model served at 1.7x was said to overflow;
    # helper-317).
    fastest = min(tiers, key=lambda t: profiled_ms(p50[t.name], max_batch))
    most = full_capacity([fastest], p50, max_batch, 1, *handling)
    per_batch = f" and {batch_ms:g} ms per batch" if batch_ms else ""
    line = (f"{line}; with {sum(host_ms[:2]):g} ms of request handling each{per_batch}, one "
            f"core serves {served:,.0f} requests/s on {top} (load {served / unit:.3g}x), "
            f"{most:,.0f} on its fastest tier {fastest.name} ({most / unit:.3g}x)")  # fmt: skip
    if cfg.load > most / unit:  # (the README's example load overloaded a faster machine)
        line += (f" - --load {cfg.load:g} is above even that: the queue grows for the whole "
                 f"run; give --load below {most / unit:.3g}")  # fmt: skip
    return line


def _closed_loop_bound(
    tiers, p50, cfg, clients: int, host_ms: tuple | None = None, batch_ms: float = 0.0
) -> str:
    """What ``clients`` closed-loop clients can at best see (Little's law): the fastest
    tier's rate at max_batch (or at ``clients`` rows, fewer clients never batch more) -
    with ``host_ms``, on one core with the request handling - keeps ``clients`` requests
    outstanding for clients / rate s each on average. A budget under that cannot be met for
    every request whatever the scheduler does; issue 18's c=32 at 30 ms on the ResNet was
    such a point (w025: ~435/s at batch 8, ~74 ms)."""
    from sim.engine_time import full_capacity

    # (at max_batch whatever the clients: one client "at best at batch 8, 0.275 ms" under
    # a 0.3 ms budget that its batch of 1 at 0.314 ms never met; review helper-236)
    max_batch = min(cfg.max_batch or min(t.max_batch for t in tiers), clients)
    fastest = min(tiers, key=lambda t: t.accuracy)  # the least accurate: the planner's fastest
    host_s = sum(host_ms[:2]) / 1e3 if host_ms else 0.0
    rate = full_capacity([fastest], p50, max_batch, cfg.slots, host_s, batch_ms / 1e3)
    where = "with the request handling on one core" if host_ms else "engine time only"
    wait_ms = 1e3 * clients / rate
    line = (f"closed loop of {clients}: at best {fastest.name} at batch {max_batch}, "
            f"{rate:,.0f} requests/s ({where}), a mean latency of {wait_ms:.3g} ms by "
            "Little's law")  # fmt: skip
    if wait_ms > cfg.budget_ms[1]:
        line += (f" - above every budget (--budget up to {cfg.budget_ms[1]:g} ms): most "
                 "requests are refused or late whatever the scheduler does")  # fmt: skip
    return line


def _check_policies(policies: list[str], tiers) -> None:
    """Refuse an unknown --policy before any simulation: one after others was refused once
    they had run, their results and --json lost (review 191)."""
    from server.scheduling import make_policy

    for p in policies:
        make_policy(p, tiers)


def cmd_simulate(args: argparse.Namespace) -> int:
    import json

    _resolve_trace(args)
    from sim.simulator import format_summary, plot_timeline, simulate

    _check_built(args.model_dir)
    _check_budget_margin(args)
    tiers, p50, chosen, proxy, _ = _served(args.model_dir, args.tokens)
    note = "".join(f"; {n}" for n in (chosen, proxy and f"accuracy: {proxy}") if n)
    policies = args.policy or ["innfer", "slackfit"]
    _check_policies(policies, tiers)
    _fit_duration(args, tiers, p50)
    _say_instances(args)
    if args.host_batch_ms and args.host_ms is None:
        raise ValueError(
            "--host-batch-ms is the shared core's CPU per batch: give --host-ms PARSE,ANSWER "
            "with it (without --host-ms the engine's core does nothing else)"
        )
    if args.plan_overhead and args.host_ms is None:
        raise ValueError(
            "--plan-overhead plans for the request handling --host-ms simulates: give "
            "--host-ms PARSE,ANSWER with it"
        )
    if args.plan_overhead is None:  # as the server's default, where there is handling to plan
        args.plan_overhead = args.host_ms is not None
    if args.host_ms is not None or args.clients is not None:
        if args.plot or args.slots != 1:
            what = ("--host-ms simulates one shared core" if args.host_ms is not None
                    else "--clients simulates one device slot")  # fmt: skip
            raise ValueError(f"{what}: no --plot, --slots 1")
        code = _simulate_shared(args, tiers, p50, policies, note)
        _print_load_unit(args, tiers, p50, policies[0])
        return code
    results = {}
    for policy in policies:
        result = simulate(tiers, p50, _sim_config(args, policy), progress=True)
        results[policy] = result.to_json()
        print(format_summary(result.summary, f"{policy} ({_offered(args)}){note}"))
        if args.plot:
            path = Path(args.plot)
            if len(policies) > 1:
                path = path.with_name(f"{path.stem}-{policy.replace(':', '_')}{path.suffix}")
            plot_timeline(result, tiers, path)
            print(f"  plot            {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    _print_load_unit(args, tiers, p50, policies[0])
    return 0


def _check_budget_margin(args: argparse.Namespace) -> None:
    """Budgets within ``--budget-margin-ms`` are planned at 0 ms or less and refused, as the
    server refuses them: a ``--budget`` range wholly within it is refused before the run (it
    printed 0 % attainment and no reason); one partly within is said."""
    if args.trace == "file" and _recorded_budgets(args.trace_file):
        return  # the file's own budgets; its refusals are counted like the server's
    lo, hi = args.budget
    margin = args.budget_margin_ms
    if hi <= margin:
        raise ValueError(
            f"--budget {lo:g}:{hi:g} ms is within --budget-margin-ms {margin:g}: every budget "
            "is planned at 0 ms or less and every request refused; give budgets above the "
            "margin, or a lower --budget-margin-ms"
        )
    if lo <= margin:
        print(
            f"--budget {lo:g}:{hi:g} ms: budgets up to --budget-margin-ms {margin:g} are "
            "planned at 0 ms or less and refused, as the server refuses them"
        )


def _recorded_budgets(path: str) -> bool:
    """Whether the trace file carries each request's budget (a traffic CSV)."""
    from sim.traces import recorded

    return recorded(path) is not None


def _fit_duration(args: argparse.Namespace, tiers, p50) -> None:
    """Where ``--duration`` is not given: ``DEFAULT_DURATION_S`` of arrivals, or fewer where
    that would be over ``DEFAULT_SIM_REQUESTS`` requests (said). A small model's capacity
    made the default 30 s about 4 million requests: minutes per policy, unasked."""
    if args.duration is not None:
        return
    args.duration = DEFAULT_DURATION_S
    if args.trace == "file" or args.clients is not None:  # replayed whole; sent as answered
        return
    from sim.simulator import load_rate

    rate = load_rate(tiers, p50, _sim_config(args, "innfer"))
    if rate * DEFAULT_DURATION_S > DEFAULT_SIM_REQUESTS:
        args.duration = DEFAULT_SIM_REQUESTS / rate
        print(
            f"{args.duration:.3g} s of arrivals simulated ({DEFAULT_SIM_REQUESTS:,} requests at "
            f"{rate:,.0f}/s; {DEFAULT_DURATION_S:g} s would be {rate * DEFAULT_DURATION_S:,.0f}): "
            "--duration sets it"
        )


def _capped(n: int, span: float, duration: float, engine_only: bool) -> str:
    """What a closed loop cut short by its cap of ``n`` sends says: the figures are over
    the ``span`` simulated, and why it ran out (refusals that cost no time, engine only)."""
    why = (
        "; engine only, a refusal costs no time and its client sends again at once: give "
        "--host-ms for request handling's cost"
        if engine_only and span < duration / 10
        else ""
    )
    return (
        f"the clients' first {n:,} requests took {span:.3g} s of the {duration:g} s of "
        f"--duration: the figures are over those {span:.3g} s{why}"
    )


def _print_load_unit(args: argparse.Namespace, tiers, p50, policy: str) -> None:
    if args.clients is not None:
        cfg = _sim_config(args, policy)
        print(_closed_loop_bound(tiers, p50, cfg, args.clients, args.host_ms, args.host_batch_ms))
    elif args.trace != "file":  # a file is replayed as recorded
        print(_load_unit(tiers, p50, _sim_config(args, policy), args.host_ms, args.host_batch_ms))


def _simulate_shared(
    args: argparse.Namespace, tiers, p50, policies: list[str], note: str = ""
) -> int:
    """``innfer simulate --host-ms``: the same trace and budgets as the engine-only
    simulation, served by the scheduler and engine on one core that also does the request
    handling (``sim.shared_core``): each request costs PARSE ms of that core before the
    scheduler sees it, ANSWER ms after its batch (and to be refused), and CLIENT ms of the
    client's own time; with ``--host-batch-ms``, that many ms per batch run (deciding,
    launching, settling it: the server's ``innfer_host_cpu_per_batch_seconds``). A server's
    ``process_cpu_seconds_total`` minus its ``innfer_compute_cpu_seconds_total``, per
    request, is what PARSE + ANSWER add up to - with the batches' share, which
    ``--host-batch-ms`` then takes out of them."""
    import json

    from sim.shared_core import HostCost, simulate_shared
    from sim.simulator import closed_loop_budgets, format_summary, requests_for, trace_window
    from sim.traces import recorded

    parse, answer, client = args.host_ms or (0.0, 0.0, 0.0)  # --clients alone: engine only
    batch = args.host_batch_ms
    host = HostCost(parse / 1e3, answer / 1e3, client_s=client / 1e3, batch_s=batch / 1e3)
    traffic = recorded(args.trace_file) if args.trace == "file" else None
    if traffic is not None and len(traffic.rows) and traffic.rows.max() > 1:
        # the shared-core model serves one row per request: a trace of batches ran as rows
        # of one, silently (the same figures for rows 1 and rows 4)
        raise ValueError(
            f"{args.trace_file} has requests of up to {int(traffic.rows.max())} rows; --host-ms "
            "simulates one row per request: drop --host-ms for this trace"
        )
    accuracy = {t.name: t.accuracy for t in tiers}
    results = {}
    for policy in policies:
        cfg = _sim_config(args, policy)
        if args.clients is not None:  # sent as answered: at most DEFAULT_SIM_REQUESTS
            budgets = closed_loop_budgets(cfg, DEFAULT_SIM_REQUESTS)
            load = {"clients": args.clients, "n_requests": len(budgets),
                    "max_seconds": cfg.duration_s}  # fmt: skip
        else:
            rate, arrivals, budgets, _ = requests_for(tiers, p50, cfg)
            load = {"arrivals": arrivals}
        r = simulate_shared(
            tiers, p50, host, lambda i, b=budgets: float(b[i]), **load,
            policy=policy, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
            slo_target=cfg.slo_target, admit_quantile=cfg.admit_quantile, widths=accuracy,
            seed=cfg.seed, noise=cfg.noise, budget_margin_s=cfg.budget_margin_ms / 1e3,
            plan_overhead=args.plan_overhead,
        )  # fmt: skip
        if args.clients is not None:
            # Over the time simulated: --duration, or longer where the last answers came
            # after it (as bench counts), or shorter where the cap ended the sends - 300,000
            # requests "at 83.3/s" had taken 900 s of 3,600 (review helper-236).
            span = r.summary["span_s"]
            window = max(cfg.duration_s, span)
            if r.summary["sent"] == len(budgets):  # the cap, not --duration, ended the sends
                window = span
                print(_capped(len(budgets), span, cfg.duration_s, args.host_ms is None))
            window = max(window, 1e-9)  # (every request refused at 0 s, engine only)
            rate = r.summary["sent"] / window
        else:  # (or to the last answer, as bench counts it: review helper-236)
            window = max(trace_window(cfg, arrivals), r.summary["span_s"])
        s = {
            **r.summary,
            # over the trace's window, as the engine-only simulation counts it (first send
            # to last answer gave a one-request trace 69.6/s beside an offered 0.0/s)
            "goodput_per_s": r.summary["within_budget"] / window,
            "requests": r.summary["sent"],
            "offered_rate_per_s": rate,
            "mean_served_accuracy": r.summary["mean_served_size"],
            "full_tier_accuracy": max(accuracy.values()),
        }
        if args.host_ms is not None:
            s["host_ms"] = {"parse": parse, "answer": answer, "client": client, "batch": batch}
        run = {"policy": policy, "load": args.load} if args.clients is None else {
            "policy": policy, "clients": args.clients, "duration_s": cfg.duration_s}  # fmt: skip
        results[policy] = {"config": run, "summary": s}
        per_batch = f" + {batch:g} per batch" if batch else ""
        where = (f"one core: host {parse}+{answer} ms{per_batch}" if args.host_ms is not None
                 else "engine time only")  # fmt: skip
        title = f"{policy} ({_offered(args)}, {where}){note}"
        print(format_summary(s, title))
        if _overhead_hint(args, s):
            print("  most answers were late by the request handling the plans do not count: "
                  "drop --no-plan-overhead (the server config's plan_overhead)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _usable_threads(most: int = 2) -> int:
    """``most``, or fewer where this process may use fewer CPUs (affinity, a cgroup quota):
    the demo wrote threads: 2 on one CPU, and its server warned of oversubscribed engines
    and ran past its profile (review helper-257)."""
    from server.host_cpu import available_cpus

    return max(1, min(most, int(available_cpus())))


def _overhead_hint(args: argparse.Namespace, summary: dict) -> bool:
    """Whether to suggest --plan-overhead: host costs simulated without it, and more late
    answers than on-time ones - the planner filled the budgets with compute and the
    handling made them late (a closed loop of 8 at 30 ms: 0.18 % within budget, 98.7 %
    with it; review helper-255)."""
    if args.host_ms is None or args.plan_overhead:
        return False
    return summary.get("late", 0) > summary.get("within_budget", 0)


def _check_built(model_dir: Path) -> None:
    """A model ``innfer simulate`` / ``bench`` can read: its profile.json (the latencies)
    exists; else a ValueError that says what to run (it was a bare "[Errno 2] No such file")."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"no such model: {d} is not a directory (give <repository>/<model>)")
    yaml = d / "model.yaml"
    if yaml.is_symlink() and not yaml.exists():  # (said as a missing file: review helper-271)
        raise ValueError(f"{yaml} is a link to nothing ({os.readlink(yaml)}): mount or "
                         "restore what it names")  # fmt: skip
    if yaml.is_dir():
        raise ValueError(f"{yaml} is a folder: it must be the model's YAML file")
    if not yaml.is_file():
        raise ValueError(f"{d} is not a model: it has no model.yaml (give <repository>/<model>)")
    if not (d / "profile.json").is_file():
        raise ValueError(
            f"{d} has no profile.json: run `innfer build {d.parent} --model {d.name}` first"
        )


def _served(model_dir: Path, tokens: int | None = None) -> tuple[list, dict, str, str, int]:
    """(TierInfo list, p50 tables, where the tiers come from, what "accuracy" is, lane) for
    the tiers a server would serve from a built model: auto-tiering's choice where it made
    one (then the first note names them), else model.yaml's (""). The second note is
    ``FLOPS_PROXY`` where an accuracy is not a measured one (the scheduler then ranks tiers
    by FLOPs: ``tiers_from_profile``), as ``innfer tiers frontier`` says it; "" else. A
    model with sequence lengths (a transformer) is planned at the lane a request of
    ``tokens`` joins - the shortest profiled length that holds it; default the longest -
    and the first note says which (lane 0: fixed shapes)."""
    from innfer.tiers import FLOPS_PROXY, FLOPS_PROXY_LARGEST
    from runtime.repository import Repository
    from server.scheduling.latency import tiers_from_profile
    from server.scheduling.lengths import LengthSpan

    d = Path(model_dir).resolve()
    records, profile, source = Repository(d.parent).served_tiers(d.name)
    full, (profile, lane) = profile, _lane_profile(profile, tokens)
    tiers, p50 = tiers_from_profile(profile, records)
    chosen = ""
    if source == "frontier":
        chosen = f"the tiers auto-tiering chose ({', '.join(records)}; auto_tiers.json)"
    if lane:
        lengths = sorted(int(n) for n in profile["lengths"])
        chosen = f"every request at {lane} tokens (lanes {lengths}; --tokens to change)"
        shorter = [n for n in lengths if n < lane]
        if tokens is not None and tokens < lane and shorter and _plans_by_tokens(d, full):
            lo = shorter[-1]
            lo_tiers, _ = tiers_from_profile({**full, "tiers": full["lengths"][str(lo)]}, records)
            tiers, p50 = _at_tokens(tiers, p50, LengthSpan(lo, lane, lo_tiers), tokens)
            chosen = (f"every request at {tokens} tokens, between the {lo}- and {lane}-token "
                      f"profiles as the server plans a text (lanes {lengths}; --tokens to "
                      "change)")  # fmt: skip
    proxy = any(records[t].accuracy is None for t in profile["tiers"])
    # a frontier's candidates always carry one: the FLOPs fraction where it had no
    # evaluation set, and simulate said nothing of it (review helper-255)
    proxy = proxy or (source == "frontier" and _frontier_flops(d))
    if not proxy:
        return tiers, p50, chosen, "", lane
    full = source == "frontier" or any(r.width == 1.0 for r in records.values())
    return tiers, p50, chosen, FLOPS_PROXY if full else FLOPS_PROXY_LARGEST, lane


def _plans_by_tokens(model_dir: Path, profile: dict) -> bool:
    """Whether the server plans this model's requests by their tokens (``ModelRuntime``): a
    text model, or one whose mask is named, on engines that pad a batch to its longest (a
    torch engine on a GPU pads to the lane, for its CUDA graphs, unless they are off). A
    torch profile names its device as the GPU's name ("NVIDIA H100 80GB HBM3") or a CPU's
    (the store's test: "cpu" in it); a CUDA check on "cuda" matched none (helper-319)."""
    from runtime.engines.torch import CUDA_GRAPHS_ENV
    from runtime.repository.config import ModelConfig

    config = ModelConfig.load(model_dir / "model.yaml")
    gpu = profile.get("backend") == "torch" and "cpu" not in str(profile.get("device", ""))
    graphs = os.environ.get(CUDA_GRAPHS_ENV, "1") != "0"
    return (config.text is not None or config.mask_input is not None) and not (gpu and graphs)


def _at_tokens(tiers: list, p50: dict, span, tokens: int) -> tuple[list, dict]:
    """``tiers`` and ``p50`` (a lane's profile) at ``tokens``: every time x the span's
    ratio there (``server.scheduling.lengths``)."""
    ratio = {t.name: span.ratio_at(t, span.step(tokens)) for t in tiers}
    times = {name: {b: v * ratio[name] for b, v in m.items()} for name, m in p50.items()}
    return [t.scaled(ratio[t.name]) for t in tiers], times


def _frontier_flops(model_dir: Path) -> bool:
    """Whether the model's frontier scores its candidates by FLOPs (no evaluation set)."""
    from runtime.repository.frontier import FRONTIER_DIR, FRONTIER_FILE, Frontier

    path = model_dir / FRONTIER_DIR / FRONTIER_FILE
    return Frontier.read(path).accuracy_source.startswith("flops")


def _lane_profile(profile: dict, tokens: int | None) -> tuple[dict, int]:
    """(profile with the tables of the lane a request of ``tokens`` joins, that lane's
    length) for a model profiled per sequence length; (profile, 0) for fixed shapes. The
    top-level tables of a text model's profile are its longest length's: planning every
    request as a 256-token one put all of them on the smallest tier."""
    lengths = sorted(int(n) for n in profile.get("lengths") or {})
    if not lengths:
        if tokens is not None:
            raise ValueError("--tokens is for models with sequence lengths (a text model)")
        return profile, 0
    want = lengths[-1] if tokens is None else tokens
    lane = next((n for n in lengths if n >= want), None)
    if lane is None or want < 1:
        raise ValueError(f"--tokens must be in [1, {lengths[-1]}] (profiled lengths {lengths})")
    return {**profile, "tiers": profile["lengths"][str(lane)]}, lane


def _host_ms_arg(text: str) -> tuple[float, float, float]:
    from sim.shared_core import host_ms  # the simulators load only when a command needs them

    return host_ms(text)


def _bench_host_ms_arg(text: str) -> tuple[float, float, float]:
    """bench's ``--host-ms PARSE,ANSWER``: the client's part is what bench measures itself
    (it was taken and never used: review helper-236)."""
    if text.count(",") == 2:
        raise argparse.ArgumentTypeError(
            f"bench's --host-ms takes PARSE,ANSWER (the server's ms per request), got {text!r}: "
            "the client's own time is what bench measures"
        )
    try:
        return _host_ms_arg(text)
    except argparse.ArgumentTypeError as exc:  # (sim's says PARSE,ANSWER[,CLIENT]: helper-280)
        raise argparse.ArgumentTypeError(
            str(exc).replace("PARSE,ANSWER[,CLIENT]", "PARSE,ANSWER", 1)
        ) from None


def _host_batch_ms_arg(text: str) -> float:
    from sim.shared_core import host_batch_ms

    return host_batch_ms(text)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    _resolve_trace(args)
    flags = (("--host-ms", args.host_ms is not None), ("--slots", args.slots != 1))
    ignored = [flag for flag, given in flags if given]
    if args.trace == "file" and ignored:  # (they ran unsaid: review helper-236)
        raise ValueError(
            f"{' and '.join(ignored)} only size --load's unit, and a --trace-file is sent as "
            "recorded: drop them"
        )
    try:  # the client innfer bench is (the dev extra; a serving image has none)
        import tritonclient.grpc.aio  # noqa: F401
    except ImportError:
        raise ValueError(
            "innfer bench sends its requests with tritonclient, which is not installed here: "
            "pip install 'tritonclient[grpc]' (in innfer's dev extra: pip install 'innfer[dev]', "
            "from a checkout pip install -e '.[dev]')"
        ) from None
    from runtime.repository.config import ModelConfig
    from sim.loadgen import check_loopback
    from sim.simulator import format_ms

    check_loopback(args.address)  # before the work and the "sending ..." line
    _check_built(args.model_dir)
    tiers, p50, chosen, proxy, lane = _served(args.model_dir, args.tokens)
    config = ModelConfig.load(Path(args.model_dir) / "model.yaml")
    cfg = _sim_config(args, "innfer")
    name = args.model or Path(args.model_dir).resolve().name  # ("." named model '')
    accuracy = {t.name: t.accuracy for t in tiers}
    load = _bench_closed_loop if args.clients is not None else _bench_open_loop
    # Sent at the length asked for (--tokens), planned at its lane: every request was padded
    # to the lane's length, 8 tokens sent for --tokens 5 (review helper-250).
    length = args.tokens or lane
    report, offered_s = load(args, tiers, p50, config, cfg, name, accuracy, length, chosen)
    s = report.summary
    # Over the trace's window (or the run, where the answers took longer), as simulate
    # counts it: 2 requests "over 30 s" reported a goodput of 373.5/s.
    s["goodput_per_s"] = s["within_budget"] / max(offered_s, s["wall_seconds"] or 0.0, 1e-9)
    print(f"  SLO attainment  {s['slo_attainment']:.2%}")
    acc, unknown = s["mean_served_accuracy"], s["answers_without_accuracy"]
    # A server whose auto-tiering swapped during the run answers from tiers not planned here.
    note = f" ({unknown} answers from tiers without a known accuracy left out)" if unknown else ""
    proxy = proxy and f" ({proxy})"
    print(f"  mean accuracy   {'-' if acc is None else f'{acc:.4f}'}{proxy}{note}")
    print(f"  tier mix        {', '.join(f'{k} {v:.0%}' for k, v in s['tier_mix'].items())}")
    print(
        f"  latency p50/p99 {format_ms(s['p50_latency_ms'])} / {format_ms(s['p99_latency_ms'])} ms"
    )
    print(f"  goodput         {s['goodput_per_s']:.1f}/s   refused {s['refused'] or 'none'}")
    # (late answers showed only in the JSON: 92 % attainment beside "refused none")
    print(f"  requests        {s['sent']} sent: {s['within_budget']} within budget, "
          f"{s['late']} late, {s['refused_total']} refused")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1))
    if not s["sent"]:  # (it said 100 % within budget and exited 0: review helper-236)
        raise RuntimeError("no request was sent: give --max-requests above 0")
    refused = {k: v for k, v in (s["refused"] or {}).items() if k != "unsent"}  # sent ones
    if s["sent"] and sum(refused.values()) == s["sent"] and set(refused) & NOTHING_SERVED:
        # every request failed, some before any model saw them: no server there, or no such
        # model (a few CANCELLED beside NOT_FOUND at load exited 0: review helper-269)
        first = f"; the first: {s['first_error']}" if s.get("first_error") else ""
        raise RuntimeError(
            f"no request was served ({refused}): is a server listening on {args.address}, "
            f"and does it serve {name!r}?{first}"
        )
    if s["sent"] and refused.get("INVALID_ARGUMENT", 0) == s["sent"]:
        raise RuntimeError(
            f"the server refused every request as invalid ({refused}): does {name!r} at "
            f"{args.address} take the inputs {args.model_dir}/model.yaml names? (its log "
            "says what was wrong with them)"
        )
    return 0


def _bench_open_loop(args, tiers, p50, config, cfg, name, accuracy, length: int, chosen: str):
    """``innfer bench`` on arrivals (a trace, or a recorded file): (the load generator's
    report, the seconds its goodput is counted over)."""
    import asyncio

    import numpy as np

    from sim.loadgen import run_load
    from sim.simulator import requests_for, trace_window
    from sim.traces import recorded

    rate, arrivals, budgets, _ = requests_for(tiers, p50, cfg)
    # Every arrival is sent: a --trace file longer than --duration is replayed whole.
    window = trace_window(cfg, arrivals)
    what, offered_s = f"{len(arrivals)} requests", window  # (goodput's window, below)
    if len(arrivals) > args.max_requests:
        what = f"the first {args.max_requests} of {len(arrivals)} requests (--max-requests)"
        arrivals, budgets = arrivals[: args.max_requests], budgets[: args.max_requests]
        offered_s = float(arrivals[-1])
    # A recorded trace's requests go with their own rows (every one was sent as one row).
    traffic = recorded(args.trace_file) if args.trace == "file" else None
    if traffic is not None:  # more rows than max_batch: every such request refused, unsaid
        traffic.check_rows(config.max_batch, str(args.trace_file))
    rows = traffic.rows if traffic is not None else np.ones(len(arrivals), dtype=int)
    feeds = {r: _bench_feeds(config, r, length) for r in set(rows.tolist())}
    # (one row count for every request - a client that always sends 4 - is one set of feeds)
    inputs = (lambda i: feeds[int(rows[i])]) if len(feeds) > 1 else next(iter(feeds.values()))
    # (:g - a 0.2 s window read "over 0 s"; and a recorded file that came in a short span
    # says its own rate beside the window's, as simulate does: review 191)
    span = float(arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    came = (f" ({(len(arrivals) - 1) / span:.1f}/s over the {span:.3g} s they came in)"
            if args.trace == "file" and 0 < span < 0.9 * window and offered_s == window
            else "")  # fmt: skip
    print(f"sending {what} at {rate:.1f}/s over {window:g} s{came} to {args.address} ({name})")
    if args.trace != "file":
        print(f"  {_load_unit(tiers, p50, cfg, args.host_ms)}")
    if chosen:
        print(f"  planned with {chosen}")
    run = run_load(args.address, name, arrivals, budgets, inputs, window, accuracy)
    return asyncio.run(run), offered_s


def _bench_closed_loop(args, tiers, p50, config, cfg, name, accuracy, length: int, chosen: str):
    """``innfer bench --clients N``: N clients on one channel, each sending its next request
    (one row, budgets drawn as ``innfer simulate --clients`` draws them) as soon as its last
    one is answered or refused, for --duration s or --max-requests requests: (the report,
    the seconds its goodput is counted over - the run's)."""
    import asyncio

    from sim.loadgen import run_closed_loop
    from sim.simulator import closed_loop_budgets

    budgets = closed_loop_budgets(cfg, args.max_requests)
    print(
        f"sending at most {args.max_requests} requests from {args.clients} closed-loop clients "
        f"over {cfg.duration_s:g} s to {args.address} ({name})"
    )
    print(f"  {_closed_loop_bound(tiers, p50, cfg, args.clients, args.host_ms)}")
    if chosen:
        print(f"  planned with {chosen}")
    run = run_closed_loop(
        args.address, name, args.clients, len(budgets), cfg.duration_s,
        lambda i: float(budgets[i]), _bench_feeds(config, 1, length), accuracy,
    )  # fmt: skip
    report = asyncio.run(run)
    return report, report.summary["wall_seconds"] or cfg.duration_s  # (ended by the cap too)


def _bench_feeds(config, rows: int, length: int) -> dict:
    """Random inputs of ``rows`` rows for the model ``config`` describes; a text model's of
    ``length`` tokens (0: 16), every token real (the server refuses a mask with gaps:
    random 0/1 masks were all refused INVALID_ARGUMENT)."""
    from runtime.repository.profile import random_feeds

    feeds = random_feeds(config.inputs, rows, length=length or 16)
    if config.text is not None:
        feeds[config.text.mask][:] = 1
    return feeds


# gRPC codes that, for every request of a run, mean the run measured nothing.
NOTHING_SERVED = {"UNAVAILABLE", "NOT_FOUND", "UNAUTHENTICATED", "UNIMPLEMENTED"}


def _add_trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="a built model: <repo>/<model>")
    p.add_argument(
        "--trace", choices=["poisson", "gamma", "varying", "file"],
        help="arrivals (default poisson; file with --trace-file)",
    )  # fmt: skip
    p.add_argument(
        "--trace-file",
        help="timestamps in seconds, one per line, or a traffic CSV as the server records "
        "it (arrival_s,budget_ms[,rows]: each request's own budget and rows, not --budget) "
        "(--trace file): replayed whole, whatever --load; the run covers --duration or the "
        "file's span, whichever is longer",
    )
    p.add_argument("--cv2", type=_cv2, help="--trace gamma: squared CV (default 1)")
    p.add_argument(
        "--load", type=_positive, help="x the full tier's capacity (default 1; open loop)"
    )  # fmt: skip
    p.add_argument(
        "--clients", type=_at_least(1),
        help="a closed loop instead of arrivals: N clients, each sending its next request as "
        "soon as its last one is answered or refused, for --duration s (not with --trace, "
        "--trace-file, --load or --cv2)",
    )  # fmt: skip
    p.add_argument(
        "--duration", type=_positive,
        help=f"seconds of arrivals (default {DEFAULT_DURATION_S:g}; simulate: fewer where "
        f"that would be over {DEFAULT_SIM_REQUESTS:,} requests, said)",
    )  # fmt: skip
    p.add_argument(
        "--budget", type=_budget_range, default=(20.0, 100.0),
        help="LO:HI ms: each request's budget uniform in it (default 20:100)",
    )  # fmt: skip
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument(
        "--slots", type=_at_least(1), default=1,
        help="batches the device runs at once: the load unit is the full tier's capacity over "
        "that many (bench: only that - the server's own slots are device_slots in its "
        "config; simulate: the simulated device runs that many)",
    )  # fmt: skip
    p.add_argument(
        "--tokens", type=_at_least(1),
        help="text models: every request's length in tokens (default: the longest profiled)",
    )  # fmt: skip
    p.add_argument("--json", type=output_file, help="write the figures as JSON")


def _widths(values) -> list[float]:
    if not values:
        raise ValueError("the width list is empty; give widths in (0, 1]")
    return list(values)


def _held_inn(directory: Path) -> list[str]:
    """The INN files ``directory`` already holds (what a save there would replace)."""
    return [f for f in ("inn.json", "inn.safetensors") if (directory / f).exists()]


def _same_source(model_dir: Path, out: Path) -> bool:
    """Whether the INN in ``out`` is ``model_dir``'s (the same architecture and nodes;
    calibrated tiers aside): an earlier calibration of it into ``out`` (the same command
    again, or a rerun after an interrupt), which calibrating again may replace."""
    import torch

    from runtime.inn.model import ModelFileError, load

    try:
        a, b = load(model_dir), load(out)
    except (ModelFileError, OSError, ValueError):
        return False
    return (
        a.spec == b.spec
        and a.state.keys() == b.state.keys()
        and all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    )


def _unfinished_run(checkpoint: Path) -> str:
    """What a training checkpoint left in ``checkpoint`` holds ("an unfinished run (epoch
    15 of 30 done)"), or "" where there is none."""
    record = checkpoint / "checkpoint.json"
    if not record.is_file():
        return ""
    try:
        meta = json.loads(record.read_text())["meta"]
        done, epochs = int(meta["epoch"]) + 1, int(meta["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return "a checkpoint.json"
    if done >= epochs:  # stopped after its last epoch, before the INN was saved
        return f"a finished run ({done} of {epochs} epochs) whose INN was not saved"
    return f"an unfinished run (epoch {done} of {epochs} done)"


def cmd_train(args: argparse.Namespace) -> int:
    from runtime.flock import one_run

    with one_run(args.out, "trained"):  # a second run on --out lost one's result unsaid
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    import torch

    from runtime.demo.training import train_inn
    from runtime.inn.calibrate import reestimate_norms
    from runtime.inn.report import format_report, save_report, width_report

    held = _held_inn(args.out)
    if held and not (args.resume or args.force):
        # Saving would replace it: an INN converted or calibrated there was lost unsaid,
        # and the next build failed on shapes that did not name the cause (review 164).
        raise ValueError(
            f"{args.out} already holds an INN ({', '.join(held)}): training would replace it; "
            "give another --out, --resume to continue its checkpoint, or --force to replace it"
        )
    unfinished = _unfinished_run(args.out / "checkpoint")
    if unfinished and not held and not (args.resume or args.force):
        # The run would start from epoch 0 and its first save replace the checkpoint
        # (review 185: an interrupted run's 14 epochs were lost to a rerun without --resume).
        raise ValueError(
            f"{args.out / 'checkpoint'} holds {unfinished}: --resume continues it (a finished "
            "one: saves its INN), --force starts over and replaces it, or give another --out"
        )
    calibrated = _calibrated_tiers(args.out) if held and not args.force else 0
    if calibrated:  # (--resume: the save at its end dropped them unsaid, finished or not)
        # An interrupted `train --force` over them left its checkpoint: --force alone would
        # start over and replace it (review helper-272)
        force = "--resume --force to continue the unfinished run and drop them" if (
            args.resume and unfinished
        ) else "--force to drop them"  # fmt: skip
        raise ValueError(
            f"{args.out}'s INN holds {calibrated} calibrated tier(s) (innfer calibrate): "
            f"training saves its own weights over it and drops them; give another --out, or "
            f"{force} (then calibrate again)"
        )
    torch.set_num_threads(args.threads)
    if args.resume:
        _resume_defaults(args)
    for key, default in TRAIN_RUN_DEFAULTS.items():  # (review helper-246: a bare --resume
        if getattr(args, key) is None:  # of a --seed 3 run was "of another run: seed 3")
            setattr(args, key, default)
    args.model = args.model or TRAIN_MODEL
    inn, data = train_inn(
        args.model, epochs=args.epochs, min_width=args.min_width, k=args.k,
        per_group=args.per_group, seed=args.seed, lr=args.lr, batch_size=args.batch_size,
        checkpoint=args.out / "checkpoint", resume=args.resume,
    )  # fmt: skip
    widths = _widths(args.widths)
    for w in widths:
        reestimate_norms(inn, w, data.x_train[:1024])
    inn.save(args.out)
    rows = width_report(inn, widths, data)
    print(f"\nsaved {args.out}\n" + format_report(rows))
    save_report(rows, args.out / "report.json", args.out / "report.png")
    return 0


# train's model where neither --model nor a checkpoint to resume names one.
TRAIN_MODEL = "mnist_resnet"
# ... and its run settings likewise (a resumed run takes its checkpoint's)
TRAIN_RUN_DEFAULTS = {"seed": 0, "k": 2, "min_width": 0.25, "per_group": False}


def _resume_defaults(args: argparse.Namespace) -> None:
    """``train --resume`` without --model / --epochs / --lr / --batch-size / --seed / --k /
    --min-width / --per-group: the checkpoint's run's. The interrupt said "--resume
    continues it", and a resume without --epochs trained the model's default (30 epochs of
    an interrupted 6-epoch run; without --model, another model's lr and batch size were
    refused as "another run": review helper-234)."""
    try:
        meta = json.loads((args.out / "checkpoint" / "checkpoint.json").read_text())["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # none, or unreadable: train_inn says which
    for key in ("model", "epochs", "lr", "batch_size", *TRAIN_RUN_DEFAULTS):
        if getattr(args, key) is None and meta.get(key) is not None:
            setattr(args, key, meta[key])


def _calibrated_tiers(model_dir: Path) -> int:
    """How many calibrated tiers the INN in ``model_dir`` stores (read from its inn.json's
    tensor list; 0 where it cannot be read: the load that follows says why)."""
    import json

    from runtime.inn.model import TIER_PREFIX
    from runtime.inn_files import META_FILE

    try:
        shapes = json.loads((Path(model_dir) / META_FILE).read_text())["shapes"]
        return len({k.split("/")[0] for k in shapes if k.startswith(TIER_PREFIX)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def _tier_defaults(model_dir: Path) -> tuple[list, int, str]:
    """Widths, multiple_of and method of MODEL_DIR/model.yaml's tiers (a repository model),
    so that calibration targets exactly the networks ``innfer build`` will sample."""
    from runtime.repository.config import ModelConfig

    path = Path(model_dir) / "model.yaml"
    if not path.is_file():  # a calibrate --out folder: as its tiers were calibrated
        sampling = _recorded_sampling(model_dir)
        return [0.5, 0.25], sampling.get("multiple_of", 1), sampling.get("method", "auto")
    config = ModelConfig.load(path)
    return [t.width for t in config.tiers], config.multiple_of, config.method


# INN info key: how `innfer calibrate` sampled the widths it calibrated ({"multiple_of": int,
# "method": str}), for a folder with no model.yaml to say it (an --out folder): its tiers
# are keyed by channel counts, which only that multiple_of samples again.
SAMPLING_INFO = "sampling"


def _recorded_sampling(model_dir: Path) -> dict:
    """The INN's recorded calibration sampling (SAMPLING_INFO), {} where none is readable."""
    from runtime.inn_files import META_FILE

    try:
        recorded = json.loads((Path(model_dir) / META_FILE).read_text())["info"][SAMPLING_INFO]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    ok = (isinstance(recorded, dict) and type(recorded.get("multiple_of")) is int
          and recorded["multiple_of"] >= 1 and isinstance(recorded.get("method"), str))  # fmt: skip
    return recorded if ok else {}


# How a data set named by model.yaml (not by --data) is said where its file is missing.
YAML_EVALUATION = "model.yaml's evaluation.dataset"


def _evaluation_dataset(yaml_path: Path) -> str | None:
    """model.yaml's evaluation data set (a bundled name or a .npz beside it), if any."""
    if not yaml_path.is_file():
        return None
    from runtime.repository.config import ModelConfig

    evaluation = ModelConfig.load(yaml_path).evaluation
    return evaluation.dataset if evaluation is not None else None


def _data_for(model_dir: Path, inn, name: str, given: str = "--data"):
    """The data set ``name``, refused unless its samples fit the model: another data set's
    images ran through the model without an error (8x8 digits into a 28x28 model) and
    calibration then overwrote the trained tiers with what it learnt from them. ``given``:
    where the name came from, as a missing file is said ("--data", or model.yaml's
    evaluation: a missing file named there was blamed on a --data never given)."""
    import dataclasses

    import torch

    from runtime.demo.data import load as load_data
    from runtime.repository.config import ModelConfig

    if name.endswith(".npz") and not Path(name).is_file():
        beside = Path(model_dir) / name  # where model.yaml's evaluation file lies
        if not beside.is_file():
            where = "" if Path(name).is_absolute() else f" here nor as {beside}"
            raise ValueError(f"{given} {name}: no such file{where}")
        name = str(beside)
    want, classes, hint = inn.info.get("input_shape"), None, ""
    yaml_path = Path(model_dir) / "model.yaml"
    if yaml_path.is_file():
        config = ModelConfig.load(yaml_path)
        # the shape it serves; the INN's recorded one is the example it was converted with
        want = list(config.inputs[0].shape)
        out = config.outputs[0].shape  # [classes], or [classes, H, W] per pixel
        classes = out[0] if out else None
        if config.evaluation is not None and config.evaluation.dataset:
            hint = f" (model.yaml's evaluation uses {config.evaluation.dataset!r})"
    data = load_data(name, unlabelled=True)
    got = tuple(data.input_shape)
    if want is not None and (
        len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got, strict=False))
    ):  # (-1: a sequence axis model.yaml leaves free takes any length)
        raise ValueError(
            f"data set {name}: samples of shape {list(got)}, but the model takes "
            f"{list(want)}; give the data set it was trained on{hint}"
        )
    if yaml_path.is_file() and not config.inputs[0].dtype.startswith("float"):
        # loaded as float32 (images); the model takes integers (token ids, indices)
        dtype = getattr(torch, config.inputs[0].dtype)
        data = dataclasses.replace(
            data, x_train=data.x_train.to(dtype), x_test=data.x_test.to(dtype)
        )
    if yaml_path.is_file() and data.labelled:  # one label per output position
        per = list(out[1:])
        if list(data.y_train.shape[1:]) != per:
            what = f"a label map of {per} per sample" if per else "one label per sample"
            raise ValueError(
                f"--data {name}: labels of shape {list(data.y_train.shape[1:])} per sample, "
                f"but {config.outputs[0].name!r} is {list(out)}: give {what}{hint}"
            )
    if classes is None and data.labelled and data.y_train.dim() == 1:
        # An INN folder without model.yaml: its outputs counted from one sample at full
        # width (a label past them crashed calibrate's loss, exit 1, and report scored 0 %)
        classes = _output_classes(inn, data.x_train[:1])
    # (a file's class count is its largest label + 1: a split missing the last class is
    # fine, as the build takes it; a label past the outputs is not)
    if classes is not None and data.num_classes > classes:
        raise ValueError(
            f"--data {name}: labels up to {data.num_classes - 1}, but the model has {classes} "
            f"outputs; give the data set it was trained on{hint}"
        )
    return data if data.labelled else _full_width_labels(inn, data)


# What accuracy means on a data set of inputs alone: every command that prints one says so.
AGREEMENT = "accuracy here: top-1 agreement with the full width (the data has no labels)"


def _output_classes(inn, x) -> int | None:
    """The full width's class count: its output's second dimension on the batch ``x``
    (None where the output is not one [N, C] tensor: nothing to check labels against)."""
    import torch

    from runtime.inn.modes import evaluating

    full = inn.sample(1.0)
    try:
        with torch.no_grad(), evaluating(full):
            out = full(x)
    except Exception:  # (inputs it does not take: the command's own run says so, as before)
        return None
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def _full_width_labels(inn, data):
    """``data`` (inputs alone) labelled with the full width's top-1 prediction: accuracy
    is then agreement with the full model, which calibration distils from anyway."""
    import dataclasses

    import torch

    from runtime.inn.calibrate import scores
    from runtime.inn.modes import evaluating

    full = inn.sample(1.0)

    def top1(x):
        with torch.no_grad(), evaluating(full):
            return torch.cat([scores(full(x[i : i + 512])).argmax(1)
                              for i in range(0, len(x), 512)])  # fmt: skip

    print(f"data: {data.name} has no labels; {AGREEMENT}")
    return dataclasses.replace(data, y_train=top1(data.x_train), y_test=top1(data.x_test))


# Fewest held-out training inputs a new calibrated tier is judged on before it replaces
# the stored one (fewer: it replaces it whatever it scores, and says so).
HELD_OUT_MIN = 64


# calibrate's budget for all its tiers where neither --seconds nor --steps is given.
CALIBRATE_SECONDS = 60.0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from runtime.flock import one_run

    with one_run(args.out or args.model_dir, "calibrated"):  # (as train: one run a folder)
        return _calibrate(args)


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    if args.steps is not None and args.seconds is not None:  # (--seconds was ignored)
        raise ValueError(
            "--steps and --seconds each say how long a tier is calibrated: give one (--steps "
            "repeats exactly with --seed; --seconds fits the machine)"
        )
    args.seconds = CALIBRATE_SECONDS if args.seconds is None else args.seconds

    from runtime.inn.calibrate import calibrate
    from runtime.inn.model import load
    from runtime.inn.report import format_report, width_report

    other = args.out is not None and Path(args.out).resolve() != args.model_dir.resolve()
    held = _held_inn(args.out) if other else []
    # --force replaces it: started from MODEL_DIR, not gone on from (review helper-246)
    same = bool(held) and not args.force and _same_source(args.model_dir, args.out)
    if held and not args.force and not same:
        # Saved as it goes, over another INN there, unsaid (review 185), as train was.
        raise ValueError(
            f"{args.out} already holds an INN ({', '.join(held)}): calibrating saves "
            f"{args.model_dir}'s INN and its tiers over it; give another --out, calibrate "
            f"{args.out} itself (innfer calibrate {args.out} ...), or --force to replace it"
        )
    torch.set_num_threads(args.threads)
    _check_writable(args.out or args.model_dir)
    # --out holding an earlier calibration of this INN (the same command again, or the rest
    # of the widths after an interrupt, as its message says): go on from it, its calibrated
    # tiers kept - started from MODEL_DIR, the run saved over them (review helper-234)
    inn = load(args.out if same else args.model_dir)
    if same:
        print(f"going on from {args.out}: the tiers calibrated there are kept unless named again")
    tier_widths, tier_multiple, method = _tier_defaults(args.model_dir)
    widths = _widths(tier_widths if args.widths is None else args.widths)
    served = (args.model_dir / "model.yaml").is_file()  # a repository model: its tiers
    into_model = args.out is None or Path(args.out).resolve() == args.model_dir.resolve()
    # (an --out elsewhere records its own sampling and is never built from model.yaml)
    if served and into_model and args.multiple_of not in (None, tier_multiple):
        # (the networks calibrated were reported as the tiers, and never served: the build
        # samples model.yaml's multiple_of; review helper-272)
        raise ValueError(
            f"--multiple-of {args.multiple_of} differs from {args.model_dir / 'model.yaml'}'s "
            f"multiple_of {tier_multiple}: innfer build samples the tiers at {tier_multiple}, "
            "so networks calibrated at another would never be served; drop --multiple-of "
            "(or change model.yaml's first)"
        )
    multiple_of = args.multiple_of or tier_multiple
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    # Saved with the tiers (and with each one as it goes), so that report / inspect / a later
    # calibrate of an --out folder sample them as calibrated (review helper-234).
    inn.info[SAMPLING_INFO] = {"multiple_of": multiple_of, "method": method}
    if args.text is not None:
        return _calibrate_text(args, inn, widths, multiple_of, method)
    yaml_path = args.model_dir / "model.yaml"
    given = "--data"
    if args.data is None:  # as `report` does (review 170); its training split, below
        args.data, given = _evaluation_dataset(yaml_path), YAML_EVALUATION
        if args.data is not None:
            print(f"data: {args.data} (model.yaml's evaluation data set, its training split; "
                  "--data NAME for another)")  # fmt: skip
    if args.data is None:
        raise ValueError("give --data NAME (an image data set) or --text FILE (a text model)")
    if yaml_path.is_file() and _is_text_model(yaml_path):
        raise ValueError(f"{args.model_dir} is a text model: calibrate it with --text FILE "
                         "(sentences, one per line), not --data")  # fmt: skip
    _one_input_for_data(yaml_path, "calibrate")
    data = _data_for(args.model_dir, inn, args.data, given)
    samples = args.samples
    if samples is None:  # 1,000, less what keeps a held-out fifth (>= 64) to judge tiers on
        n = len(data.x_train)
        samples = min(1000, n - max(HELD_OUT_MIN, n // 5)) if n > 2 * HELD_OUT_MIN else n
    x = data.x_train[:samples]
    shown = [1.0, *(w for w in widths if isinstance(w, float) and w < 1)]
    print("before:\n" + format_report(
        width_report(inn, shown, data, method=method, multiple_of=multiple_of)))  # fmt: skip
    labels = None if args.no_labels or not data.labelled else data.y_train[:samples]
    # A width already calibrated keeps its stored tier unless the new one scores at least
    # as well on held-out training inputs (a short run on a loaded machine replaced 88.1 %
    # by 45.3 %) - not on the test split the tables report, which would then be chosen on.
    held = (data.x_train[samples : samples + 1000], data.y_train[samples : samples + 1000])
    if len(held[0]) < HELD_OUT_MIN:
        held = None
        fix = "give fewer --samples" if args.samples else "give a larger data set"
        print(f"note: no held-out training inputs after the first {samples}: a new tier "
              f"replaces a stored one whatever it scores ({fix})")  # fmt: skip
    target = args.out or args.model_dir
    kept = ("a stored tier stays unless the new one scores at least as well" if held is not None
            else "without held-out inputs the new tiers replace the stored ones")  # fmt: skip
    with _saved_as_it_goes(target, kept) as keep:
        # model.yaml's tiers keep what they serve unless calibrated and judged better here:
        # a grid tuned for another width is not shared with them (review helper-272)
        tuned = calibrate(inn, x, widths, seconds=args.seconds, multiple_of=multiple_of,
                          method=method, labels=labels, seed=args.seed, holdout=held,
                          max_steps=args.steps, on_tier=keep, keep=tier_widths if served else (),
                          **_lr_option(args))  # fmt: skip
    out = tuned.save(target)  # before any line more: a reader that leaves (| head) ends it
    decisions = tuned.info.get("calibration", {})
    names = _tier_names(args.model_dir, tuned, widths, multiple_of)
    # this run's widths, each (a decision that repeated the stored one was left out:
    # review helper-272); none judged without held-out inputs (decisions are earlier runs')
    this_run = {inn.sizes_key(inn.sizes(w, multiple_of)) for w in widths}
    for key in (k for k in decisions if k in this_run and held is not None):
        d = decisions[key]
        what = {
            "new": "the new tier",
            "stored": "the stored tier (the new one is worse)",
            "uncalibrated": "the uncalibrated width (the calibrated one is worse)",
        }[d["kept"]]
        print(
            f"  {names.get(key, key[:60])}: kept {what}: new {d['new']:.2%}, "
            f"{'stored' if key in inn.tiers else 'uncalibrated'} {d['stored']:.2%} on "
            f"{d['holdout']} held-out training samples"
        )
    if served:  # (a width no tier samples was told "rebuild the tiers" alone: helper-272)
        tiers = {inn.sizes_key(inn.sizes(w, multiple_of)) for w in tier_widths}
        full = inn.sizes_key(inn.sizes(1.0))  # (the teacher: never calibrated)
        extra = [names.get(k, k[:60]) for k in sorted(this_run - tiers - {full})]
        if extra:
            print(f"note: {', '.join(extra)}: no tier of model.yaml samples it, so innfer "
                  "build does not serve it (add a tier of that width to serve it)")  # fmt: skip
    spent = f"{args.steps} steps a tier" if args.steps else f"{args.seconds:.0f} s"
    print(f"after ({spent}, {len(x)} samples) -> {out}:")
    print(format_report(width_report(tuned, shown, data, method=method, multiple_of=multiple_of)))
    full = inn.sizes(1.0)
    for w in (w for w in widths if inn.sizes(w, multiple_of) == full):  # (review 176)
        print(f"note: width {w} samples the full network (multiple_of {multiple_of}): it is "
              "the teacher, not calibrated")  # fmt: skip
    stored = _tiers_changed(inn.tiers, tuned.tiers)  # (a run that kept every stored or
    # uncalibrated width changed nothing to rebuild)
    if stored and (Path(out) / "tiers").is_dir():  # (a server refuses the tiers of before)
        repo = Path(out).resolve().parent  # (given as ".", its parent was ".")
        print(f"rebuild the tiers with `innfer build {repo}`: the built ones were sampled "
              "before this calibration")  # fmt: skip
    return 0


def _tiers_changed(before: dict, after: dict) -> bool:
    """Whether ``after`` (an INN's calibrated tiers) holds a tier or tensor ``before``
    did not."""
    import torch

    for key, tensors in after.items():
        old = before.get(key, {})
        if any(old.get(n) is None or not torch.equal(t, old[n]) for n, t in tensors.items()):
            return True
    return False


def _check_writable(target: Path) -> None:
    """Refuse, before any work, a calibration whose results cannot be saved: a read-only
    folder (a mounted volume) failed after the first width's minutes (review helper-234)."""
    d = Path(target)
    while not d.exists() and d.parent != d:  # --out made as it saves: its nearest folder
        d = d.parent
    if not os.access(d, os.W_OK):
        raise ValueError(f"cannot write in {d}: calibrate into another folder with --out DIR")


@contextlib.contextmanager
def _saved_as_it_goes(target: Path, kept: str):
    """A calibration's ``on_tier`` that saves the model after each width, and on an
    interrupt a line saying what is saved. It saved once at the end: an interrupt (Ctrl-C,
    a killed job) threw every width done away, unsaid - minutes each (review helper-150)."""
    saved: list[int] = []

    def keep(model, done: int, total: int) -> None:
        model.save(target)
        saved[:] = [done, total]

    try:
        yield keep
    except KeyboardInterrupt:
        said = (f"{saved[0]} of {saved[1]} widths are calibrated and saved in {target}; a run "
                f"again calibrates every width named again ({kept}): name the rest with "
                "--widths to go on from here"
                if saved else f"no width was done: {target} is as it was")  # fmt: skip
        if saved and (Path(target) / "tiers").is_dir():  # a repository model's INN changed
            said += (f"; a server refuses {Path(target).name} until its tiers are built "
                     f"again: innfer build {Path(target).parent}")  # fmt: skip
        print(said, file=sys.stderr)
        raise


def _one_input_for_data(yaml_path: Path, what: str) -> None:
    """A ``--data`` set holds one input: refuse a model.yaml of several, saying so (a model
    of token ids and a mask crashed in its forward: "missing 1 required positional
    argument: 'attention_mask'", an internal error; review helper-142)."""
    from runtime.repository.config import ModelConfig

    if not yaml_path.is_file():
        return
    inputs = [t.name for t in ModelConfig.load(yaml_path).inputs]
    if len(inputs) > 1:
        raise ValueError(
            f"{yaml_path.parent} takes {len(inputs)} inputs ({', '.join(inputs)}) and a --data "
            f"set holds one: innfer {what} --data serves one-input models. A transformer of "
            "token ids and a mask: add a text: section (its tokenizer.json) to model.yaml and "
            "give --text FILE"
        )


def _is_text_model(yaml_path: Path) -> bool:
    from runtime.repository.config import ModelConfig

    return ModelConfig.load(yaml_path).text is not None


def _tier_names(model_dir: Path, inn, widths, multiple_of: int) -> dict[str, str]:
    """{sizes key: name} of the calibrated tiers, for a summary: model.yaml's tier names
    where a tier's width rounds to those counts, else "width W" (``inn``: the calibrated
    INN, whose measured sensitivity decides a shaped width's counts)."""
    from runtime.repository.config import ModelConfig

    named = []
    if (Path(model_dir) / "model.yaml").is_file():
        named = [(t.name, t.width) for t in ModelConfig.load(Path(model_dir) / "model.yaml").tiers]
    named += [(f"width {w:g}" if isinstance(w, float) else str(w), w) for w in widths]
    names: dict[str, str] = {}
    for name, w in named:
        try:
            names.setdefault(inn.sizes_key(inn.sizes(w, multiple_of)), name)
        except (TypeError, ValueError, KeyError):
            continue
    return names


TEXT_SAMPLES = 3000  # calibrate --text's default --samples (the MiniLM demo's count)


def _lr_option(args: argparse.Namespace) -> dict[str, float]:
    """``{"lr": --lr}`` where given; else nothing, and the calibration's own default."""
    return {} if args.lr is None else {"lr": args.lr}


def _text_model_yaml(model_dir: Path) -> Path:
    """MODEL_DIR/model.yaml, which --text needs (its text: section names the tokenizer and
    pooling); a folder with the INN alone was told "model.yaml: file not found" (helper-276)."""
    path = Path(model_dir) / "model.yaml"
    if not path.is_file():
        raise ValueError(
            f"{model_dir} has no model.yaml: --text is for a text model of a repository "
            "(MODEL_DIR/model.yaml with a text: section); for an image model give --data NAME"
        )
    return path


def _calibrate_text(args: argparse.Namespace, inn, widths, multiple_of: int, method: str) -> int:
    """Distil each tier of a text model from its full width on the sentences of
    ``--text`` (one per line), tokenized with the model directory's own tokenizer."""
    import torch

    from runtime.inn.distill import calibrate_text
    from runtime.inn.shaping import unshaped
    from runtime.repository.config import ModelConfig

    if args.data is not None:
        raise ValueError("give --text FILE or --data NAME, not both (--text: a text model)")
    config = ModelConfig.load(_text_model_yaml(args.model_dir))
    # --samples: the first N sentences (it was ignored: "on 30000 sentences" with 500). By
    # default TEXT_SAMPLES: the teacher's pass over all of them comes before the budget and
    # is kept in memory (30,000 MiniLM sentences: ~340 s and 5.7 GB).
    limit = TEXT_SAMPLES if args.samples is None else args.samples
    lines, ids, mask = _text_file(config, args.model_dir, args.text, "calibrates", limit)
    if args.samples is None and len(lines) == limit:
        print(f"note: calibrating on the first {limit} sentences of {args.text} (--samples N "
              "for more: the teacher's pass over them comes before --seconds)")  # fmt: skip
    # Counted on the uniform widths (a shaped one has their totals, and its counts are only
    # known once calibration has measured the sensitivity), a shaped width apart from the
    # uniform one of its totals: both are calibrated (h050 and h050s: 2 tiers, not 1).
    full = inn.sizes_key(inn.sizes(1.0))
    tiers = {(key, unshaped(w) is not w) for w in widths
             if (key := inn.sizes_key(inn.sizes(unshaped(w), multiple_of))) != full}  # fmt: skip
    per_tier = args.seconds / max(len(tiers), 1)
    target = args.out or args.model_dir
    # (a text tie keeps the stored tier - runtime/inn/distill.py - an image tie the new one)
    with _saved_as_it_goes(target, "a stored tier stays unless the new one scores better") as keep:
        tuned = calibrate_text(
            inn, torch.from_numpy(ids), torch.from_numpy(mask), widths, per_tier,
            multiple_of=multiple_of, method=method, grid=args.grid, seed=args.seed,
            max_steps=args.steps, on_tier=keep, keep=[t.width for t in config.tiers],
            **_lr_option(args),
        )  # fmt: skip
    out = tuned.save(target)
    shared = tuned.info.get("selection_seconds", 0.0) if args.grid == "selected" else 0.0
    each = f"{args.steps} steps each" if args.steps is not None else f"{per_tier:.3g} s each"
    print(
        f"calibrated {len(tiers)} tiers on {len(lines)} sentences ({each}"
        + (f"; choosing the nodes took {shared:.1f} s more, outside it" if shared >= 0.05 else "")
        + f") -> {out}"
    )
    print(_text_summary(inn, tuned, widths, multiple_of, per_tier, args.model_dir))
    if args.out is not None and Path(args.out).resolve() != Path(args.model_dir).resolve():
        print(
            f"to serve it: put {out}'s INN files (inn.json, inn.safetensors) in "
            f"{args.model_dir}, beside model.yaml and the tokenizer, and run `innfer build`"
        )
    else:
        print("rebuild the tiers with `innfer build`")
    return 0


def _text_summary(inn, tuned, widths, multiple_of: int, budget: float, model_dir) -> str:
    """One line per tier calibrated in this run: its name, the distillation steps and loss
    (or that the refit alone ran), and the time it took where that exceeded ``budget``
    (node choice and refit are not cut short)."""
    old = inn.info.get("text_calibration", {})
    names = _tier_names(model_dir, tuned, widths, multiple_of)
    lines = []
    for key, c in tuned.info.get("text_calibration_kept", {}).items():
        lines.append(
            f"  {names.get(key, key[:60])}: kept the tier stored by an earlier run (cosine to "
            f"the full width {c['stored']:.4f} on the check sentences, this run's "
            f"{max(c['start'], c['distilled']):.4f})"
        )
    for key, rec in tuned.info.get("text_calibration", {}).items():
        if old.get(key) == rec or rec.get("kept") == "stored":  # an earlier run's tier
            continue
        if rec.get("steps"):
            what = (f"{rec['steps']} distillation steps, loss {rec['first_loss']:.4f} -> "
                    f"{rec['last_loss']:.4f}")  # fmt: skip
        else:
            what = "refit only, no distillation steps"
        if rec.get("kept") == "start":
            what += " (distilled network was further from the full width: the refit kept)"
        check = rec.get("check_cosine") or {}
        if rec.get("kept") == "distilled" and {"start", "distilled"} <= set(check):
            # (a rising loss read as a failed run: the check is what chose; review 145)
            what += (f"; kept: cosine to the full width {check['distilled']:.4f} on the "
                     f"check sentences, the refit alone {check['start']:.4f}")  # fmt: skip
        if rec.get("stored_judged") is False:
            what += ("; replaced the tier stored by an earlier run without comparing them: "
                     "that run checked other sentences (another text or batch size, or a run "
                     "that recorded none), so it may have trained on this run's check")  # fmt: skip
        took = rec.get("seconds", 0.0)
        if took > budget * 1.1 + 0.5:
            what += (f"; took {took:.1f} s of its {budget:.1f} s budget (node choice "
                     f"{rec.get('select_seconds', 0.0):.1f} s, the refit "
                     f"{rec.get('refit_seconds', 0.0):.1f} s and the optimiser's first "
                     "set-up - an import of seconds - are not cut short)")  # fmt: skip
        lines.append(f"  {names.get(key, key[:60])}: {what}")
    return "\n".join(lines)


def _text_file(
    config, model_dir: Path, path: Path, what: str, limit: int | None = None,
    limit_flag: str = "--samples",
):  # fmt: skip
    """(lines, ids, mask) of ``path``'s non-empty lines (the first ``limit``: the command's
    ``limit_flag``), tokenized with MODEL_DIR's own tokenizer (``config``: its model.yaml);
    ``what`` the command does, for the error on a non-text model."""
    from runtime.repository.tokenizer import TextTokenizer, read_sentences, text_chars

    if config.text is None:
        raise ValueError(
            f"{config.source} has no text: section (tokenizer, max_length); --text {what} "
            "text models only - use --data for image models"
        )
    lines = read_sentences(path, limit, text_chars(config.text.max_length))
    if len(lines) < 32:
        given = (
            f"{limit_flag} {limit} keeps {len(lines)}"
            if limit is not None and limit < 32
            else (f"{path} has {len(lines)} non-empty lines")
        )
        raise ValueError(f"{given}; give at least 32 sentences")
    tok = TextTokenizer(model_dir / config.text.tokenizer, config.text.max_length)
    ids, mask, cut = tok.encode_rows(lines)
    empty = [i for i in range(len(lines)) if not mask[i].any()]
    if empty:  # (zero-width characters, with a tokenizer that adds no [CLS]/[SEP])
        raise ValueError(
            f"{path}: {len(empty)} sentences give no tokens with {config.text.tokenizer}, the "
            f"first the non-empty line {empty[0] + 1}: {lines[empty[0]][:40]!r}; remove them"
        )
    if cut:  # the model sees max_length tokens of each: say so, as the server does
        print(f"note: {len(cut)} of {len(lines)} sentences of {path} are longer than "
              f"max_length {config.text.max_length} tokens and were cut there")  # fmt: skip
    return lines, ids, mask


def _report_text(args: argparse.Namespace, inn) -> int:
    """Embedding fidelity of a text model's tiers (model.yaml's, or ``--widths``) on the
    sentences of ``--text``: cosine and neighbour agreement with the full width."""
    import torch

    from runtime.inn.fidelity import fidelity_report, format_fidelity, save_fidelity
    from runtime.repository.config import ModelConfig

    config = ModelConfig.load(_text_model_yaml(args.model_dir))
    lines, ids, mask = _text_file(
        config, args.model_dir, args.text, "reports on", args.sentences, "--sentences"
    )
    if args.widths is not None:
        widths = {f"w{round(w * 100):03d}": w for w in _widths(args.widths)}
    else:
        widths = {t.name: t.width for t in config.tiers}
    rows = fidelity_report(inn, torch.from_numpy(ids), torch.from_numpy(mask), widths,
                           multiple_of=args.multiple_of or config.multiple_of,
                           method=config.method)  # fmt: skip
    print(f"embedding fidelity to the full width on {len(lines)} sentences of {args.text}:")
    print(format_fidelity(rows))
    png = Path(args.png) if args.png else Path(args.model_dir) / "report.png"
    save_fidelity(rows, Path(args.json) if args.json else None, png)
    print(f"plot: {png}")
    return 0


# report --text's sentences where --sentences is not given.
REPORT_SENTENCES = 2000
BACKEND_HELP = ("this backend for every model (default: the first of each model.yaml's "
                "backends that this machine has)")  # fmt: skip


def cmd_report(args: argparse.Namespace) -> int:
    import torch

    from runtime.inn.model import load
    from runtime.inn.report import (
        DEFAULT_WIDTHS,
        format_report,
        format_served,
        save_report,
        width_report,
    )

    # (set for the text report only, --threads was ignored beside --data without a word)
    torch.set_num_threads(args.threads)
    inn = load(args.model_dir)
    if args.text and args.data is not None:  # (--data was ignored: review helper-238)
        raise ValueError("give --text FILE or --data NAME, not both (--text: a text model)")
    if args.text:
        args.sentences = args.sentences or REPORT_SENTENCES
        return _report_text(args, inn)
    if args.sentences is not None:  # (it was ignored without a word: review helper-228)
        raise ValueError("--sentences counts the sentences of --text FILE: give --text, or "
                         "drop --sentences")  # fmt: skip
    yaml_path = Path(args.model_dir) / "model.yaml"
    config = None
    if yaml_path.is_file():
        from runtime.repository.config import ModelConfig

        config = ModelConfig.load(yaml_path)
        if config.text is not None:
            raise ValueError(
                f"{args.model_dir} is a text model: give held-out sentences, one per line, "
                "with --text FILE to report each tier's embedding fidelity"
            )
        if args.data is not None:
            _one_input_for_data(yaml_path, "report")
    name, given = args.data, "--data"
    # model.yaml names the data set the model is evaluated on: report accuracy on it (it
    # said "not measured (no evaluation set), give --data NAME")
    evaluation = None if config is None or config.evaluation is None else config.evaluation
    if name is None and evaluation is not None and evaluation.dataset is not None:
        name = evaluation.dataset  # a bundled set, or a .npz in the model's folder
        given = YAML_EVALUATION
        print(f"data: {name} (model.yaml's evaluation; --data NAME for another)")
    data = _data_for(args.model_dir, inn, name, given) if name else None
    if data is not None and given == YAML_EVALUATION and evaluation.limit < len(data.x_test):
        # the samples the build scores its tiers on: on the whole split, the width table's
        # w100 read 11.6 % and the served table's 10.0 %, both "model.yaml's evaluation
        # set" (review helper-269)
        import dataclasses

        data = dataclasses.replace(data, x_test=data.x_test[: evaluation.limit],
                                   y_test=data.y_test[: evaluation.limit])  # fmt: skip
        print(f"  (its first {evaluation.limit} test samples, as the build scores the tiers)")
    from innfer.tiers import report_frontier

    shape = _report_shape(inn, config)
    example = _report_example(config) if data is None and shape is None else None
    if example is not None:  # several inputs (ids beside features): each as model.yaml says
        shape = {t.name: [int(d) for d in t.concrete(16)] for t in config.inputs}
    if data is None and shape is None:
        print(f"{args.model_dir}: no input shape (the INN records none, and there is no "
              "model.yaml with one input): FLOPs by width need one; give --data NAME")  # fmt: skip
        if report_frontier(Path(args.model_dir)) is None:  # an auto_tiers model's frontier
            raise ValueError(f"{args.model_dir}: nothing to report without an input shape")
        return 0
    if data is None and example is None:
        inn.info["input_shape"] = shape  # this run only: the INN on disk is not rewritten
    tier_widths, tier_multiple, method = _tier_defaults(args.model_dir)  # as the build samples
    multiple_of = args.multiple_of or tier_multiple
    # By default the grid and model.yaml's uniform tiers: a calibrated w030 off the grid
    # was never shown (review helper-300).
    grid = {*DEFAULT_WIDTHS, *(float(w) for w in tier_widths if isinstance(w, (int, float)))}
    widths = _widths(sorted(grid, reverse=True) if args.widths is None else args.widths)
    rows = width_report(inn, widths, data, method=method, multiple_of=multiple_of,
                        example=example)  # fmt: skip
    print(format_report(rows))
    if (
        config is not None
        and (evaluation is None or evaluation.dataset is None)
        and any(r.norms_reestimated and not r.calibrated for r in rows)
    ):  # (the table's 85.2 % at a width the server ran at 13.5 %; review helper-288)
        print("note: rows with norms re-estimated are scored with BatchNorm statistics "
              "measured on --data's training inputs; this model's build re-estimates none "
              "(model.yaml names no evaluation set), so its tiers at such widths serve the "
              "full width's, resampled: add evaluation to model.yaml, or store them with "
              f"innfer calibrate {args.model_dir} --data ...")  # fmt: skip
    if example is not None:
        print(f"FLOPs at batch 1 of inputs {shape} (model.yaml's, dynamic dims at 16); "
              "accuracy: not measured (--data sets hold one float input; the build scores "
              "model.yaml's evaluation set where the model takes one input)")  # fmt: skip
    elif data is None:
        print(f"FLOPs at batch 1 of input {shape}; accuracy: not measured (no evaluation set), "
              f"give --data NAME ({DATA_SETS}) for a model trained on one of them, or "
              "--data FILE.npz of your own (x and y: inputs, class labels)")  # fmt: skip
    served, where = _served_latency(Path(args.model_dir))
    if served:
        print(format_served(served, where))
    png = Path(args.png) if args.png else Path(args.model_dir) / "report.png"
    ylabel = "test accuracy" if data is None or data.labelled else "agreement with full width"
    plotted = data is not None or bool(served)
    json_path = Path(args.json) if args.json else None
    beside = Path(args.model_dir) / "report.json"  # `innfer train`'s, beside the plot
    if json_path is None and not args.png and plotted and beside.is_file():
        # The plot is replaced: its figures too, or report.json kept the pre-calibration
        # numbers beside a plot of the new ones (review helper-145).
        json_path = beside
    try:
        save_report(rows, json_path, png if plotted else None, served, ylabel,
                    where.split(":", 1)[0] or "profile.json")  # fmt: skip
    except OSError as exc:  # a read-only model folder: the table printed, then only errno
        hint = " (give --png PATH and --json PATH somewhere writable)"
        if exc.errno is None:  # (an image writer's own error: its text, as it was)
            raise OSError(f"{exc}{hint}") from None
        raise OSError(exc.errno, f"{exc.strerror}: {exc.filename}{hint}") from None
    if plotted:
        print(f"plot: {png}")
    elif args.png:  # asked for, and nothing to draw: said, not silently skipped
        print(f"no plot written to {png}: no accuracy measured (give --data NAME) and no built "
              "tiers' latency (run innfer build)")  # fmt: skip
    # A model with auto_tiers: its measured frontier, plotted beside --png where given (it
    # was written into the model folder whatever --png said; review 191).
    beside = None if not args.png else png.with_name(f"{png.stem}-frontier{png.suffix}")
    report_frontier(Path(args.model_dir), beside)
    return 0


def _served_latency(model_dir: Path) -> tuple[list, str]:
    """The tiers a server would serve from a built model, with profile.json's latency
    (``ServedTier``s), and where they come from; ([], "") for a model not built. A text
    model's at its longest profiled length."""
    from runtime.inn.report import ServedTier
    from runtime.repository import Repository, RepositoryError

    d = model_dir.resolve()
    if not (d / "model.yaml").is_file():
        return [], ""
    try:
        records, profile, source = Repository(d.parent).served_tiers(d.name)
        profile, lane = _lane_profile(profile, None)
    except (RepositoryError, OSError, ValueError) as exc:  # not built (yet): nothing measured
        if (d / "tiers").is_dir() or (d / "profile.json").is_file():  # built, and broken since:
            # said (the served section left out without a word, where simulate named it)
            print(f"warning: the built tiers are left out of this report: {exc}", file=sys.stderr)
        return [], ""
    top = max((r.flops for r in records.values()), default=1) or 1
    full = _full_channels(d)
    tiers = []
    # a frontier without an evaluation set scores by FLOPs: not an accuracy (it read as
    # one "on model.yaml's evaluation set", below "accuracy: not measured"; helper-255)
    flops = source == "frontier" and _frontier_flops(d)
    measured_on, elsewhere = _evaluation_now(d), []
    for name, table in profile["tiers"].items():
        sizes = sorted(int(b) for b in table)
        rec = records[name]
        # a tier of per-group counts has no one width: the share of the full width's
        # channels it keeps (as auto-tiering names it), else its FLOPs fraction (that of
        # the largest served tier read as a width: 25.4 % for w050's network; helper-300)
        width = (float(rec.width) if isinstance(rec.width, (int, float))
                 else sum(rec.sizes.values()) / full if full else rec.flops / top)  # fmt: skip
        accuracy = None if flops else rec.accuracy
        stale = None not in (rec.accuracy_on, measured_on) and rec.accuracy_on != measured_on
        if accuracy is not None and stale:  # model.yaml's evaluation changed since the build
            elsewhere.append(f"{name} on {rec.accuracy_on}")  # (helper-300)
            accuracy = None
        tiers.append(ServedTier(name, width, accuracy, table[str(sizes[0])]["p50_ms"],
                                sizes[-1], table[str(sizes[-1])]["p50_ms"]))  # fmt: skip
    if elsewhere:
        print(f"note: the served tiers' accuracy was measured on another evaluation than "
              f"model.yaml's now ({measured_on}): {'; '.join(elsewhere)} - left out until "
              "`innfer build` measures it again")  # fmt: skip
    latencies = "frontier.json" if source == "frontier" else "profile.json"
    where = f"{latencies}: {profile.get('backend')} on {profile.get('device')}"
    where += f", {lane} tokens" if lane else ""
    where += "; auto-tiering's choice" if source == "frontier" else ""
    return tiers, where


def _full_channels(model_dir: Path) -> int | None:
    """The channels of the INN's continuous groups at full width (inn.json), or None."""
    from runtime.inn_files import META_FILE

    try:
        groups = json.loads((model_dir / META_FILE).read_text())["groups"]
        return sum(int(g["size"]) for g in groups if not g.get("discrete")) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _evaluation_now(model_dir: Path) -> str | None:
    """What model.yaml's evaluation measures a tier's accuracy on now, as tier.json records
    it (``evaluation_key``), or None (none, or model.yaml unreadable)."""
    from runtime.build.pipeline import evaluation_key
    from runtime.repository.config import ConfigError, ModelConfig

    try:
        return evaluation_key(ModelConfig.load(model_dir / "model.yaml"), model_dir)
    except (ConfigError, OSError):
        return None


DATA_SETS = "digits, mnist5k, mnist1d"  # the bundled data sets --data takes


def _report_example(config) -> tuple | None:
    """Batch-1 inputs for FLOPs of a model of several inputs, or of one integer input (token
    ids: zeros of float32 do not index a table - review helper-248 was told "no model.yaml
    with one input"), in model.yaml's order (the order forward() takes them): random feeds
    as the build's profile makes them (ids 0 or 1); None without a model.yaml or for one
    float input."""
    if config is None or not config.inputs:
        return None
    if len(config.inputs) == 1 and config.inputs[0].dtype.startswith("float"):
        return None
    import torch

    from runtime.repository.profile import random_feeds

    feeds = random_feeds(config.inputs, 1)
    return tuple(torch.from_numpy(feeds[t.name]) for t in config.inputs)


def _report_shape(inn, config) -> list[int] | None:
    """The sample shape (no batch) ``innfer report`` counts FLOPs at without data: a
    repository model's model.yaml input (the shape it serves), else the one the INN
    recorded at conversion; None for a model of several inputs or none recorded."""
    if config is not None and len(config.inputs) == 1:
        spec = config.inputs[0]
        if spec.dtype.startswith("float") and spec.shape and min(spec.shape) > 0:
            return [int(d) for d in spec.shape]
    shape = inn.info.get("input_shape")
    return None if shape is None else [int(d) for d in shape]


def cmd_inspect(args: argparse.Namespace) -> int:
    from runtime.inn.model import load

    inn = load(args.directory)
    # as the build samples them (model.yaml's multiple_of) unless told: it showed counts
    # the build never makes (4 channels where the build samples 8)
    multiple_of = args.multiple_of or _tier_defaults(args.directory)[1]
    sizes = inn.sizes(args.width, multiple_of)
    print(f"{args.directory}: {len(inn.groups)} continuous groups")
    print(f"{'group':<30} {'full':>6} {'at ' + format(args.width * 100, '.3g') + '%':>8}")
    for g in inn.groups:
        print(f"{g.name:<30} {g.size:>6} {sizes[g.name]:>8}")
    for module, why in inn.info.get("kept", {}).items():  # convert(on_unsupported="keep")
        print(f"kept at full size: {module} ({why})")
    if _searches_channels(args.directory):  # (read as the build's counts: helper-300)
        print(
            "model.yaml's channel_search may build other counts near these (the fastest "
            "per accuracy it measures): a built tier's are in tiers/<tier>/tier.json"
        )
    return 0


def _searches_channels(model_dir: Path) -> bool:
    """Whether MODEL_DIR/model.yaml sets channel_search (False where it cannot be read:
    the counts above were printed all the same)."""
    from runtime.repository.config import ConfigError, ModelConfig

    path = Path(model_dir) / "model.yaml"
    try:
        return path.is_file() and ModelConfig.load(path).channel_search is not None
    except (ConfigError, OSError):
        return False


def build_parser() -> argparse.ArgumentParser:
    from runtime.engines import BACKENDS  # torch-free; "fake" (tests only) is not offered

    parser = argparse.ArgumentParser(prog="innfer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train the demo CNN as an INN, print accuracy by width and build its tiers into "
        "a repository (--model minilm: convert, calibrate, build and serve the text model)",
    )
    models = ["mnist_resnet", "mnist1d_cnn", "digits_cnn", "digits_cnn_bn", "digits_mlp", "minilm"]
    demo.add_argument(
        "--model", default="mnist_resnet", choices=models,
        help="minilm: all-MiniLM-L6-v2, text in, embeddings out (the [zoo] extra)",
    )  # fmt: skip
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--repository", type=output_dir, default=Path("runs/demo/repository"))
    demo.add_argument(
        "--name", type=_model_name,
        help="model name (default: mnist for mnist_resnet, else the --model's name)",
    )  # fmt: skip
    demo.add_argument(
        "--calibrate-seconds", type=_non_negative, default=60.0,
        help="minilm: distillation seconds per smaller tier (0: data-free)",
    )  # fmt: skip
    demo.add_argument(
        "--serve", action=argparse.BooleanOptionalAction, default=None,
        help="minilm: serve on 127.0.0.1:8001 after the build (default: yes)",
    )  # fmt: skip
    demo.add_argument(
        "--threads", type=_threads, default=_usable_threads(),
        help="torch's threads for training, and model.yaml's threads (ONNX Runtime's intra-op "
        "threads per batch; default: 2, or 1 where this process may use one CPU)",
    )  # fmt: skip
    demo.add_argument("--epochs", type=_at_least(1), help="training epochs (default: the model's)")
    demo.add_argument(
        "--convert", action="store_true", help="train a plain model and convert it instead"
    )
    demo.add_argument("--widths", type=_width, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    demo.add_argument(
        "--retrain",
        action="store_true",
        help="train again even if the repository holds this recipe's INN (default: reuse it)",
    )
    demo.set_defaults(func=cmd_demo)

    build = sub.add_parser(
        "build", help="build every tier's engine and latency profile (a model that fails is "
        "reported at the end, exit 2; the others are built)",
    )  # fmt: skip
    build.add_argument("repository", type=Path,
                       help="the model repository: a folder of model folders, each with its "
                       "model.yaml")  # fmt: skip
    build.add_argument("--model", action="append", help="only this model (repeatable)")
    build.add_argument("--backend", choices=BACKENDS, help=BACKEND_HELP)
    build.add_argument("--no-profile", action="store_true", help="skip latency profiling")
    build.add_argument(
        "--keep-engines", action="store_true",
        help="keep cached engines built from ONNX no tier or frontier candidate uses any more "
        "(removed by default: each rebuild with new weights leaves a whole engine per tier)",
    )  # fmt: skip
    build.set_defaults(func=cmd_build)

    train = sub.add_parser("train", help="train a zoo model as an INN at random widths")
    train.add_argument("--model", help=f"default {TRAIN_MODEL}; with --resume, the checkpoint's",
                       choices=["mnist_resnet", "mnist1d_cnn", "digits_cnn", "digits_cnn_bn",
                                "digits_mlp"])  # fmt: skip
    train.add_argument("--out", type=output_dir, required=True, help="where to save the INN")
    train.add_argument("--epochs", type=_at_least(1))
    # (no defaults here: --resume takes the checkpoint's, else TRAIN_RUN_DEFAULTS)
    train.add_argument("--min-width", type=_width, help="default 0.25")
    train.add_argument("--k", type=_at_least(1), help="random widths per step (default 2)")
    train.add_argument(
        "--per-group", action=argparse.BooleanOptionalAction,
        help="random widths per group (default: one per step)",
    )  # fmt: skip
    train.add_argument("--lr", type=_positive)
    train.add_argument("--batch-size", type=_at_least(1), help="default: the model's recipe")
    train.add_argument("--seed", type=_seed, help="default 0")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    train.add_argument("--force", action="store_true", help="replace an INN already in OUT")
    train.add_argument("--threads", type=_threads, default=2)
    train.add_argument("--widths", type=_width, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    train.set_defaults(func=cmd_train)

    cal = sub.add_parser("calibrate", help="calibrate a converted INN on a small data set")
    cal.add_argument("model_dir", type=Path)
    cal.add_argument("--data", type=_data_name,
                     help=f"image models: {', '.join(BUNDLED_DATA)} or your own .npz "
                          "(x_train, y_train, x_test, y_test; or x, y); its training split "
                          "is used (default: model.yaml's evaluation dataset)")  # fmt: skip
    cal.add_argument("--text", type=Path,
                     help="text models: sentences, one per line (unlabelled)")  # fmt: skip
    cal.add_argument("--widths", type=_width, nargs="*",
                     help="default: the tiers of MODEL_DIR/model.yaml, else 0.5 0.25")  # fmt: skip
    cal.add_argument(
        "--multiple-of", type=_at_least(1), help="channel rounding (default: model.yaml's)"
    )
    cal.add_argument("--samples", type=_at_least(1),
                     help="calibration samples: the first N training images (default 1000, fewer "
                          "where a fifth of the training split must stay held out to judge "
                          "the new tiers on) "
                          f"or sentences of --text (default {TEXT_SAMPLES})")  # fmt: skip
    cal.add_argument(
        "--seconds",
        type=_positive,
        help=f"budget for all widths together (split evenly between the tiers; default "
        f"{CALIBRATE_SECONDS:g}; not with --steps)",
    )
    cal.add_argument("--seed", type=_seed, default=0,
                     help="with --steps, the same seed gives the same tiers; a --seconds "
                          "budget does not (the steps that fit depend on the machine)")  # fmt: skip
    cal.add_argument("--steps", type=_at_least(1),
                     help="optimizer steps per tier instead of the --seconds budget: "
                          "reproducible with --seed")  # fmt: skip
    cal.add_argument("--lr", type=_positive,
                     help="peak learning rate of each tier's warm-up + cosine schedule "
                          "(default: 3e-3 for images, 1e-3 for text)")  # fmt: skip
    cal.add_argument("--no-labels", action="store_true", help="distil only, ignore the labels")
    cal.add_argument("--grid", choices=["selected", "uniform"], default="selected",
                     help="text models: start each tier on the channels chosen from the text "
                          "(default) or on the INN's uniform grid")  # fmt: skip
    cal.add_argument("--out", type=output_dir, help="default: overwrite MODEL_DIR")
    cal.add_argument("--force", action="store_true", help="replace an INN already in --out")
    cal.add_argument("--threads", type=_threads, default=2)
    cal.set_defaults(func=cmd_calibrate)

    rep = sub.add_parser("report", help="accuracy / FLOPs / params by width")
    rep.add_argument("model_dir", type=Path)
    rep.add_argument("--data", type=_data_name,
                     help=f"evaluation set: {', '.join(BUNDLED_DATA)} or your own .npz "
                          "(default: model.yaml's evaluation dataset)")  # fmt: skip
    rep.add_argument(
        "--text", type=Path,
        help="a text model: held-out sentences, one per line; reports each tier's embedding "
        "fidelity (cosine, top-1/top-10 neighbour agreement) to the full width",
    )  # fmt: skip
    rep.add_argument(
        "--sentences", type=_at_least(1),
        help=f"with --text: the first N sentences (default {REPORT_SENTENCES})",
    )  # fmt: skip
    rep.add_argument("--threads", type=_threads, default=2,
                     help="torch threads for the evaluation (default 2)")  # fmt: skip
    rep.add_argument("--widths", type=_width, nargs="*",
                     help="widths to report (default: 1.0 to 0.25 by 1/8; with --text: "
                     "model.yaml's tiers)")  # fmt: skip
    rep.add_argument(
        "--multiple-of", type=_at_least(1), help="channel rounding (default: model.yaml's)"
    )
    rep.add_argument(
        "--json", metavar="FILE", type=output_file,
        help='write the figures as JSON: {"widths": [...], "served": [...]} (served: the '
        "built tiers' latency, empty for a model not built); with --text, one object per tier",
    )  # fmt: skip
    rep.add_argument("--png", type=png_file,
                     help="plot accuracy and latency vs width here (default "
                     "MODEL_DIR/report.png where there is a curve to plot: accuracy with "
                     "--data or model.yaml's evaluation set, or a built model's "
                     "latency)")  # fmt: skip
    rep.set_defaults(func=cmd_report)

    srv = sub.add_parser("serve", help="serve a model repository over gRPC")
    srv.add_argument(
        "--repository", type=Path, help="model repository (or set it in --config; this one wins)"
    )
    srv.add_argument("--config", type=Path, help="server YAML (ports, TLS, auth, limits)")
    srv.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only; "
                     "0.0.0.0 in a container)")  # fmt: skip
    srv.add_argument("--port", type=int, help="gRPC port (default 8001)")
    srv.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002)")
    srv.add_argument(
        "--http-port", type=int,
        help="also serve the OIP REST API (HTTP/JSON; tritonclient.http, curl) on this port, "
        "e.g. 8000 as Triton (default: the config's http_port, else off)",
    )  # fmt: skip
    srv.add_argument("--policy", help="innfer | slackfit | fixed:<tier>")
    srv.add_argument("--backend", choices=BACKENDS, help=BACKEND_HELP)
    srv.add_argument("--budget-margin-ms", type=float, help="taken off each budget (default 1)")
    srv.add_argument(
        "--plan-overhead", action=argparse.BooleanOptionalAction, default=None,
        help="plan budgets short by the learned request overhead (server config "
        "plan_overhead; default on)",
    )  # fmt: skip
    srv.add_argument(
        "--overhead-quantile",
        type=float,
        help="the overhead quantile --plan-overhead plans with (server config "
        "overhead_quantile; default 0.9)",
    )
    srv.add_argument("--gil-switch-ms", type=float,
                     help="sys.setswitchinterval in ms (server config gil_switch_ms; default "
                     "Python's 5)")  # fmt: skip
    srv.add_argument(
        "--tune-malloc", action=argparse.BooleanOptionalAction, default=None,
        help="keep large request buffers in glibc's heap (server config tune_malloc; default on)",
    )  # fmt: skip
    srv.add_argument(
        "--log-level", default="INFO", type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), help="any case",
    )  # fmt: skip
    srv.set_defaults(func=cmd_serve)

    sim = sub.add_parser("simulate", help="simulate the scheduler with a model's profile")
    _add_trace_args(sim)
    sim.add_argument(
        "--noise", type=_noise,
        help="engine time log-normal sigma (default: from the profile's p90/p50)",
    )  # fmt: skip
    sim.add_argument(
        "--budget-margin-ms", type=_non_negative, default=1.0,
        help="taken off each budget before it is planned, as the server's budget_margin_ms "
        "(default 1, the server's default)",
    )  # fmt: skip
    sim.add_argument(
        "--policy", action="append",
        help="innfer | slackfit | fixed:<tier>; repeatable (default: innfer and slackfit)",
    )  # fmt: skip
    sim.add_argument("--plot", type=png_file, help="PNG over time (load, tier mix, latency)")
    sim.add_argument(
        "--host-ms",
        type=_host_ms_arg,
        help="PARSE,ANSWER[,CLIENT]: simulate a server whose request handling shares the "
        "engine's core, at these ms of CPU per request (and the client's own ms)",
    )
    sim.add_argument(
        "--host-batch-ms", type=_host_batch_ms_arg, default=0.0,
        help="with --host-ms: ms of that core per batch run - deciding, launching and settling "
        "it (a server's innfer_host_cpu_per_batch_seconds); batches then grow where the core "
        "is nearly full, as the server's do (default 0)",
    )  # fmt: skip
    sim.add_argument(
        "--plan-overhead", action=argparse.BooleanOptionalAction, default=None,
        help="with --host-ms: plan each budget short by the request handling, as a server with "
        "plan_overhead does (default: on with --host-ms, as the server's)",
    )  # fmt: skip
    sim.set_defaults(func=cmd_simulate)

    bench = sub.add_parser(
        "bench", help="live load against a server (loopback): open loop, or --clients N"
    )
    _add_trace_args(bench)
    bench.add_argument("--address", default="127.0.0.1:8001",
                       help="the server's gRPC address (default 127.0.0.1:8001)")  # fmt: skip
    bench.add_argument("--model", help="model name (default: the directory's name)")
    bench.add_argument("--max-requests", type=_at_least(1), default=20000,
                       help="send at most this many (default 20,000)")  # fmt: skip
    bench.add_argument(
        "--host-ms", type=_bench_host_ms_arg,
        help="PARSE,ANSWER: the server's ms of CPU per request; the first lines then "
        "say what load one core can serve (the unit of --load is the engine's own rate, "
        "which a server handling requests in Python cannot take for a small model)",
    )  # fmt: skip
    bench.set_defaults(func=cmd_bench)

    from innfer import configs, tiers

    tiers.add_parser(sub)
    configs.add_parser(sub)

    inspect = sub.add_parser("inspect", help="show a saved INN's groups")
    inspect.add_argument("directory", type=Path)
    inspect.add_argument("--width", type=_width, default=0.5,
                         help="the width whose channel counts are shown (default 0.5)")  # fmt: skip
    inspect.add_argument("--multiple-of", type=_at_least(1), default=None,
                         help="channel counts rounded to multiples of this (default: "
                              "model.yaml's, else 1)")  # fmt: skip
    inspect.set_defaults(func=cmd_inspect)
    return parser


def _close_progress_bars() -> None:
    """End the progress bars a failed command left open, each on its own line: the error
    was printed onto the bar's line ("... 3.1it/s]innfer train: interrupted"). A bar left
    by an exception is only closed when collected, after the message."""
    tqdm = sys.modules.get("tqdm")  # (no bar was ever opened without it)
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # the message matters more than the bar
            bar.close()


def _checkpoint_stamp(args: argparse.Namespace) -> tuple[int, int, int] | None:
    """``train``'s checkpoint record as (inode, mtime in ns, size), None where there is none
    (or for another command): compared before and after a run to tell whether it saved one."""
    if args.command != "train":
        return None
    try:
        st = (args.out / "checkpoint" / "checkpoint.json").stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _resume_hint(args: argparse.Namespace, before: tuple[int, int, int] | None) -> str:
    """For an interrupted ``train``: where its last finished epoch is kept and how to
    continue it - only where this run saved one (its record differs from ``before``, taken
    at the start): an older run's checkpoint, which --force was replacing, is of other
    settings (review 189). Not mtime >= the start's time.time(): file times come from the
    kernel's coarse clock, up to a tick behind, so a save within that tick of the start
    read as an older run's (CI, session 61)."""
    now = _checkpoint_stamp(args)
    # (--resume: the checkpoint it started from is this run's, resumable as it is - an
    # interrupt before its first new epoch said nothing of it: review helper-234)
    if now is None or (now == before and not getattr(args, "resume", False)):
        return ""
    return f" ({args.out / 'checkpoint'} keeps the last finished epoch: --resume continues it)"


# Options whose value may start with "-" ("--budget -5:10"): argparse reads such a value as
# an option and said "expected one argument" instead of what is wrong with the range.
DASHED_VALUES = ("--budget", "--host-ms")


def _glued(argv: list[str]) -> list[str]:
    """``argv`` with each ``DASHED_VALUES`` option and a following value that starts with
    "-" joined as ``--option=value``.

    Example:
        >>> _glued(["simulate", "m", "--budget", "-5:10"])
        ['simulate', 'm', '--budget=-5:10']
    """
    out, i = [], 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in DASHED_VALUES and value.startswith("-") and value != "--":
            out.append(f"{argv[i]}={value}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; words no option takes are refused by the subcommand they follow,
    with the option they most look like - the top-level parser refused them with its own
    usage (``innfer [-h] {demo,build,...}``) and no hint (review helper-225)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = _parser_for(parser, argv)
        options = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        hints = []
        for word in extra:
            close = difflib.get_close_matches(word.split("=")[0], options, 1)
            if word.startswith("-") and close:
                hints.append(f"{word.split('=')[0]}: did you mean {close[0]}?")
        said = f" ({'; '.join(hints)})" if hints else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{said}")
    return args


def _parser_for(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser the subcommand words of ``argv`` lead to (``tiers suggest``: that
    one's)."""
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and word in subs[0].choices:
            parser = subs[0].choices[word]
    return parser


# What a shell reports for a command its output's reader left (128 + SIGPIPE).
SIGPIPE_EXIT = 141


def _stdout_gone() -> bool:
    """Whether standard output's reader has left (``innfer report ... | head -1``): then
    the command stops quietly, as Unix tools do (it printed "error: [Errno 32] Broken pipe"
    and exited 2: review helper-228). Standard output is pointed at /dev/null, so that the
    interpreter's last flush at exit does not complain of it again."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(event & select.POLLERR for _, event in poll.poll(0))  # a pipe's reader left
    except (OSError, ValueError, AttributeError):  # no file descriptor, no poll: not a pipe
        return False
    if not gone:
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return True


# Long offline work whose Ctrl-C says what was saved and how to go on: a SIGTERM (a job's
# or a container's stop) ended it without a word (review helper-272).
TERM_AS_INTERRUPT = ("train", "calibrate", "build", "demo")


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be (``_term_as_interrupt``)."""


def _term_as_interrupt() -> None:
    """Turn SIGTERM into ``Terminated`` (main thread only; ``innfer demo --serve``'s server
    sets its own handler when it starts)."""

    def terminated(signum, frame):
        raise Terminated()

    with contextlib.suppress(ValueError):  # (not the main thread: an embedding caller's)
        signal.signal(signal.SIGTERM, terminated)


# Packages an extra installs (pyproject.toml) -> that extra: commands import them lazily,
# and without them said "internal error: ModuleNotFoundError ... (a bug: please report it)"
# (review helper-299).
EXTRA_OF = {
    **dict.fromkeys(("torch", "onnx", "safetensors", "tqdm", "matplotlib"), "build"),
    **dict.fromkeys(("torchvision", "timm", "transformers"), "zoo"),
}


def _missing_extra(exc: BaseException) -> str | None:
    """The extra that installs the package ``exc`` says is missing, or None."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    return EXTRA_OF.get(exc.name.partition(".")[0])


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(_glued(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # while the parser imports its backends' names (~0.2 s): a
        print("innfer: interrupted", file=sys.stderr)  # 31-line traceback before
        return 130
    checkpoint_before = _checkpoint_stamp(args)
    if args.command in TERM_AS_INTERRUPT:
        _term_as_interrupt()
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader gone is handled below, not by the
        return code  # interpreter's "Exception ignored ... BrokenPipeError" (exit 120)
    except BrokenPipeError as exc:
        if not _stdout_gone():  # another pipe (a child's): an error like any OSError
            print(f"innfer {args.command}: error: {exc}", file=sys.stderr)
            return 2
        return SIGPIPE_EXIT
    except (ValueError, OSError, RuntimeError) as exc:
        # OSError: a missing file, a busy port, a directory where a file belongs.
        _close_progress_bars()
        print(f"innfer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        _close_progress_bars()
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"innfer {args.command}: {how}{_resume_hint(args, checkpoint_before)}",
              file=sys.stderr)  # fmt: skip
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
    except Exception as exc:  # not foreseen: one line for the user, the traceback on request
        if os.environ.get("INNFER_DEBUG"):
            raise
        _close_progress_bars()
        if extra := _missing_extra(exc):  # the torch-free install (pip install innfer)
            print(f"innfer {args.command}: error: {exc}: this command needs the {extra!r} "
                  f"extra: pip install 'innfer[{extra}]'", file=sys.stderr)  # fmt: skip
            return 2
        print(
            f"innfer {args.command}: internal error: {type(exc).__name__}: {exc} (a bug: please "
            "report it; INNFER_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
