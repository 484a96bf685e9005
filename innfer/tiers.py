"""``innfer tiers``: auto-tiering from the command line.

    innfer tiers frontier REPOSITORY MODEL       measure the candidates (also run by build)
    innfer tiers suggest MODEL_DIR --traffic CSV print the set the traffic calls for, and the
                                                 expected gain over the live set; changes nothing
    innfer tiers apply REPOSITORY MODEL --traffic CSV
                                                 the same, then (gain >= rebuild.min_gain,
                                                 or the live set breaks a goal) build and
                                                 check the engines and write
                                                 auto_tiers.json; exit 0 applied, 3 kept

``apply`` is what a server with ``auto_tiers`` runs in the background (server/autotier.py);
it needs no torch: the candidates' ONNX files are in the frontier.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from innfer.outputs import output_file
from runtime.flock import Busy, one_run
from runtime.repository.config import TRAFFIC_CAPACITY
from runtime.repository.frontier import APPLY_BUSY, APPLY_KEPT, weights_mb
from runtime.utc import stamp

# What "accuracy" is where a model has no evaluation set (runtime/build/frontier.py records
# it so in the frontier): every command that prints such an accuracy says so in these words.
FLOPS_PROXY = "no evaluation set: FLOPs fraction of the full width"
# ... where model.yaml serves no full-width tier: the scheduler's stand-in is then relative
# to the largest served one (``tiers_from_profile``), which the line above misnamed
# (review helper-269)
FLOPS_PROXY_LARGEST = "no evaluation set: FLOPs fraction of the largest served tier"

HOST_HELP = (
    "the serving process's time outside queue and compute and its engine speed (host.json, "
    "written by a server with auto_tiers beside its traffic): the choice replays them; "
    "default: engine time only, one batch at a time (a server's default device_slots: 1)"
)


def add_parser(sub) -> None:
    tiers = sub.add_parser("tiers", help="auto-tiering: frontier, suggest, apply")
    tsub = tiers.add_subparsers(dest="tiers_command", required=True)
    fr = tsub.add_parser("frontier", help="measure accuracy and latency of candidate widths")
    _model_arguments(fr)
    fr.set_defaults(func=cmd_frontier)
    sug = tsub.add_parser("suggest", help="the tiers recorded traffic calls for (no changes)")
    _model_arguments(sug)
    sug.add_argument("--traffic", type=Path, required=True, help="CSV arrival_s,budget_ms,rows")
    sug.add_argument("--json", type=output_file, help="also write the choice here")
    sug.add_argument("--host", type=Path, help=HOST_HELP)
    sug.set_defaults(func=cmd_suggest)
    app = tsub.add_parser(
        "apply", help="choose, build and switch the live tier set",
        epilog=f"exit status: 0 a new set was written to auto_tiers.json; {APPLY_KEPT} the "
        "live set stays (the gain is below rebuild.min_gain; --force applies anyway); "
        f"{APPLY_BUSY} another apply of the model runs on this machine (try again then); 2 an "
        "error the message names (bad arguments, files, goals); 1 an internal error",
    )  # fmt: skip
    _model_arguments(app)
    app.add_argument("--traffic", type=Path, required=True, help="CSV arrival_s,budget_ms,rows")
    app.add_argument("--force", action="store_true", help="apply even below rebuild.min_gain")
    app.add_argument(
        "--result", type=output_file, help="write the choice here (JSON), applied or not"
    )
    app.add_argument(
        "--live", help="the set the server serves, SOURCE:NAMES (model.yaml:w100,w050 or "
        "frontier:w075,w031); default: what auto_tiers.json or model.yaml say",
    )  # fmt: skip
    app.add_argument("--host", type=Path, help=HOST_HELP)
    app.add_argument(
        "--background", action="store_true",
        help="run only on CPU time nothing else wants (Linux SCHED_IDLE): what a serving "
        "process's own apply uses",
    )  # fmt: skip
    app.add_argument(
        "--parent-pid", type=_pid, metavar="PID",
        help="the process that started this one (a server's own apply): end with it, "
        "never outlive it",
    )  # fmt: skip
    app.set_defaults(func=cmd_apply)


def _pid(text: str) -> int:
    """A process id (> 0): -1 read "the process that started it (-1) is gone", exit 1."""
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"a process id (an integer > 0), got {text!r}")
    return pid


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """The model as every other command takes it (``MODEL_DIR``: <repo>/<model>) or as
    ``innfer build`` and a server's own apply give it (``REPOSITORY MODEL``)."""
    p.add_argument("target", type=Path, metavar="MODEL_DIR|REPOSITORY",
                   help="a model's folder (<repo>/<model>), or a repository and MODEL")  # fmt: skip
    p.add_argument("model", nargs="?", metavar="MODEL", help="the model's name in REPOSITORY")


