"""Calibration of a converted transformer on unlabelled text: per-tier refit and distillation.

``calibrate_text`` tunes, for each target width (tier), the network the INN samples at that
width, with the full width as teacher, on a few thousand sentences and a time budget:

  1. the sentences are sorted by length and cut into batches trimmed to their longest
     sentence (``length_batches``), so a batch computes little padding;
  2. the teacher runs once over every batch (``teacher_targets``): its output embedding and
     the residual stream after every LayerNorm, kept for the whole calibration;
  3. each tier starts from the INN's sample at its sizes, on the grid of nodes
     ``runtime.inn.selection`` chooses from ~1,000 of the sentences (``grid="selected"``;
     ``"uniform"`` keeps the INN's own grid). ``refit_readouts`` then solves the layers that
     read a resampled group (attention output projection, FFN down-projection) by least
     squares, layer after layer on those sentences, so that the residual sum each LayerNorm
     sees matches the teacher's (all-MiniLM-L6-v2 at 50 % heads and FFN, mean cosine to the
     full model: uniform grid 0.31 -> 0.80, chosen nodes 0.89). Each batch runs through
     the student once, paused before each readout until that one is solved (1,024
     sentences: 7 s on 2 cores, against 20 s re-running the network per readout);
  4. then AdamW steps (``distil``) for the rest of the budget, on every sentence but step
     5's, on ``1 - cos`` between its pooled embedding and the teacher's plus the mean
     squared error of every LayerNorm output on the real tokens, each relative to the
     teacher's mean square there; the learning rate warms up (over 3 % of the budget and
     at least 50 steps) then decays by a cosine over the budget. The token embedding
     tables are frozen: they are not resampled and the text covers little of the
     vocabulary;
  5. the distilled network is kept only if its embeddings are closer to the teacher's than
     the refitted start's on 256 sentences neither step 3 nor step 4 used: a budget too
     short to recover from Adam's first steps, or spent overfitting, leaves the refit. A
     tier an earlier run stored stays where it is as close, if that run held out the same
     sentences (``check_digest``); otherwise it is replaced, not judged.

Steps 3-5 are ``calibrate_network``, which takes any start: bench/transformers.py gives
pruned networks exactly the same treatment. The residual stream keeps the model width at
every tier (only heads and FFN channels are resampled), so student and teacher states
compare position by position; the per-layer term gives every layer a direct signal instead
of only the pooled vector's gradient. The result is stored with the INN
(``IntegralModel.set_tier``): ``sample`` returns it at exactly those channel counts; the
nodes are unchanged, so the full width stays the source model.

Example:
    >>> tuned = calibrate_text(inn, ids, mask, [{"heads": 0.5, "ffn": 0.5}], seconds=300)
    ... # doctest: +SKIP
    >>> small = tuned.sample(tuned.sizes({"heads": 0.5, "ffn": 0.5}, multiple_of=8))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from runtime.inn.calibrate import keep_grids
from runtime.inn.divergence import check_loss, check_weights
from runtime.inn.model import IntegralModel
from runtime.inn.selection import (
    linear_nodes,
    readers,
    readout_grams,
    select_nodes,
    store_grids,
)
from runtime.inn.shaping import unshaped

log = logging.getLogger("innfer.calibrate")

# Share of a tier's budget over which the learning rate warms up from 0: Adam's first steps
# on a freshly resampled network are large and noisy.
WARMUP = 0.03
# ... and at least this many steps: Adam's first updates move every weight by about the
# learning rate whatever its gradient, which undoes a refitted start. With a short budget
# (the MiniLM demo's 60 s, ~40 of them spent choosing nodes and refitting, 5 steps left)
# the 3 % were under one step: h075's loss went 0.028 -> 0.30 in one step and the tier
# ended at 0.89 cosine, below its refit.
WARMUP_STEPS = 50
# Sentences a tier's calibration checks the distillation on (neither the refit's nor the
# distillation's): if the distilled network is further from the teacher than the refitted
# start, the start is kept.
CHECK_SENTENCES = 256
CHECK_SEED = 0  # which ones: fixed, so that every run on a text checks the same sentences
_LAYER_NORM_FNS = (F.layer_norm, torch.layer_norm, torch.ops.aten.layer_norm.default)
_EMBEDDING_FNS = (F.embedding, torch.embedding, torch.ops.aten.embedding.default)
_ADDS = (operator.add, torch.add, torch.ops.aten.add.Tensor)
# Where a tier's sample points start (calibrate_text's ``grid``).
GRIDS = ("selected", "uniform")


@dataclass(frozen=True)
class TextBatch:
    """Sentences of similar length, trimmed to the longest of them."""

    ids: torch.Tensor  # (B, T) int64 token ids
    mask: torch.Tensor  # (B, T) int64, 1 on real tokens


@dataclass(frozen=True)
class Targets:
    """What the teacher computed on one batch."""

    embedding: torch.Tensor  # (B, D) the pooled output
    hidden: tuple[torch.Tensor, ...]  # per LayerNorm: (B, T, H) float16 (halves the memory)


@dataclass(frozen=True)
class DistilResult:
    """What one ``distil`` run did."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float  # mean over the last 5 % of the steps (one step is noisy)
    lr: float  # the schedule's peak


