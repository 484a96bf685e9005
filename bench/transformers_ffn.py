"""all-MiniLM-L6-v2, FFN width only (heads kept), no gradient steps: the setup issue 13 quoted
its data-free figures in, re-measured on the held-out sentences of ``runtime.demo.text_corpus``
(the issue used 200 hand-written sentences, so absolute values differ).

Rows per FFN fraction (75 / 50 / 25 %), mean cosine to the full model's embedding:
  inn_data_free      the INN's uniform grid (``auto``), no data
  l2_prune           FFN channels pruned by the L2 norm of their weights, no data
  inn_uniform_refit  the uniform grid, then ``refit_readouts`` on ~1,024 calibration sentences
  l2_prune_refit     the L2 pruning, then the same refit
  inn_chosen_refit   the nodes ``runtime.inn.selection`` chooses (on those sentences), then
                     the same refit
  inn_shaped_refit   the same FFN channels in total spread over the layers by measured
                     sensitivity (``{"ffn": f, "shaped": True}``, runtime.inn.shaping), chosen
                     nodes, the same refit (at 25 % every layer is at the narrowest probed
                     width, so it equals inn_chosen_refit)

Writes bench/results/transformers_ffn_only.json (~5 min).

    .venv/bin/python -m bench.transformers_ffn
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch

from bench.transformers import (
    BATCH_SIZE,
    MULTIPLE_OF,
    OUT,
    REFIT_SENTENCES,
    SEED,
    kept,
    load_text,
    prune,
    refitted,
    weight_norm_scores,
)
from runtime.demo.minilm import MAX_LENGTH, convert_minilm
from runtime.inn.distill import length_batches, other_batches, some_batches
from runtime.inn.fidelity import embed, evaluate
from runtime.inn.selection import readout_grams, select_nodes, store_grids
from runtime.inn.sensitivity import SCORE_SENTENCES, measure_sensitivity

FRACTIONS = (0.75, 0.5, 0.25)


def run() -> dict:
    torch.set_num_threads(2)
    text, corpus = load_text(MAX_LENGTH)
    inn = convert_minilm()
    full = inn.sample(1.0)
    full_emb = embed(full, *text["evaluation"])
    batches = length_batches(*text["calibration"], BATCH_SIZE)
    sample = some_batches(batches, REFIT_SENTENCES, SEED)
    grams = readout_grams(inn, full, sample)
    norm = weight_norm_scores(inn)
    shaped = inn.copy()  # as calibrate_text measures it: scored on other sentences
    shaped.info["sensitivity"] = measure_sensitivity(
        inn, full, grams, other_batches(batches, sample, SCORE_SENTENCES, SEED),
        multiple_of=MULTIPLE_OF,
    )  # fmt: skip
    out = {}
    for f in FRACTIONS:
        sizes = inn.sizes({"ffn": f}, MULTIPLE_OF)
        ffn = {g: n for g, n in sizes.items() if n != inn.group(g).size}
        keep = kept({g: norm[g] for g in ffn}, ffn)
        chosen = inn.copy()
        store_grids(chosen, select_nodes(chosen, full, grams, sizes))
        uniform = partial(inn.sample, sizes, calibrated=False)
        modules = {
            "inn_data_free": uniform(),
            "l2_prune": prune(inn, keep),
            "inn_uniform_refit": refitted(inn, uniform, sizes, batches, SEED)[0],
            "l2_prune_refit": refitted(inn, partial(prune, inn, keep), sizes, batches, SEED)[0],
            "inn_chosen_refit": refitted(
                inn, partial(chosen.sample, sizes, calibrated=False), sizes, batches, SEED
            )[0],
        }
        shaped_sizes = shaped.sizes({"ffn": f, "shaped": True}, MULTIPLE_OF)
        store_grids(shaped, select_nodes(shaped, full, grams, shaped_sizes))
        modules["inn_shaped_refit"] = refitted(
            inn, partial(shaped.sample, shaped_sizes, calibrated=False), shaped_sizes, batches,
            SEED,
        )[0]  # fmt: skip
        out[str(f)] = {k: evaluate(m, text["evaluation"], full_emb) for k, m in modules.items()}
        out[str(f)]["inn_shaped_refit"]["sizes"] = shaped_sizes
        print(f, {k: round(v["cosine"], 4) for k, v in out[str(f)].items()}, flush=True)
    return {"ffn_fractions": out, "corpus": corpus, "refit_sentences": REFIT_SENTENCES,
            "sensitivity": shaped.info["sensitivity"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    # no options; --help says what it does instead of starting the ~5 minute run
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    results = run()
    (OUT / "transformers_ffn_only.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
