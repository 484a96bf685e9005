"""Per-group sensitivity of a converted transformer, measured on calibration text.

For every continuous group (a layer's heads, a layer's FFN) and each fraction in
``FRACTIONS``: only that group is narrowed, on the nodes ``runtime.inn.selection`` chooses,
its readout is refitted by least squares as calibration does - from the teacher's Gram
matrix alone (``refit_from_gram``), since nothing else changed - and the loss is ``1 - cos``
between the pooled embedding and the full model's, averaged over sentences the Grams did not
see. The curves drive shaped tiers (``runtime.inn.shaping``); they are stored in the
INN as ``info["sensitivity"]``.

A probe's network is the teacher's up to its group's layer, so it is not run from the
tokens: the teacher's LayerNorm outputs on the scored sentences are kept once, and each probe
runs only what its changed weights reach, from the last of them it does not (the residual
stream entering the group's layer).

On all-MiniLM-L6-v2 (Grams of 1,024 sentences, 512 scored; 36 probes, ~80 s on two cores,
~100 s when each probe ran the whole network: bench/sensitivity.py), half width costs the
last layer's heads 0.057 and every other group 0.004-0.012.

Example:
    >>> curves = measure_sensitivity(inn, teacher, grams, score)  # doctest: +SKIP
    >>> curves["groups"]["m.encoder.layer.5.attention.self.query"]  # doctest: +SKIP
    [[3, 0.116], [6, 0.057], [9, 0.019]]
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from runtime.inn.distill import Resumable, TextBatch, pooled, with_hidden_states
from runtime.inn.model import IntegralModel
from runtime.inn.selection import linear_nodes, readout_weights, select_nodes, store_grids

# The widths each group is probed at (one group narrowed at a time).
FRACTIONS = (0.25, 0.5, 0.75)
# Sentences the loss is measured on (calibrate_text takes them apart from the refit's).
SCORE_SENTENCES = 512
METRIC = "1 - cosine of the pooled embedding to the full model's, one group narrowed, refitted"


@torch.no_grad()
def measure_sensitivity(
    inn: IntegralModel,
    teacher: fx.GraphModule,
    grams: Mapping[str, torch.Tensor],
    score: Sequence[TextBatch],
    *,
    fractions: Sequence[float] = FRACTIONS,
    multiple_of: int = 8,
    method: str = "auto",
    progress: bool = False,
) -> dict:
    """Loss curves per continuous group (module doc): ``{"groups": {name: [[count, loss],
    ...]}, "fractions", "metric", "sentences", "seconds"}``. ``grams``: what
    ``runtime.inn.selection.readout_grams`` measured on other sentences (they choose each
    probe's nodes and refit its readout); ``score``: the batches the loss is measured on."""
    if not score:
        raise ValueError("measure_sensitivity needs batches to score on")
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1), got {list(fractions)}")
    start = time.perf_counter()
    states = _teacher_states(teacher, score)
    target = [pooled(out, b.mask) for b, (out, _) in zip(score, states, strict=True)]  # (B, D)
    probe = inn.copy()  # grids chosen per group land in the copy's info, not the caller's
    full = inn.sizes(1.0)
    reads = readout_weights(inn)
    uniform = [inn.sizes(f, multiple_of) for f in fractions]
    probes = [(g, n) for g in inn.groups for n in sorted({u[g.name] for u in uniform})
              if n < g.size]  # fmt: skip
    groups: dict[str, list[list[float]]] = {g.name: [] for g in inn.groups}
    for g, n in tqdm(probes, desc="sensitivity", unit="probe", disable=not progress):
        sizes = {**full, g.name: n}
        keep = select_nodes(inn, teacher, grams, sizes)[g.name]
        store_grids(probe, {g.name: keep})
        student = probe.sample(sizes, method=method, calibrated=False)
        refit_from_gram(student, teacher, grams[g.name], reads[g.name], keep, g.size)
        loss = _loss(
            student, score, target, [kept for _, kept in states], _changed(student, teacher)
        )
        groups[g.name].append([n, loss])
    return {
        "metric": METRIC,
        "fractions": list(fractions),
        "sentences": _count(score),
        "seconds": time.perf_counter() - start,
        "groups": groups,
    }