def model_location(args: argparse.Namespace) -> tuple[Path, str]:
    """(repository, model name) from ``MODEL_DIR`` or ``REPOSITORY MODEL``; ValueError,
    saying which form was read, where that folder holds no model.yaml.

    Example:
        >>> model_location(argparse.Namespace(target=Path("runs/repo/mnist"), model=None))
        Traceback (most recent call last):
        ...
        ValueError: runs/repo/mnist has no model.yaml: give a model's folder (<repo>/<model>) ...
    """
    if args.model is not None:
        repo, name = args.target, args.model
    else:
        repo, name = args.target.resolve().parent, args.target.resolve().name
    if not (repo / name / "model.yaml").is_file():
        shown = args.target / args.model if args.model is not None else args.target
        raise ValueError(
            f"{shown} has no model.yaml: give a model's folder (<repo>/<model>) or REPOSITORY MODEL"
        )
    return repo, name


def cmd_frontier(args: argparse.Namespace) -> int:
    from runtime.build.frontier import build_frontier
    from runtime.repository import Repository

    args.repository, args.model = model_location(args)
    build_frontier(Repository(args.repository), args.model)
    report_frontier(args.repository / args.model)
    return 0


def report_frontier(model_dir: Path, png: Path | None = None) -> Path | None:
    """Print the frontier of ``model_dir`` and plot it (``png``, default
    ``<model_dir>/frontier.png``: the chosen tiers ringed, the hand-written ones marked);
    None where it has no frontier."""
    from runtime.repository import (
        FRONTIER_DIR,
        FRONTIER_FILE,
        Frontier,
        Repository,
        RepositoryError,
    )

    path = model_dir / FRONTIER_DIR / FRONTIER_FILE
    if not path.is_file():
        return None
    frontier = Frontier.read(path)
    repo, name = Repository(model_dir.parent), model_dir.name
    # Measured on the INN and settings the folder holds now? The server and `tiers apply`
    # refuse it otherwise; the report printed and plotted it as current (a calibrated w050
    # shown at its old 64.90 %), or failed, exit 2, where a choice was on disk (helper-300).
    try:
        repo.check_frontier_inn(name, frontier)
    except RepositoryError as exc:
        stale = str(exc)
        print(f"(out of date: {stale}; below, the candidates as measured then)")
    else:
        stale = None
    print(format_frontier(frontier))
    try:
        options, names = hand_options(repo, name, frontier)
    except (ValueError, OSError, RuntimeError) as exc:  # the frontier is reported anyway
        print(f"(the hand-written tiers are not marked: {exc})")
        hand = None
    else:
        hand = {n: (options[n].p50[1], options[n].tier.accuracy) for n in names}
    png = model_dir / "frontier.png" if png is None else png
    plot_frontier(frontier, [] if stale else _active_names(repo, name), png, hand,
                  stale=stale is not None)  # fmt: skip
    print(f"plot: {png}")
    return png


def cmd_suggest(args: argparse.Namespace) -> int:
    from runtime.repository import Repository

    root, name = model_location(args)
    d = (root / name).resolve()
    repo = Repository(d.parent)
    choice, frontier, recorded = _choose(repo, d.name, args.traffic, host=args.host)
    goals = repo.config(d.name).auto_tiers
    print(format_choice(choice, goals.rebuild.min_gain, frontier.accuracy_source, recorded))
    if note := few_requests_note(recorded, goals):  # the file's (the choice replays its last)
        print(note)
    if args.json:
        args.json.write_text(json.dumps(choice_json(choice, goals.rebuild.min_gain), indent=1))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from runtime.repository import ACTIVE_FILE, Repository

    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    if args.background:
        yield_cpu()
    args.repository, args.model = model_location(args)
    repo = Repository(args.repository)
    # One apply at a time per model on this machine (a hand one beside the server's own):
    # each chose against the set it read and wrote its own, the last one winning and its
    # record naming a set it did not replace.
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(
                one_run(repo.model_dir(args.model) / ACTIVE_FILE, "applied", "try again then")
            )
        except Busy as exc:
            print(f"innfer tiers: {exc}", file=sys.stderr)
            return APPLY_BUSY
        return _apply(args, repo)


