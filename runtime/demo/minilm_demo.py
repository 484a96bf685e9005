"""``innfer demo --model minilm``: all-MiniLM-L6-v2 as a model repository that takes text.

Converts the packaged checkpoint (``runtime.demo.minilm``), calibrates each smaller tier on
the offline calibration sentences (``runtime.demo.text_corpus``; ``runtime.inn.distill``),
writes ``model.yaml`` with a text input and the model's own ``tokenizer.json``; the build
then makes the tiers (ONNX with dynamic batch and sequence axes, engines, a profile per
length).

Example:
    >>> write_repository(Path("runs/demo/repository"), "minilm", seconds=60)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

# (heads, FFN) fractions: the four tiers. The names say both, in percent.
TIERS = [
    {"name": "h100", "width": 1.0},
    {"name": "h075", "width": {"heads": 0.75, "ffn": 0.75}},
    {"name": "h050", "width": {"heads": 0.5, "ffn": 0.5}},
    {"name": "h050f025", "width": {"heads": 0.5, "ffn": 0.25}},
]


def tiers(calibrated: bool) -> list[dict]:
    """``TIERS``, the smaller ones shaped where calibration runs (it measures the per-layer
    sensitivity a shaped width is spread by; data-free tiers have none): the same totals,
    kept where the layers need them (runtime.inn.shaping; bench/transformers.py)."""
    if not calibrated:
        return TIERS
    return [t if t["width"] == 1.0 else {**t, "width": {**t["width"], "shaped": True}}
            for t in TIERS]  # fmt: skip


MULTIPLE_OF = 8
CALIBRATION_SENTENCES = 3000
# Held-out sentences (the corpus's evaluation split) the build scores each tier's embedding
# fidelity on: ~2 s per tier at 1 thread.
EVALUATION_SENTENCES = 500
EVALUATION_FILE = "evaluation.txt"
RECORD = "demo.json"  # how the INN there was made; the same recipe is reused, not redone


def model_config(threads: int = 1, max_length: int = 256, calibrated: bool = True) -> dict:
    """The demo's model.yaml: ids and mask (INT64, dynamic length) or raw text in, the
    normalised 384-d embedding out; shaped tiers where ``calibrated``."""
    return {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": [-1]},
            {"name": "attention_mask", "dtype": "int64", "shape": [-1]},
        ],
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": [384]}],
        "tiers": tiers(calibrated),
        "text": {"input": "text", "max_length": max_length},
        "lengths": [16, 32, 64, 128, max_length],
        "backends": ["onnxruntime"],
        "multiple_of": MULTIPLE_OF,
        "max_batch": 8,
        "threads": threads,
        "default_latency_budget_ms": 100,
        # each tier's "accuracy" (tier.json, the build table, innfer_served_accuracy): the
        # mean cosine of its embeddings to the full width's on held-out sentences
        "evaluation": {"text": EVALUATION_FILE, "limit": EVALUATION_SENTENCES},
        # Plans per length are precise, so the time outside queue and compute decides what
        # is late: plan for it (bench/text_serving: 99.5 vs 83.7 % within 30 ms budgets).
        "plan_overhead": True,
    }


def recipe(seconds: float) -> dict:
    out = {"model": "all-MiniLM-L6-v2", "tiers": tiers(seconds > 0), "calibration_seconds": seconds,
           "sentences": CALIBRATION_SENTENCES}  # fmt: skip
    if seconds > 0:  # where calibration starts (data-free tiers have no grid to choose)
        out["grid"] = "selected"
    return out


def reusable(model_dir: Path, seconds: float) -> bool:
    """Whether ``model_dir`` holds the INN this recipe made (then only the build runs)."""
    try:
        record = json.loads((model_dir / RECORD).read_text())
        inn = json.loads((model_dir / "inn.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return record.get("recipe") == recipe(seconds) and record.get("inn_sha256") == inn.get(
        "weights_sha256"
    )


def write_repository(
    root: Path, name: str = "minilm", seconds: float = 60.0, threads: int = 1, progress=True
) -> Path:
    """Convert, calibrate (``seconds`` per smaller tier; 0: data-free tiers) and write
    ``root/name`` (``innfer build`` builds it); returns the model directory."""
    from runtime.build.pipeline import add_model
    from runtime.demo.minilm import MAX_LENGTH, convert_minilm, tokenizer_path
    from runtime.demo.text_corpus import load as load_text
    from runtime.inn.distill import calibrate_text
    from runtime.repository.tokenizer import TextTokenizer

    t0 = time.perf_counter()
    print("converting all-MiniLM-L6-v2 (torch.export, ~10 s) ...")
    inn = convert_minilm(progress=progress)
    if seconds > 0:
        import torch

        texts = load_text("calibration")[:CALIBRATION_SENTENCES]
        ids, mask = TextTokenizer(tokenizer_path(), MAX_LENGTH).encode(texts)
        print(f"calibrating {len(TIERS) - 1} tiers on {len(texts)} sentences, {seconds:.0f} s each")
        widths = [t["width"] for t in tiers(True)[1:]]
        inn = calibrate_text(inn, torch.from_numpy(ids), torch.from_numpy(mask), widths, seconds,
                             multiple_of=MULTIPLE_OF, progress=progress)  # fmt: skip
    model_dir = add_model(root, name, inn, model_config(threads, MAX_LENGTH, seconds > 0))
    write_files(model_dir)
    inn_sha = json.loads((model_dir / "inn.json").read_text())["weights_sha256"]
    record = {"recipe": recipe(seconds), "inn_sha256": inn_sha,
              "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (model_dir / RECORD).write_text(json.dumps(record, indent=1))
    return model_dir


def write_files(model_dir: Path, config: dict | None = None) -> None:
    """The files beside the INN that model.yaml names: the tokenizer and the held-out
    evaluation sentences; and ``config`` as model.yaml when given (a reused INN gets the
    current config)."""
    import yaml

    from runtime.demo.minilm import tokenizer_path
    from runtime.demo.text_corpus import load as load_text

    if config is not None:
        (model_dir / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copyfile(tokenizer_path(), model_dir / "tokenizer.json")
    held_out = load_text("evaluation")[:EVALUATION_SENTENCES]
    (model_dir / EVALUATION_FILE).write_text("".join(f"{t}\n" for t in held_out), encoding="utf-8")