@torch.no_grad()
def refit_from_gram(
    student: fx.GraphModule,
    teacher: fx.GraphModule,
    gram: torch.Tensor,
    weight: str,
    keep: torch.Tensor,
    entries: int,
    ridge: float = 1e-4,
) -> None:
    """Solve ``student``'s readout ``weight`` (in place), which reads the ``keep`` entries of
    a group of ``entries``, by least squares towards the teacher's readout output - what
    ``runtime.inn.distill.refit_readouts`` does, without a forward pass. It holds where this
    group alone is narrowed on its chosen nodes: then the student's readout input is the
    teacher's restricted to the kept channels and everything else is the teacher's, so
    ``gram`` ((k + 1, k + 1) of the teacher's ``[x, 1]``) gives both sides of the solve.
    ``ridge`` as in ``refit_readouts``."""
    w_t, b_t = _linear(teacher, weight)
    k = w_t.shape[1]
    inner = k // entries  # channels per entry (a head's width; 1 for FFN channels)
    cols = (keep.long()[:, None] * inner + torch.arange(inner)).reshape(-1)
    cols = torch.cat([cols, torch.tensor([k])])  # the bias' constant input, last
    g = gram.double()
    g_ss = g[cols][:, cols]  # (n + 1, n + 1): the student's Gram
    cross = torch.cat([w_t, b_t[:, None]], 1).double() @ g[:, cols]  # (out, n + 1)
    reg = ridge * g_ss.diagonal().mean() * torch.eye(len(cols), dtype=g.dtype)
    fitted = torch.linalg.solve(g_ss + reg, cross.T).T  # (out, n + 1)
    w_s, b_s = _linear(student, weight)
    w_s.copy_(fitted[:, :-1])
    b_s.copy_(fitted[:, -1])


def _linear(module: fx.GraphModule, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) parameters of the linear layer using ``weight``."""
    node = linear_nodes(module.graph)[weight]
    if len(node.args) < 3 or node.args[2] is None:
        raise ValueError(f"the linear layer using {weight} has no bias; the refit needs one")
    return module.get_parameter(node.args[1].target), module.get_parameter(node.args[2].target)


def _count(batches: Sequence[TextBatch]) -> int:
    return sum(len(b.ids) for b in batches)


def _teacher_states(teacher: fx.GraphModule, score: Sequence[TextBatch]) -> list[tuple]:
    """Per scored batch: (the teacher's output, {LayerNorm node name: its output})."""
    tapped = with_hidden_states(teacher).eval()
    names = [n.name for n in tapped.graph.find_nodes(op="output")[0].args[0][1]]
    out = []
    for b in score:
        output, hidden = tapped(b.ids, b.mask)
        out.append((output, dict(zip(names, hidden, strict=True))))
    return out


def _changed(student: fx.GraphModule, teacher: fx.GraphModule) -> set[str]:
    """Names of ``student``'s parameters and buffers that are not the teacher's (another
    shape or other values)."""
    theirs = {**dict(teacher.named_parameters()), **dict(teacher.named_buffers())}
    mine = {**dict(student.named_parameters()), **dict(student.named_buffers())}
    return {k for k, v in mine.items()
            if k not in theirs or v.shape != theirs[k].shape
            or not torch.equal(v, theirs[k])}  # fmt: skip


def resume_plan(graph: fx.Graph, changed: set[str], kept: set[str]) -> tuple[list, list]:
    """``(cut, run)``: what a network that is the teacher but for the ``changed`` weights
    must compute, given the teacher's values of the nodes named in ``kept``. ``cut``: the
    kept nodes no changed weight reaches that the output needs (their values are the
    teacher's); ``run``: every other node the output needs, in graph order, output last.
    Placeholders are in neither."""
    dirty: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "get_attr" and node.target in changed) or any(
            i in dirty for i in node.all_input_nodes
        ):
            dirty.add(node)
    (output,) = graph.find_nodes(op="output")
    cut, need, stack = set(), set(), [output]
    while stack:
        node = stack.pop()
        if node in need or node in cut or node.op == "placeholder":
            continue
        if node.name in kept and node not in dirty:
            cut.add(node)
            continue
        need.add(node)
        stack.extend(node.all_input_nodes)
    order = list(graph.nodes)
    return [n for n in order if n in cut], [n for n in order if n in need]


def _loss(
    student: fx.GraphModule,
    score: Sequence[TextBatch],
    target: list,
    kept: Sequence[Mapping[str, torch.Tensor]],
    changed: set[str],
) -> float:
    """Mean over the scored sentences of ``1 - cos`` to the teacher's embedding; ``student``
    runs from the teacher's ``kept`` values (per batch) where its ``changed`` weights allow."""
    cut, run = resume_plan(student.graph, changed, set(kept[0]) if kept else set())
    total, count = 0.0, 0
    for b, t, values in zip(score, target, kept, strict=True):
        resumed = Resumable(student, (b.ids, b.mask))
        resumed.env.update({n: values[n.name] for n in cut})
        resumed.run(run)
        cos = F.cosine_similarity(pooled(resumed.env[run[-1]], b.mask), t, dim=-1)
        total += float((1 - cos).sum())
        count += len(cos)
    return total / count