def _apply(args: argparse.Namespace, repo) -> int:
    from runtime.repository import ACTIVE_FILE, ActiveTiers

    config = repo.config(args.model)
    choice, frontier, recorded = _choose(repo, args.model, args.traffic, args.live, args.host)
    min_gain = config.auto_tiers.rebuild.min_gain
    print(format_choice(choice, min_gain, frontier.accuracy_source, recorded, args.force))
    if args.result:
        result = choice_json(choice, min_gain, args.force)
        args.result.write_text(json.dumps(result, indent=1))
    if not (choice.worth(min_gain) or (args.force and choice.changes)):
        print("kept the live tiers")
        return APPLY_KEPT
    t0 = time.perf_counter()
    _check_engines(repo, args.model, choice.best.tiers, frontier)
    _same_frontier(repo, args.model, frontier)
    active = ActiveTiers(
        tiers=choice.best.tiers,
        frontier_sha256=frontier.source_sha256,
        onnx_sha256={t: frontier.candidate(t).onnx_sha256 for t in choice.best.tiers},
        chosen_at=stamp(),
        reason={
            **choice.to_json(),
            "replaces": list(choice.current.tiers),
            "engines_s": time.perf_counter() - t0,
        },
    )
    active.write(repo.model_dir(args.model) / ACTIVE_FILE)
    print(f"applied: {', '.join(choice.best.tiers)} written to {ACTIVE_FILE} (engines ready in "
          f"{time.perf_counter() - t0:.1f} s); a running server serves it once the model is "
          "reloaded or restarted - its own auto-tiering may choose and write another set "
          "first")  # fmt: skip
    return 0


def yield_cpu() -> bool:
    """Put this process (its threads, and those it starts later) in Linux's SCHED_IDLE
    class: it runs only when no normal thread wants the CPU. At nice 10 alone, live
    auto-tiering's server lost 7-10 points of attainment (5 s bins) while each choice ran
    on its core (bench/auto_tiers_live.py, 10-30 ms budgets). False where the OS has no
    such class (the process keeps its niceness).

    Example:
        >>> yield_cpu()  # doctest: +SKIP
        True
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> bool:
    """End this process when ``parent`` (the pid that started it) ends: a server's apply
    must not go on building engines and writing ``auto_tiers.json`` for a server that
    crashed. On Linux the kernel sends SIGKILL at the parent's death (prctl
    PR_SET_PDEATHSIG; strictly, at the death of the thread that started this process - a
    server's event loop thread, which lives as long as it); elsewhere a daemon thread
    polls ``getppid()`` every second. Exits at once where ``parent`` already died before
    this was set (this process was reparented). True where the kernel watches.

    Example:
        >>> die_with_parent(os.getppid())  # doctest: +SKIP
        True
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):  # no libc prctl: poll instead
            armed = False
    if os.getppid() != parent:
        raise SystemExit(f"innfer tiers apply: the process that started it ({parent}) is gone")
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return armed