def check_text(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` as int64 tensors after checking they are one padded batch of text;
    raises ValueError naming what is wrong."""
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(
            f"ids and mask must both be (N, T); got {tuple(ids.shape)} and {tuple(mask.shape)}"
        )
    if ids.numel() == 0:
        raise ValueError(f"no calibration text: ids has shape {tuple(ids.shape)}")
    if ids.is_floating_point() or mask.is_floating_point():
        raise ValueError(f"ids and mask must be integer tensors, got {ids.dtype}, {mask.dtype}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold 0 (padding) and 1 (token) only")
    if not mask.any(1).all():
        raise ValueError("every sentence needs at least one token (a row of mask is all 0)")
    return ids.long(), mask.long()


def length_batches(ids: torch.Tensor, mask: torch.Tensor, batch_size: int) -> list[TextBatch]:
    """Batches of ``batch_size`` sentences in order of length, each trimmed to its longest.

    Example:
        >>> ids = torch.tensor([[1, 2, 3], [4, 0, 0], [5, 6, 0]])
        >>> [tuple(b.ids.shape) for b in length_batches(ids, (ids > 0).long(), 2)]
        [(2, 2), (1, 3)]
    """
    ids, mask = check_text(ids, mask)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.argsort(mask.sum(1), stable=True)
    batches = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        t = int(mask[idx].any(0).nonzero().max()) + 1  # last column holding a real token
        batches.append(TextBatch(ids[idx, :t], mask[idx, :t]))
    return batches


def with_hidden_states(module: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule sharing ``module``'s parameters whose forward returns ``(output,
    (h_1, ..., h_k))``: the original output and every LayerNorm's output in graph order.

    The sampled network is a flat graph of functional calls (torch.export keeps no
    ``nn.LayerNorm`` to hook), so the states are read off the graph's layer_norm nodes.
    """
    modules = dict(module.named_modules())
    return with_taps(module, lambda g: tuple(n for n in g.nodes if _is_layer_norm(n, modules)))


def with_taps(module: fx.GraphModule, pick, only: bool = False) -> fx.GraphModule:
    """``module`` (parameters shared, not copied) also returning the values of the nodes
    ``pick(graph)`` lists (a nested tuple of nodes): forward -> ``(output, picked)``; with
    ``only``, forward -> ``picked`` and computes nothing past them (the rest is pruned)."""
    graph = copy.deepcopy(module.graph)
    picked = pick(graph)
    (output,) = graph.find_nodes(op="output")
    output.args = (picked,) if only else ((output.args[0], picked),)
    if only:
        graph.eliminate_dead_code()
    graph.lint()
    tapped = fx.GraphModule(module, graph)
    tapped.train(module.training)
    return tapped


def _is_layer_norm(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _LAYER_NORM_FNS
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.LayerNorm)


def embedding_tables(module: fx.GraphModule) -> set[str]:
    """Names of the parameters ``module`` looks tokens up in (frozen while distilling)."""
    names = set()
    for node in module.graph.nodes:
        if node.op == "call_module" and isinstance(module.get_submodule(node.target), nn.Embedding):
            names.add(f"{node.target}.weight")
        elif node.op == "call_function" and node.target in _EMBEDDING_FNS:
            # F.embedding(input, weight); aten.embedding(weight, indices)
            weight = node.args[1] if node.target is F.embedding else node.args[0]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                names.add(str(weight.target))
    return names


def pooled(output, mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding (B, D) in a model's output: the output itself when it is
    already (B, D) (a pooled model), else the mean of its token states over the real tokens."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    output = getattr(output, "last_hidden_state", output)
    if output.ndim == 2:
        return output
    m = mask.unsqueeze(-1).to(output.dtype)  # (B, T, 1)
    return (output * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)


def readouts(inn: IntegralModel, sizes: Mapping[str, int]) -> list[str]:
    """Weights of the linear layers that read a group resampled at ``sizes`` (in a BERT
    layer: the attention output projection reads the heads, the FFN down-projection the
    FFN channels): the layers ``refit_readouts`` solves for."""
    resampled = {gi for gi, g in enumerate(inn.all_groups)
                 if not g.discrete and sizes.get(g.name, g.size) != g.size}  # fmt: skip
    return readers(inn, resampled)


def _readout_nodes(graph: fx.Graph, weights: Sequence[str]) -> tuple:
    """Per readout weight, in graph order: (its linear's input, its output, the residual
    its output is added to - None where it is added to nothing)."""
    found = linear_nodes(graph)
    missing = sorted(set(weights) - set(found))
    if missing:
        raise ValueError(f"no linear layer uses {missing}: cannot refit what reads them")
    order = {n: i for i, n in enumerate(graph.nodes)}
    out = []
    for lin in sorted((found[w] for w in weights), key=order.__getitem__):
        users = list(lin.users)
        add = users[0] if len(users) == 1 and users[0].target in _ADDS else None
        res = next((a for a in add.args if a is not lin), None) if add is not None else None
        out.append((lin.args[0], lin, res))
    return tuple(out)


@torch.no_grad()
def refit_readouts(
    student: fx.GraphModule,
    teacher: fx.GraphModule,
    weights: Sequence[str],
    batches: Sequence[TextBatch],
    ridge: float = 1e-4,
) -> None:
    """Solve every readout layer of ``student`` (in place, in graph order) by least squares
    on ``batches``: its output on the student's own inputs should make the residual sum
    (readout output + residual, what the next LayerNorm sees) equal the teacher's. Each
    layer is solved after the ones before it, on the inputs they now produce, so the target
    also absorbs the drift of the residual stream so far. ``ridge`` times the mean diagonal
    of the Gram matrix regularises the solve; a layer without a bias is solved without one.

    Example:
        >>> refit_readouts(small, full, readouts(inn, sizes), batches[:32])  # doctest: +SKIP
    """
    t_tapped = with_taps(teacher, lambda g: _readout_nodes(g, weights), only=True).eval()
    sums = []  # per batch, per readout: the teacher's residual sum (tokens, D)
    for b in batches:
        real = b.mask.bool()
        taps = t_tapped(b.ids, b.mask)
        sums.append([(y if res is None else y + res)[real] for _, y, res in taps])
    nodes = _readout_nodes(student.graph, weights)
    # Each batch's run of the student stops before readout k and resumes there once k is
    # solved, so the whole refit is one pass (MiniLM's 12 readouts on 1,024 sentences:
    # 20 -> 7 s on 2 cores; the demo's 60 s tiers spent 11-19 s of their 60 refitting).
    schedule = _refit_schedule(student.graph, nodes)
    runs = [Resumable(student, (b.ids, b.mask)) for b in batches]
    was_training = student.training
    student.eval()
    try:
        steps = zip(nodes, schedule, strict=True)
        for k, ((x, lin, res), (restart, run, drop)) in enumerate(steps):
            bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
            gram, cross = 0.0, 0.0
            for b, z, r in zip(batches, sums, runs, strict=True):
                real = b.mask.bool()
                r.run(run, restart)
                xk = r.env[x][real]  # (tokens, inputs): the readout's input on the student
                target = z[k] if res is None else z[k] - r.env[res][real]  # (tokens, D)
                r.drop(drop)
                # (tokens, k + 1): the last column, 1, is the bias' input (none without a bias)
                xa = xk if bias is None else F.pad(xk, (0, 1), value=1.0)
                gram = gram + (xa.T @ xa).double()
                cross = cross + (target.T @ xa).double()  # (D, k + 1)
            reg = ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
            fitted = torch.linalg.solve(gram + reg, cross.T).T  # (D, k + 1)
            weight = student.get_parameter(lin.args[1].target)
            if bias is None:
                weight.copy_(fitted)
            else:
                weight.copy_(fitted[:, :-1])
                student.get_parameter(bias.target).copy_(fitted[:, -1])
    finally:
        student.train(was_training)


def _ancestors(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they are computed from."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _refit_schedule(graph: fx.Graph, nodes: Sequence[tuple]) -> list[tuple[bool, list, list]]:
    """Per readout of ``nodes`` (``_readout_nodes``' triples, in graph order): whether the
    run starts again from the inputs, the nodes to run before the readout is solved - those
    its input and residual need that are not computed yet, in graph order - and the values
    no node still to run reads once it is solved.

    The readout is fitted on the network as it is then: earlier readouts solved, later ones
    not. Where its input or residual reads a later readout (parallel branches added into one
    residual: ``h + a(h) + b(h)``), that later readout runs unsolved; once it is solved,
    everything computed from its old output is stale, so the next readout's run starts again
    from the inputs. The inputs and residuals of readouts still to solve are never dropped.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = {n for n in graph.nodes if n.op == "placeholder"}
    done, stale, plan = set(inputs), False, []
    for k, (x, lin, res) in enumerate(nodes):
        if stale:
            done = set(inputs)
        need = _ancestors([x] if res is None else [x, res])
        if lin in need:
            raise ValueError(f"the input or residual of {lin.name} is computed from its own "
                             "output: it cannot be refitted")  # fmt: skip
        run = sorted(need - done, key=order.__getitem__)
        done |= need
        later = {v for x_j, _, res_j in nodes[k + 1 :] for v in (x_j, res_j) if v is not None}
        drop = [n for n in done - inputs - later if all(u in done for u in n.users)]
        plan.append((stale, run, drop))
        stale = lin in done  # it ran before it was solved
    return plan


class Resumable:
    """One input's run of a flat graph, in pieces: ``run`` computes the given nodes (their
    inputs already computed) and keeps the values; ``drop`` forgets values no longer read."""

    def __init__(self, module: fx.GraphModule, inputs: Sequence[torch.Tensor]):
        self._interpreter = fx.Interpreter(module, garbage_collect_values=False)
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        self._inputs = dict(zip(placeholders, inputs, strict=True))
        self.env: dict[fx.Node, object] = dict(self._inputs)

    def run(self, nodes: Sequence[fx.Node], restart: bool = False) -> None:
        """Compute ``nodes`` in order; ``restart``: first forget everything but the inputs."""
        if restart:
            self.env = dict(self._inputs)
        self._interpreter.env = self.env  # run_node reads its arguments from here
        for node in nodes:
            self.env[node] = self._interpreter.run_node(node)

    def drop(self, nodes: Sequence[fx.Node]) -> None:
        for node in nodes:
            self.env.pop(node, None)


@torch.no_grad()
def teacher_targets(
    teacher: fx.GraphModule, batches: Sequence[TextBatch], progress: bool = False
) -> list[Targets]:
    """Run ``teacher`` (eval mode) once over every batch; its outputs per batch."""
    tapped = with_hidden_states(teacher).eval()
    out = []
    for b in tqdm(batches, desc="teacher", unit="batch", disable=not progress):
        y, hidden = tapped(b.ids, b.mask)
        out.append(Targets(pooled(y, b.mask).float(), tuple(h.half() for h in hidden)))
    return out


def hidden_power(batches: Sequence[TextBatch], targets: Sequence[Targets]) -> torch.Tensor:
    """(k,) mean square of each LayerNorm's teacher output over the real tokens: divides the
    per-layer errors so that every layer weighs alike whatever its scale."""
    total, tokens = None, 0.0
    for b, t in zip(batches, targets, strict=True):
        m = b.mask.unsqueeze(-1).float()  # (B, T, 1)
        sq = torch.stack([(h.float().pow(2) * m).mean(-1).sum() for h in t.hidden])  # (k,)
        total = sq if total is None else total + sq
        tokens += float(m.sum())
    return (total / tokens).clamp_min(1e-12)


def distil_loss(
    output, hidden: Sequence[torch.Tensor], batch: TextBatch, target: Targets,
    power: torch.Tensor, hidden_weight: float,
) -> torch.Tensor:  # fmt: skip
    """``1 - cos`` of the pooled embeddings (mean over sentences) plus ``hidden_weight``
    times the mean over LayerNorms of the relative squared error on the real tokens."""
    loss = 1 - F.cosine_similarity(pooled(output, batch.mask), target.embedding, dim=-1).mean()
    if hidden_weight and hidden:
        m = batch.mask.unsqueeze(-1).to(hidden[0].dtype)  # (B, T, 1)
        tokens = m.sum()
        errors = [((h - t.float()).pow(2) * m).mean(-1).sum() / tokens
                  for h, t in zip(hidden, target.hidden, strict=True)]  # fmt: skip
        loss = loss + hidden_weight * (torch.stack(errors) / power).mean()
    return loss


def distil(
    student: fx.GraphModule,
    batches: Sequence[TextBatch],
    targets: Sequence[Targets],
    seconds: float,
    *,
    max_steps: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    hidden_weight: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    desc: str = "distil",
) -> DistilResult:
    """Distil ``student`` (in place) towards the teacher's ``targets`` for ``seconds`` or
    ``max_steps`` AdamW steps, whichever ends first; one batch per step, in a seeded random
    order renewed every pass. Leaves ``student`` in eval mode. ``lr``: the peak of the
    warm-up + cosine schedule; 1e-3 gave MiniLM's (50 %, 50 %) tier +0.5 point of cosine
    over 3e-4 at seeds 1 and 2 (0.9425 / 0.9416 vs 0.9377 / 0.9363, 300 s each), 2e-3 less
    (bench/results/transformers_sweep.jsonl). Tried and dropped, same file: a KL term on
    the softmax of cosine similarities to the calibration text's teacher embeddings, for
    retrieval agreement (commit "Distillation: an optional relation term"): at weight 1 /
    0.1 the shaped goal tier fell to 0.900 / 0.945 cosine and 0.672 / 0.730 top-10, against
    0.953 / 0.754 without it; a 15 % warm-up instead of 3 % gave 0.951 / 0.748. Also tried
    (session 71): the steps under bfloat16 CPU autocast - 361 against 404 steps in 60 s at
    the same cosine (0.9350 / 0.9358), though this CPU's bf16 matmuls alone run 7.8x fp32's.

    Example:
        >>> batches = length_batches(ids, mask, 32)  # doctest: +SKIP
        >>> targets = teacher_targets(inn.sample(1.0), batches)  # doctest: +SKIP
        >>> distil(pruned, batches, targets, seconds=60).steps  # doctest: +SKIP
        1234
    """
    if len(batches) != len(targets) or not batches:
        raise ValueError(f"{len(batches)} batches but {len(targets)} targets")
    tapped = with_hidden_states(student)
    _check_taps(tapped, batches[0], targets[0])
    # The frozen tables also stop requiring grad: otherwise autograd still builds their
    # dense (vocabulary, D) gradient every step (MiniLM: 11.7 M floats, filled and summed).
    tables = _named(student, embedding_tables(student))
    held = {id(p) for p in tables}  # by identity: a tied table has two names
    params = [p for p in student.parameters() if id(p) not in held and p.requires_grad]
    opt = adamw(params, lr=lr, weight_decay=weight_decay)
    power = hidden_power(batches, targets)
    order = batch_order(len(batches), seed)

    def step() -> float:
        i = next(order)
        output, hidden = tapped(batches[i].ids, batches[i].mask)
        loss = distil_loss(output, hidden, batches[i], targets[i], power, hidden_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach().item()

    student.train()
    with frozen_parameters(tables):
        run = budgeted_steps(step, opt, lr, seconds, max_steps, desc, progress, WARMUP_STEPS)
    student.eval()
    return run


@contextlib.contextmanager
def frozen_parameters(params: Sequence[nn.Parameter]):
    """``params`` do not require grad inside the block; each gets its own ``requires_grad``
    back after it, also when the block raises."""
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, w in zip(params, was, strict=True):
            p.requires_grad_(w)


def _named(module: nn.Module, names: set[str]) -> list[nn.Parameter]:
    """The distinct parameters of ``module`` any of ``names`` refers to (every alias of a
    shared parameter counts: ``named_parameters`` alone lists each under one name only)."""
    found = {id(p): p for n, p in module.named_parameters(remove_duplicate=False) if n in names}
    return list(found.values())


def adamw(params: list[torch.Tensor], **options) -> torch.optim.AdamW:
    """AdamW with the fused CPU kernel: one kernel over every tensor instead of a dozen
    foreach passes (in a profile of MiniLM's (50 %, 50 %) step: 0.19 -> 0.16 s on 2 cores)."""
    return torch.optim.AdamW(params, fused=True, **options)


def budgeted_steps(
    step: Callable[[], float],
    opt: torch.optim.Optimizer,
    lr: float,
    seconds: float,
    max_steps: int | None,
    desc: str,
    progress: bool,
    warmup_steps: int = 0,
) -> DistilResult:
    """Call ``step`` (one optimizer step; returns its loss) until ``seconds`` have passed or
    ``max_steps`` steps are done, whichever is first, setting every parameter group's
    learning rate to ``lr * warmup_cosine(done)`` before each - times ``k / warmup_steps``
    at the k-th step while k < ``warmup_steps`` (a warm-up of at least that many steps);
    a progress bar in steps or seconds. What ``distil`` and ``width_distill.distil_widths``
    share.

    Example:
        >>> budgeted_steps(lambda: 0.0, opt, 1e-3, 1.0, 10, "demo", False).steps
        ... # doctest: +SKIP
        10
    """
    losses: list[float] = []
    steps = max_steps is not None  # (then seconds may be inf: the steps are the budget)
    bar = tqdm(total=max_steps if steps else round(seconds), desc=desc, disable=not progress,
               unit="step" if steps else "s", leave=False)  # fmt: skip
    start = time.perf_counter()
    while max_steps is None or len(losses) < max_steps:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        done = len(losses) / max_steps if max_steps else elapsed / seconds
        ramp = min(1.0, (len(losses) + 1) / warmup_steps) if warmup_steps else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(done) * ramp
        losses.append(step())
        check_loss(losses[-1], len(losses) - 1, desc)
        bar.update(1 if max_steps else round(time.perf_counter() - start) - bar.n)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    check_weights((p for group in opt.param_groups for p in group["params"]), desc)
    tail = losses[-max(1, len(losses) // 20) :] or [math.nan]
    return DistilResult(len(losses), time.perf_counter() - start,
                        losses[0] if losses else math.nan, sum(tail) / len(tail), lr)  # fmt: skip


def warmup_cosine(done: float) -> float:
    """Learning-rate factor at ``done`` in [0, 1] of the budget: linear warmup, cosine decay."""
    if done < WARMUP:
        return done / WARMUP
    return 0.5 * (1 + math.cos(math.pi * min((done - WARMUP) / (1 - WARMUP), 1.0)))


def batch_order(n: int, seed: int):
    """Indices 0..n-1 in a seeded random order, renewed every pass, forever."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


@torch.no_grad()
def _check_taps(tapped: fx.GraphModule, batch: TextBatch, target: Targets) -> None:
    _, hidden = tapped(batch.ids, batch.mask)
    got = [tuple(h.shape) for h in hidden]
    want = [tuple(h.shape) for h in target.hidden]
    if got != want:
        raise ValueError(
            f"the student's LayerNorm outputs {got} do not match the teacher's {want}: "
            f"distillation compares the residual stream, whose width must not be resampled"
        )


def some_batches(batches: Sequence[TextBatch], sentences: int, seed: int) -> list[TextBatch]:
    """A seeded random choice of whole batches holding at least ``sentences`` sentences
    (all of them if there are fewer): the refit's sample, every length represented."""
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed))
    subset, count = [], 0
    for i in order.tolist():
        if count >= sentences:
            break
        subset.append(batches[i])
        count += len(batches[i].ids)
    return subset


def check_batches(batches: Sequence[TextBatch]) -> list[TextBatch]:
    """The batches ``calibrate_network`` checks on: ``CHECK_SENTENCES`` sentences, at most
    half of a small text, chosen by the text alone (the same for every run and tier)."""
    total = sum(len(b.ids) for b in batches)
    return some_batches(batches, min(CHECK_SENTENCES, total // 2), CHECK_SEED)


def text_digest(batches) -> str:
    """A short hash of ``batches``' token ids and masks, in order: equal for the same
    sentences batched alike (same text, tokenizer and batch size)."""
    h = hashlib.sha256()
    for b in batches:
        for t in (b.ids, b.mask):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def other_batches(
    batches: Sequence[TextBatch], taken: Sequence[TextBatch], sentences: int, seed: int
) -> list[TextBatch]:
    """``some_batches`` of those ``batches`` that are not in ``taken`` (all of ``batches``
    if every one is): sentences held apart from a first sample, to score on."""
    rest = [b for b in batches if all(b is not t for t in taken)] or list(batches)
    return some_batches(rest, sentences, seed)


def calibrate_network(
    student: fx.GraphModule,
    teacher: fx.GraphModule,
    weights: Sequence[str],
    batches: Sequence[TextBatch],
    targets: Sequence[Targets],
    seconds: float,
    *,
    refit_sentences: int = 1024,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "distil",
    incumbent: fx.GraphModule | None = None,
    incumbent_check: str | None = None,
    **distil_options,
) -> dict:
    """One tier's calibration, in place: ``CHECK_SENTENCES`` sentences (at most half of a
    small text; the same whatever ``seed``) are set apart; ``refit_readouts`` of
    ``weights`` on a seeded subset of about ``refit_sentences`` of the others (0: skip),
    then ``distil`` on all the others for the rest of ``seconds``; if the distilled
    network's embeddings are further from the teacher's than the start's on the set-apart
    sentences (a budget too short to recover from the first steps, or one spent
    overfitting a small text), the start is kept. ``incumbent``: the network stored for
    this tier by an earlier calibration - kept (its weights loaded into ``student``) where
    it is at least as close on the check (a short re-run replaced a better tier). Any start works
    (the INN's sample, a pruned network): the baselines in bench/transformers.py get
    exactly this. ``incumbent_check``: the ``check_digest`` its run recorded; the
    incumbent is judged only where it is this run's (it held out the same sentences), and
    is otherwise replaced (``stored_judged`` False in the record). Returns what was spent,
    the losses and the check.

    Example:
        >>> log = calibrate_network(small, full, readouts(inn, sizes), batches, targets, 300)
        ... # doctest: +SKIP
    """
    start = time.perf_counter()
    # The check's sentences are chosen first, by the text alone (not ``seed``): every run
    # and tier on one text holds out the same ones, so an ``incumbent`` stored by an
    # earlier run never trained on them either. They are held out of the distillation too:
    # scored on sentences it trained on, an overfitted network looked closer than its
    # start (the MiniLM demo's h075, seed 2, kept 0.9644 on the evaluation set over its
    # start's 0.977). A text too small to spare them (one batch) trains on all of it.
    pairs = list(zip(batches, targets, strict=True))
    checked = {id(b) for b in check_batches(batches)}
    check = [p for p in pairs if id(p[0]) in checked]
    train = [p for p in pairs if id(p[0]) not in checked] or pairs
    rest = [b for b, _ in train]
    sample = some_batches(rest, refit_sentences, seed) if refit_sentences > 0 else []
    if sample and weights:
        refit_readouts(student, teacher, weights, sample)
    refit_seconds = time.perf_counter() - start
    before = embedding_cosine(student, check)
    kept = {k: v.detach().clone() for k, v in student.state_dict().items()}
    check_seconds = time.perf_counter() - start - refit_seconds
    run = distil(student, rest, [t for _, t in train],
                 max(seconds - refit_seconds - 2 * check_seconds, 0),
                 max_steps=max_steps, seed=seed, progress=progress, desc=desc,
                 **distil_options)  # fmt: skip
    after = embedding_cosine(student, check) if run.steps else before
    if after < before:
        student.load_state_dict(kept)
    # "refit": no step ran (the budget went to the refit), so nothing was distilled
    chosen = "start" if after < before else "distilled" if run.steps else "refit"
    check_cosine = {"start": before, "distilled": after}
    digest = text_digest(b for b, _ in check)
    judged = None  # no incumbent
    if incumbent is not None:
        check_cosine["stored"] = embedding_cosine(incumbent, check)
        # Only a tier whose own run held out these very sentences is judged on them: one
        # stored by a run on another text or batch size, or before the check was held out
        # (no digest), may have trained on them, which reads up to ~3 points closer at
        # 60 s budgets (demo_calibration_check.json) - it would be kept for memorising.
        judged = incumbent_check == digest
        if judged and check_cosine["stored"] >= max(before, after):
            student.load_state_dict(incumbent.state_dict())
            chosen = "stored"
    return {
        "seconds": time.perf_counter() - start,
        "refit_seconds": refit_seconds,
        "distil_seconds": run.seconds,
        "steps": run.steps,
        "lr": run.lr,
        "first_loss": run.first_loss,
        "last_loss": run.last_loss,
        "check_cosine": check_cosine,
        "check_sentences": sum(len(b.ids) for b, _ in check),
        "check_digest": digest,
        "stored_judged": judged,
        "check_held_out": train is not pairs,
        "kept": chosen,
    }


@torch.no_grad()
def embedding_cosine(student: fx.GraphModule, pairs: Sequence[tuple[TextBatch, Targets]]):
    """Mean cosine, over the sentences of ``pairs``, of the student's pooled embedding to
    the teacher's."""
    student.eval()
    total, n = 0.0, 0
    for batch, target in pairs:
        emb = pooled(student(batch.ids, batch.mask), batch.mask)
        total += float(F.cosine_similarity(emb, target.embedding, dim=-1).sum())
        n += len(batch.ids)
    return total / max(n, 1)


def calibrate_text(
    inn: IntegralModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    widths: Sequence[float | Mapping],
    seconds: float,
    *,
    multiple_of: int = 8,
    method: str = "auto",
    grid: str = "selected",
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    max_steps: int | None = None,
    refit_sentences: int = 1024,
    on_tier: Callable[[IntegralModel, int, int], None] | None = None,
    keep: Sequence[float | Mapping] = (),
    **distil_options,
) -> IntegralModel:
    """Calibrate a converted transformer at every width in ``widths`` (see the module doc).
    ``on_tier(model, done, total)``: called after each width but the last with the model as
    it stands (``calibrate``'s, for a caller that saves as it goes).

    ``ids``, ``mask``: (N, T) int64, the calibration sentences padded at the end (as
    ``runtime.repository.tokenizer.TextTokenizer.encode`` returns them). ``widths``: what
    ``IntegralModel.sizes`` takes - a fraction, ``{"heads": f, "ffn": f}`` (with
    ``"shaped": True`` or not) or counts per group; the full width is skipped (the teacher).
    A shaped width first has every group's sensitivity measured on the text
    (``runtime.inn.sensitivity``; stored as ``info["sensitivity"]``, which decides its
    counts, ``runtime.inn.shaping``). ``seconds``: the budget per width, sampling included
    (the teacher's pass and the sensitivity probes are shared and not counted; their
    seconds are recorded). ``multiple_of``
    and ``method`` must match the tiers' (model.yaml) so the calibrated networks are the ones
    the build samples. ``grid``: ``"selected"`` (default) starts each tier on the nodes
    ``runtime.inn.selection`` chooses on about ``refit_sentences`` of the sentences (one
    seeded subset for all tiers), stored with the INN as that count's grid; ``"uniform"``
    starts it from the uniform grid of ``method``. ``max_steps`` caps each width's steps
    (reproducible runs; 0: the refit alone); ``distil_options`` go to ``distil`` (``lr``,
    ``hidden_weight``, ``weight_decay``). ``keep``: widths served now (`innfer calibrate`
    passes model.yaml's tiers) that keep the grids they sample with where they have no
    calibrated tier (``runtime.inn.calibrate.keep_grids``: the grids chosen for a tier
    changed an uncalibrated one sharing a group's count; review helper-280).
    Returns a new IntegralModel (``inn`` is left as it was) whose ``info["text_calibration"]``
    records, per tier, the seconds and steps spent and the first and last loss; a tier an
    earlier run stored that this one does not beat on the check stays, with its record
    (``info["text_calibration_kept"]``: the check's cosines of each such tier).

    Example:
        >>> tuned = calibrate_text(inn, ids, mask, [{"heads": 0.5, "ffn": 0.5}], 300)
        ... # doctest: +SKIP
    """
    if not widths:
        raise ValueError("widths is empty; give at least one width in (0, 1)")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    ids, mask = check_text(ids, mask)
    out = inn.copy()
    out.info.pop("text_calibration_kept", None)  # this run's decisions only
    # A shaped width has its uniform width's totals: all full means nothing to calibrate.
    if not _tiers(inn, [unshaped(w) for w in widths], multiple_of):
        return out
    batches = length_batches(ids, mask, batch_size)
    teacher = inn.sample(1.0, calibrated=False)
    _check_embedded(teacher, ids, mask)
    targets = teacher_targets(teacher, batches, progress)
    grams = None
    sample = some_batches(batches, refit_sentences or len(ids), seed)
    if grid == "selected":  # one pass shared by the tiers, like the teacher's
        start = time.perf_counter()
        grams = readout_grams(inn, teacher, sample, progress)
        out.info["selection_seconds"] = time.perf_counter() - start
    if any(unshaped(w) is not w for w in widths):  # shared by the tiers too
        # imported here: runtime.inn.sensitivity builds on this module
        from runtime.inn.sensitivity import SCORE_SENTENCES, measure_sensitivity

        score = other_batches(batches, sample, SCORE_SENTENCES, seed)
        # the probes choose their nodes whatever grid the tiers start on
        probe_grams = readout_grams(inn, teacher, sample) if grams is None else grams
        out.info["sensitivity"] = measure_sensitivity(
            inn, teacher, probe_grams, score, multiple_of=multiple_of, method=method,
            progress=progress,
        )  # fmt: skip
    tiers = _tiers(out, widths, multiple_of)
    protected = _sized(out, keep, multiple_of)
    for i, sizes in enumerate(tqdm(tiers, desc="calibrate", unit="tier", disable=not progress)):
        if on_tier is not None and i:  # the widths before this one are done
            keep_grids(inn, out, protected)
            on_tier(out, i, len(tiers))
        start = time.perf_counter()
        torch.manual_seed(seed + i)
        if grams is not None:
            store_grids(out, select_nodes(inn, teacher, grams, sizes))
        select_seconds = time.perf_counter() - start
        student = out.sample(sizes, method=method, calibrated=False)
        # A tier an earlier run stored stays unless this one beats it on the check.
        incumbent = inn.sample(sizes, method=method) if inn.calibrated(sizes, method) else None
        stored = inn.info.get("text_calibration", {}).get(inn.sizes_key(sizes), {})
        # With max_steps the steps are the budget, as the image path's (review helper-238:
        # --steps 6000 stopped at the default 60 s, after 2,959-4,642 steps, unsaid).
        left = math.inf if max_steps is not None else seconds - (time.perf_counter() - start)
        record = calibrate_network(
            student, teacher, readouts(inn, sizes), batches, targets,
            left, refit_sentences=refit_sentences,
            max_steps=max_steps, seed=seed + i, progress=progress,
            desc=f"tier {i + 1}/{len(tiers)}", incumbent=incumbent,
            incumbent_check=stored.get("check_digest"), **distil_options,
        )  # fmt: skip
        key = out.set_tier(sizes, student.state_dict())
        record = {**record, "seconds": time.perf_counter() - start, "method": method,
                  "grid": grid, "select_seconds": select_seconds, "batch_size": batch_size,
                  "seed": seed + i, "sentences": len(ids)}  # fmt: skip
        if record["kept"] == "stored":  # the earlier run's weights, and its record, stay
            out.info.setdefault("text_calibration_kept", {})[key] = record["check_cosine"]
            if key in inn.info.get("text_calibration", {}):
                continue
        out.info.setdefault("text_calibration", {})[key] = record
        if not record["steps"] and max_steps != 0:
            log.warning(
                "tier %d/%d: its %.0f s went to choosing nodes (%.1f s) and the refit (%.1f s); "
                "no distillation step ran, so it is the refit alone: give it more seconds",
                i + 1, len(tiers), seconds, select_seconds, record["refit_seconds"],
            )  # fmt: skip
        elif max_steps is None and record["distil_seconds"] < 0.25 * seconds:
            # (the MiniLM demo on a busy machine: 1 s of 60 went to distillation, and its
            # tier ended at cosine 0.876 where the README's run has 0.904, without a word)
            log.warning(
                "tier %d/%d: only %.1f s of its %.0f s went to distillation (%d steps; choosing "
                "nodes %.1f s, the refit %.1f s): it is mostly the refit - give it more seconds",
                i + 1, len(tiers), record["distil_seconds"], seconds, record["steps"],
                select_seconds, record["refit_seconds"],
            )  # fmt: skip
    keep_grids(inn, out, protected)
    return out


def _sized(inn: IntegralModel, widths: Sequence, multiple_of: int) -> list[dict[str, int]]:
    """The channel counts of ``widths`` that can be told now (a shaped width needs the
    sensitivity measured: one that cannot be sized has no grid of its own to keep)."""
    out = []
    for w in widths:
        with contextlib.suppress(ValueError, KeyError):
            out.append(inn.sizes(w, multiple_of))
    return out


@torch.no_grad()
def _check_embedded(teacher: fx.GraphModule, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """ValueError unless ``teacher`` embeds the largest token id of ``ids``: a tokenizer with
    more tokens than the model's embedding table was an IndexError ("index out of range in
    self") deep in the teacher's pass, reported as a bug."""
    top = int(ids.max())
    row = int(torch.nonzero((ids == top).any(dim=1))[0])
    try:
        teacher(ids[row : row + 1], mask[row : row + 1])
    except IndexError:
        raise ValueError(
            f"the tokenizer gives token id {top}, past the model's embedding table: "
            "model.yaml's text.tokenizer is not this model's tokenizer (or tokens were added "
            "to it); use the one it was trained with"
        ) from None


def _tiers(inn: IntegralModel, widths: Sequence, multiple_of: int) -> list[dict[str, int]]:
    """The distinct channel counts of ``widths``, the full width left out (the teacher)."""
    tiers = _distinct([inn.sizes(w, multiple_of) for w in widths])
    return [s for s in tiers if s != inn.sizes(1.0)]


def _distinct(tiers: list[dict[str, int]]) -> list[dict[str, int]]:
    seen, out = set(), []
    for s in tiers:
        key = IntegralModel.sizes_key(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out
