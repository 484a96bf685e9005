"""Embedding fidelity by width: how close each tier of a text embedder stays to its full width
(``innfer report MODEL_DIR --text FILE``; bench/transformers.py measures with the same code).

A text embedder has no labels to score accuracy on; what its users keep is the geometry of
its embeddings. Per tier, on held-out sentences: the mean cosine of each sentence's
embedding to the full width's (and the 5th percentile: the worst sentences), and retrieval
agreement - each sentence queried against all the others, whether the tier's nearest
neighbour is the full model's (top-1) and the overlap of the 10 nearest (top-10).

Example:
    >>> rows = fidelity_report(inn, ids, mask, {"h100": 1.0, "h050": {"heads": 0.5,
    ...     "ffn": 0.5}}, multiple_of=8)  # doctest: +SKIP
    >>> print(format_fidelity(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.inn.distill import length_batches
from runtime.inn.model import IntegralModel


@dataclass(frozen=True)
class FidelityRow:
    """One tier's fidelity to the full width (1.0 everywhere for the full width itself)."""

    tier: str
    channels: dict[str, int]  # per kind (heads, ffn): the total over the layers
    params: int
    calibrated: bool  # calibrated weights serve it (innfer calibrate --text)
    cosine: float  # mean over the sentences
    cosine_p05: float  # 5th percentile: the worst sentences
    top1: float
    top10: float


@torch.no_grad()
def embed(module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, D) embeddings in the sentences' order (computed in batches by length, for speed).

    ``ids``, ``mask``: (N, T) int64, as ``TextTokenizer.encode`` returns them."""
    order = torch.argsort(mask.sum(1), stable=True)  # length_batches' order
    sorted_emb = torch.cat([module(b.ids, b.mask).float() for b in length_batches(ids, mask, 64)])
    out = torch.empty_like(sorted_emb)
    out[order] = sorted_emb
    return out


def retrieval_agreement(full: torch.Tensor, tier: torch.Tensor, k: int = 10) -> tuple:
    """(top-1, top-k) agreement of nearest neighbours by cosine, each of the N sentences
    queried against the other N - 1. ``full``, ``tier``: (N, D) embeddings, N > k.

    Example:
        >>> e = torch.eye(12)[:, :11] + 0.1
        >>> retrieval_agreement(e, e, k=3)
        (1.0, 1.0)
    """

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(e.float(), dim=-1)
        sim = unit @ unit.T  # (N, N)
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=1).indices  # (N, k) best first

    if len(full) <= k:
        raise ValueError(f"retrieval agreement at k={k} needs more than {k} sentences")
    a, b = neighbours(full), neighbours(tier)
    top1 = float((a[:, 0] == b[:, 0]).float().mean())
    overlap = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1).float() / k  # (N,)
    return top1, float(overlap.mean())


def evaluate(module: torch.nn.Module, text: tuple, full: torch.Tensor) -> dict:
    """Cosine (mean, spread, 5th percentile) and retrieval agreement of ``module``'s
    embeddings of ``text`` = (ids, mask) against the full width's ``full`` (N, D)."""
    return compare(embed(module, *text), full)


def compare(emb: torch.Tensor, full: torch.Tensor) -> dict:
    """``evaluate``'s figures for embeddings ``emb`` (N, D) already computed."""
    cos = F.cosine_similarity(emb, full, dim=-1)  # (N,)
    top1, top10 = retrieval_agreement(full, emb)
    return {
        "cosine": float(cos.mean()),
        "cosine_std": float(cos.std(correction=0)),
        "cosine_p05": float(cos.quantile(0.05)),
        "top1": top1,
        "top10": top10,
    }


def fidelity_report(
    inn: IntegralModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    widths: Mapping[str, float | Mapping],
    *,
    multiple_of: int = 1,
    method: str = "auto",
) -> list[FidelityRow]:
    """One row per named width (what ``IntegralModel.sizes`` takes; a shaped one needs the
    INN's measured sensitivity), each sampled as ``innfer build`` samples it: calibrated
    weights where the INN holds them. The full width is the reference and comes first.
    ``ids``, ``mask``: (N, T) int64 held-out sentences, N > 10 - sentences calibration did
    not see, or the figures flatter the tiers."""
    if not widths:
        raise ValueError("widths is empty; name at least one width")
    text = (torch.as_tensor(ids).long(), torch.as_tensor(mask).long())
    full = embed(inn.sample(1.0), *text)
    full_sizes = inn.sizes(1.0)
    sized = {name: inn.sizes(w, multiple_of) for name, w in widths.items()}
    full_name = next((n for n, s in sized.items() if s == full_sizes), "full")
    smaller = {n: s for n, s in sized.items() if s != full_sizes}
    rows = []
    for name, sizes in {full_name: full_sizes, **smaller}.items():
        net = inn.sample(sizes, method=method)
        # the full width against itself: its embeddings are the reference already
        scores = compare(full, full) if sizes == full_sizes else evaluate(net, text, full)
        channels: dict[str, int] = {}
        for g in inn.groups:
            channels[inn.kind(g)] = channels.get(inn.kind(g), 0) + sizes[g.name]
        rows.append(FidelityRow(
            tier=name,
            channels=channels,
            params=sum(p.numel() for p in net.parameters()),
            calibrated=inn.sizes_key(sizes) in inn.tiers,
            cosine=scores["cosine"], cosine_p05=scores["cosine_p05"],
            top1=scores["top1"], top10=scores["top10"],
        ))  # fmt: skip
    return rows


def format_fidelity(rows: list[FidelityRow]) -> str:
    """A plain-text table, one line per tier."""
    kinds = sorted({k for r in rows for k in r.channels})
    head = "".join(f"{k:>7}" for k in kinds)
    lines = [f"{'tier':<12}{head} {'params':>11} {'cosine':>7} {'p05':>7} {'top1':>6} "
             f"{'top10':>6}  weights"]  # fmt: skip
    for r in rows:
        counts = "".join(f"{r.channels.get(k, 0):>7}" for k in kinds)
        weights = "reference" if r is rows[0] else "calibrated" if r.calibrated else "sampled"
        lines.append(f"{r.tier:<12}{counts} {r.params:>11,} {r.cosine:>7.4f} "
                     f"{r.cosine_p05:>7.4f} {r.top1:>6.3f} {r.top10:>6.3f}  {weights}")  # fmt: skip
    return "\n".join(lines)


def save_fidelity(rows: list[FidelityRow], json_path: Path | None, png_path: Path | None) -> None:
    """The rows as JSON, and a plot of cosine and top-10 agreement against parameters."""
    if json_path is not None:
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if png_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    ordered = sorted(rows, key=lambda r: r.params)
    x = [r.params / 1e6 for r in ordered]
    for a, key, label in ((ax[0], "cosine", "cosine to the full width"),
                          (ax[1], "top10", "top-10 neighbour agreement")):  # fmt: skip
        y = [getattr(r, key) for r in ordered]
        a.plot(x, y, marker="o")
        for r, xi, yi in zip(ordered, x, y, strict=True):
            name = r.tier if r.calibrated or r is rows[0] else f"{r.tier} (sampled)"
            a.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
        a.set_xlabel("parameters (M)")
        a.set_ylabel(label)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