def _choose(repo, name: str, traffic_path: Path, live: str | None = None, host: Path | None = None):
    """(choice, frontier, requests in the file) for ``name`` on the traffic in
    ``traffic_path`` (the choice replays its last ``simulate_requests``); ``live`` as
    `apply --live` takes it; ``host``: a host.json (``sim.live_host``) or None."""
    from runtime.repository import FRONTIER_DIR, FRONTIER_FILE, Frontier
    from sim.live_host import LiveHost
    from sim.simulator import SimConfig
    from sim.tiering import Traffic, choose, frontier_options

    config = repo.config(name)
    if config.auto_tiers is None:
        raise ValueError(
            config.auto_tiers_empty_note
            or f"{config.source}: add auto_tiers (e.g. {{max_tiers: 4}}) first"
        )
    frontier = Frontier.read(repo.model_dir(name) / FRONTIER_DIR / FRONTIER_FILE)
    # As every load does: a set chosen from a frontier of a replaced INN would be written,
    # refused by every load, restored, and tried again each min_interval_s.
    repo.check_frontier_inn(name, frontier)
    traffic = Traffic.read(traffic_path)
    traffic.check_rows(config.max_batch, str(traffic_path))
    goals = config.auto_tiers
    view = LiveHost.read(host) if host is not None else None
    # As the server runs the model: its slots (instances, capped by a shared device's) and
    # policy where it says; else as a server with its default device_slots (1) runs it -
    # one batch at a time whatever model.yaml's instances (they were all counted) - and
    # innfer's planner.
    sim = SimConfig(
        slo_target=config.slo_target, admit_quantile=config.admit_quantile,
        max_batch=config.max_batch, max_queue=config.max_queue,
        slots=view.slots if view is not None and view.slots else 1,
        policy=view.policy if view is not None and view.policy else "innfer",
    )  # fmt: skip
    options = frontier_options(frontier, goals.accuracy_floor, max_memory_mb=goals.max_memory_mb)
    current = live_options(repo, name, frontier, live)
    return choose(options, traffic, goals, current, sim, host=view), frontier, len(traffic)


def live_options(repo, name: str, frontier, live: str | None = None):
    """The tier set serving now as (options, names). ``live`` (``SOURCE:NAMES``, what the
    server says it serves) names it; else the auto-tiering choice on disk where there is a
    current one, else model.yaml's tiers (``hand_options``)."""
    from sim.tiering import profile_options

    if live is not None:
        source, _, names = live.partition(":")
        names = [n for n in names.split(",") if n]
        if source not in ("model.yaml", "frontier") or not names:
            raise ValueError(f"--live: got {live!r}, expected model.yaml:NAMES or frontier:NAMES")
        if twice := sorted({n for n in names if names.count(n) > 1}):
            # Counted twice for memory, a set within the goals read as breaking them and was
            # applied again, its rebuild interval reset (review 191).
            raise ValueError(f"--live: got {live!r}, which names {', '.join(twice)} twice")
        if source == "model.yaml":
            options, _ = hand_options(repo, name, frontier)
            _check_known(live, names, list(options))
            return {n: options[n] for n in names}, names
        _check_known(live, names, [c.name for c in frontier.candidates])
        records = {n: frontier.candidate(n) for n in names}
        memory = {n: c.memory_mb for n, c in records.items()}
        full = full_channels(frontier)
        return profile_options(frontier.profile(names), records, memory, full), names
    auto = repo.auto_tiers(name, repo.config(name))
    if auto is None:
        return hand_options(repo, name, frontier)
    _, records, profile = auto
    memory = {t: weights_mb(r.params) for t, r in records.items()}
    return profile_options(profile, records, memory, full_channels(frontier)), list(records)


def full_channels(frontier) -> int:
    """The full width's channel total: the widest candidate's (the frontier measures it)."""
    return max(sum(c.sizes.values()) for c in frontier.candidates)


def _check_known(live: str, names: list[str], known: list[str]) -> None:
    """``--live``'s names must be tiers of its source: a ValueError naming the known ones."""
    unknown = [n for n in names if n not in known]
    if unknown:
        source = live.partition(":")[0]
        raise ValueError(
            f"--live {live}: {source} has no tier {', '.join(map(repr, unknown))}; "
            f"its tiers: {', '.join(known)}"
        )


def hand_options(repo, name: str, frontier):
    """model.yaml's tiers as (options, names), measured like the frontier's: a tier with a
    candidate's channel counts takes that candidate's latency (one measurement for both
    sides), and where its build measured no accuracy, the candidate's accuracy - or, with
    no such candidate, that of the candidate closest in FLOPs (an estimate; a FLOPs
    fraction would not compare with measured accuracies) - where the frontier scores by
    FLOPs fraction, the tier's own."""
    import dataclasses

    from runtime.repository import TierRecord
    from sim.tiering import profile_options

    config = repo.config(name)
    records = {t.name: TierRecord.read(repo.tier_dir(name, t.name) / "tier.json")
               for t in config.tiers}  # fmt: skip
    # profile.json is needed only for tiers no candidate measured: one with a candidate's
    # channel counts takes the candidate's tables (a build with --no-profile, or a serving
    # image whose tiers all are frontier candidates, has none).
    profile = repo.read_profile(name)
    by_sizes = {json.dumps(c.sizes, sort_keys=True): c for c in frontier.candidates}
    tables = dict(profile["tiers"]) if profile is not None else {}
    for t, rec in records.items():
        c = by_sizes.get(json.dumps(rec.sizes, sort_keys=True))
        if c is not None:
            tables[t] = c.latency
        if rec.accuracy is None and frontier.accuracy_source.startswith("flops"):
            # the frontier's "accuracy" is a FLOPs fraction: the tier's own (it took the
            # nearest candidate's - w030 at s050's 0.138, not its 0.111; helper-300)
            ref = max(frontier.candidates, key=lambda c: c.flops)
            records[t] = dataclasses.replace(rec, accuracy=ref.accuracy * rec.flops / ref.flops)
        elif rec.accuracy is None:
            c = c or min(frontier.candidates, key=lambda c: abs(c.flops - rec.flops))
            records[t] = dataclasses.replace(rec, accuracy=c.accuracy)
    missing = [t for t in records if t not in tables]
    if missing and profile is None:
        raise ValueError(
            f"{name}/profile.json is missing and tier {', '.join(missing)} has no frontier "
            "candidate of its channel counts: run `innfer build`"
        )
    if missing:  # built with --no-profile, or a build interrupted while profiling
        raise ValueError(
            f"{name}/profile.json has no tier {', '.join(missing)} (built without profiling?): "
            "run `innfer build`"
        )
    base = profile if profile is not None else frontier.profile([])
    profile = {**base, "tiers": {t: tables[t] for t in records}}
    memory = {t: weights_mb(r.params) for t, r in records.items()}
    return profile_options(profile, records, memory, full_channels(frontier)), list(records)


def _check_engines(repo, name: str, tiers, frontier) -> None:
    """Build (or find in the cache) and run each chosen candidate's engine once: a set
    whose engine cannot load or run is never written. Each ONNX must be the one
    ``frontier`` measured: a load refuses any other (and then serves nothing of the model),
    so a set written over a candidate rewritten or damaged since was a model taken down."""
    from runtime.repository import (
        FRONTIER_DIR,
        FRONTIER_FILE,
        EngineCache,
        RepositoryError,
        sha256_file,
    )
    from runtime.repository.profile import random_feeds

    config = repo.config(name)
    backend = repo.choose_backend(config)
    options = repo.build_options(config, backend)
    cache = EngineCache(repo.model_dir(name) / "engines")
    for tier in tiers:
        onnx = repo.model_dir(name) / FRONTIER_DIR / tier / "model.onnx"
        if not onnx.is_file() or sha256_file(onnx) != frontier.candidate(tier).onnx_sha256:
            raise RepositoryError(
                f"{onnx} is missing or is not the candidate {FRONTIER_FILE} measured "
                "(rewritten since?): kept the live tiers; run `innfer build` to measure the "
                "frontier again"
            )
        engine, _ = cache.get(backend, onnx, options)
        try:
            engine.run(random_feeds(config.inputs, 1, length=config.example_length))
        finally:
            engine.close()


def _same_frontier(repo, name: str, frontier) -> None:
    """Refuse to write a choice where frontier.json was measured again since ``frontier``
    was read (an `innfer build` ran while this apply chose and checked engines): the choice
    would name a frontier no load accepts, and the server's swap fell back to model.yaml's
    tiers."""
    from runtime.repository import FRONTIER_DIR, FRONTIER_FILE, Frontier, RepositoryError

    path = repo.model_dir(name) / FRONTIER_DIR / FRONTIER_FILE
    try:
        now = Frontier.read(path).source_sha256
    except RepositoryError as exc:
        raise RepositoryError(f"{exc} (it changed while this apply ran; nothing written)") from None
    if now != frontier.source_sha256:
        raise RepositoryError(
            f"{path} was measured again while this apply ran (`innfer build`): nothing "
            "written; the live tiers stay, and the next choice is made on the new frontier"
        )


def _active_names(repo, name: str) -> list[str]:
    """The chosen tiers being served (none where the choice is absent or stale)."""
    auto = repo.auto_tiers(name, repo.config(name))
    return list(auto[1]) if auto is not None else []


def format_frontier(frontier) -> str:
    lines = [f"frontier ({frontier.accuracy_source}; {frontier.backend} on {frontier.device}):",
             f"{'candidate':<10} {'MFLOPs':>8} {'accuracy':>9} {'p50 b=1':>9} "
             f"{'p50 b=' + str(frontier.max_batch):>9} {'pareto':>7}"]  # fmt: skip
    for c in sorted(frontier.candidates, key=lambda c: -c.flops):
        lines.append(
            f"{c.name:<10} {c.flops / 1e6:>8.2f} {c.accuracy:>9.2%} {c.p50_ms(1):>7.3f}ms "
            f"{c.p50_ms(frontier.max_batch):>7.3f}ms {'*' if c.pareto else '':>7}"
        )
    return "\n".join(lines)


def _requests(replayed: int, recorded: int | None) -> str:
    if recorded is not None and recorded > replayed:
        return f"last {replayed:,} of {recorded:,} requests (auto_tiers.simulate_requests)"
    return f"{replayed:,} request{'s' * (replayed != 1)}"


def _rate(traffic: dict) -> str:
    """The traffic's rate as the choice's first line says it: "0.0/s" was printed for one
    request, and for requests that all came at one instant."""
    if traffic["requests"] < 2:
        return "no rate (one request)"
    if traffic.get("seconds", 1.0) <= 0:  # (a summary without the span: a rate as it says)
        return "all at one instant"
    return f"at {traffic['rate_per_s']:.1f}/s"


def few_requests_note(requests: int, goals) -> str:
    """A line for a choice made on fewer requests than the server waits for before it
    chooses ("" where there are enough): `tiers suggest` gave a full recommendation on 3."""
    # (what the server waits for: it keeps the last TRAFFIC_CAPACITY requests, and counts
    # a larger min_requests as that many - "waits for 5,000,000" was said; helper-283)
    need = min(goals.rebuild.min_requests, TRAFFIC_CAPACITY)
    if requests >= need:
        return ""
    return (f"note: this choice rests on {requests:,} request{'s' * (requests != 1)}; a server "
            f"waits for {need:,} (auto_tiers.rebuild.min_requests) within window_s "
            f"({goals.window_s:g} s) before it chooses")  # fmt: skip


def format_choice(
    choice,
    min_gain: float,
    accuracy_source: str = "",
    recorded: int | None = None,
    force: bool = False,
) -> str:
    """The choice as ``tiers suggest`` / ``apply`` print it; ``accuracy_source``: the
    frontier's (a FLOPs fraction where the model has no evaluation set, said so);
    ``recorded``: the requests in the traffic file, of which the choice replayed the last
    ``simulate_requests`` (said so where that is fewer: "traffic: 3000 requests" hid that
    47,978 were recorded)."""

    def row(label, e):
        acc = "-" if e.mean_accuracy is None else f"{e.mean_accuracy:.2%}"
        return (f"  {label:<8} {', '.join(e.tiers):<34} attainment {e.attainment:.2%}  "
                f"mean accuracy {acc}  served accuracy {e.served_accuracy:.2%}")  # fmt: skip

    t = choice.traffic
    lo, mid, hi = t["budget_ms_p10_p50_p90"]
    action, why = verdict(choice, min_gain, force)
    verdict_text = f"{action} ({why})" if why else action
    flops = accuracy_source.startswith("flops")
    requests = _requests(t["requests"], recorded)
    return "\n".join([
        f"traffic: {requests} {_rate(t)}, budgets p10/p50/p90 "
        f"{lo:.1f}/{mid:.1f}/{hi:.1f} ms ({len(choice.evaluated)} sets simulated)",
        *([f"  accuracy: {FLOPS_PROXY}"] if flops else []),
        row("live", choice.current),
        row("chosen", choice.best),
        f"  expected gain {choice.gain:+.4f} (served accuracy "
        f"{choice.best.served_accuracy - choice.current.served_accuracy:+.2%}, attainment "
        f"{choice.best.attainment - choice.current.attainment:+.2%}) -> {verdict_text}",
    ])  # fmt: skip


def verdict(choice, min_gain: float, force: bool = False) -> tuple[str, str]:
    """("apply" or "keep", why - "" for a plain apply): what ``tiers apply`` does with
    ``choice`` (``Choice.worth``; with ``force``, any other set), as the table and the JSON
    say it (with --force they said "keep" of a set that was written: review helper-228)."""
    breaks = getattr(choice, "live_breaks", ())
    if not choice.changes:
        return "keep", "same set"
    other_counts = choice.best.tiers == choice.current.tiers
    same_names = "the same names, other channel counts"
    if breaks:  # replaced whatever the gain: a set the goals forbid is not kept
        why = f"the live set breaks the goals: {'; '.join(breaks)}"
        return "apply", f"{why}; {same_names}" if other_counts else why
    if choice.gain < min_gain:
        why = "gain below rebuild.min_gain"
        action = "apply" if force else "keep"
        why = f"--force, {why}" if force else why
        return action, f"{why}; {same_names}" if other_counts else why
    return "apply", same_names if other_counts else ""


def choice_json(choice, min_gain: float, force: bool = False) -> dict:
    """``Choice.to_json`` with the verdict the table prints and the ``min_gain`` it was
    judged by (a script read the gain and had to re-derive the rule; review 191)."""
    action, why = verdict(choice, min_gain, force)
    return {**choice.to_json(), "verdict": action, "reason": why, "min_gain": min_gain}


def plot_frontier(
    frontier, chosen: list[str], path: Path, hand: dict | None = None, stale: bool = False
) -> None:
    """Accuracy vs latency at batch 1 of every candidate, the frontier joined, the chosen
    set ringed, and (``hand``: name -> (latency, accuracy)) the hand-written tiers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for shaped, marker in ((False, "o"), (True, "s")):
        cs = [c for c in frontier.candidates if c.shaped == shaped]
        ax.scatter([c.p50_ms(1) for c in cs], [c.accuracy for c in cs], marker=marker,
                   alpha=0.5, label="shaped" if shaped else "uniform")  # fmt: skip
    # The line joins the frontier of what is drawn - batch 1: frontier.json's marks hold at
    # batch 1 or max_batch, and the line went through a point the plot showed beaten (a
    # candidate 0.1 us faster at batch 4; review helper-300).
    from runtime.repository.frontier import mark_pareto

    p = sorted((c for c in mark_pareto(frontier.candidates, (1,)) if c.pareto),
               key=lambda c: c.p50_ms(1))  # fmt: skip
    ax.plot([c.p50_ms(1) for c in p], [c.accuracy for c in p], "k-", lw=1,
            label="frontier at batch 1")  # fmt: skip
    # Each marker kind labelled once: the green crosses read as the chosen set where no
    # set was chosen yet and the title promised red rings (review helper-269).
    for i, name in enumerate(chosen):
        c = frontier.candidate(name)
        ax.scatter([c.p50_ms(1)], [c.accuracy], s=160, facecolors="none", edgecolors="red",
                   label=None if i else "chosen tiers")  # fmt: skip
        ax.annotate(name, (c.p50_ms(1), c.accuracy), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    for i, (name, (lat, acc)) in enumerate((hand or {}).items()):
        ax.scatter([lat], [acc], marker="x", color="green",
                   label=None if i else "model.yaml's tiers")  # fmt: skip
        ax.annotate(name, (lat, acc), fontsize=8, color="green", xytext=(4, -10),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("p50 latency at batch 1 (ms)")
    ax.set_ylabel(f"accuracy ({frontier.accuracy_source.split(' (')[0]})")
    if stale:  # (its chosen set, if any, is not drawn: "no tier set chosen yet" was wrong)
        title = "candidate widths\n(out of date: measured on an older model; run innfer build)"
    else:
        title = "candidate widths" + ("" if chosen else "; no tier set chosen yet")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
