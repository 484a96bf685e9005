"""Random-width training: make every width of an INN good.

``TrainableINN`` is an ``nn.Module`` whose parameters are the INN's node values; calling it
with a width samples the network *differentiably* (the same resampling matrices as
``IntegralModel.sample``, kept in autograd) and runs it, so one optimizer step updates the
continuous weights for every width at once.

Each step follows the sandwich rule (Yu & Huang, "universally slimmable networks"): the full
width on the labels, the smallest allowed width and k random widths in between on the full
width's soft outputs (in-place distillation). Widths are global fractions or per group.

Use it from your own loop:

    >>> model = TrainableINN(inn)  # doctest: +SKIP
    >>> opt = torch.optim.AdamW(model.parameters(), 1e-3)  # doctest: +SKIP
    >>> for x, y in loader:  # doctest: +SKIP
    ...     sandwich_step(model, opt, x, y, sandwich_widths(rng, 0.25, k=2))
    >>> inn = model.to_inn()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from runtime.inn import graphio
from runtime.inn.model import IntegralModel

Width = float | Mapping[str, int]


class TrainableINN(nn.Module):
    """The INN as a trainable module: ``model(x, width)`` for any width in (0, 1].

    ``method``: resampling used in training ("auto", "point" or "cell"); the same one should
    be used when sampling tiers afterwards. ``x`` is the input, or a tuple of the inputs of
    a model that takes several (a transformer's ``(ids, mask)``). ``wrap``: applied to each
    sampled architecture before it runs, keeping its parameter names - e.g.
    ``runtime.inn.distill.with_hidden_states``, so that a text model also returns the
    states its distillation compares.
    """

    def __init__(
        self, inn: IntegralModel, method: str = "auto", cache: int = 64, wrap=None
    ) -> None:
        super().__init__()
        self.inn = inn
        self.method = method
        self._wrap = wrap
        full = graphio.from_spec(inn.spec, inn.state)
        self._param_names = [n for n, _ in full.named_parameters()]
        self.nodes = nn.ParameterList(
            [nn.Parameter(inn.state[n].detach().clone()) for n in self._param_names]
        )
        self._buffers_full = {n: b.detach().clone() for n, b in full.named_buffers()}
        self._skeletons: OrderedDict[str, nn.Module] = OrderedDict()
        self._cache = cache
        # Resampling matrices depend only on (group, count): building one loops in Python
        # (cell averaging integrates piece by piece), so rebuilding them every forward pass
        # took ~40 % of a training step. At most one entry per (group, count).
        self._matrices: dict[tuple[str, int], torch.Tensor] = {}

    def named_nodes(self) -> list[tuple[str, nn.Parameter]]:
        """(parameter name in the sampled network, its node values) for every parameter."""
        return list(zip(self._param_names, self.nodes, strict=True))

    def state_at_nodes(self) -> dict[str, torch.Tensor]:
        # Buffers as copies: in train mode BatchNorm updates its running statistics in place,
        # and a norm that is not resampled (the full width, a discrete group) would write one
        # width's statistics into the stored ones every other width then starts from (the
        # eval-mode full width drifted from the source model after a step at another width).
        # Training uses batch statistics; they are re-estimated per width afterwards.
        state = {n: b.clone() for n, b in self._buffers_full.items()}
        state.update(zip(self._param_names, self.nodes, strict=True))
        return state

    def _skeleton(self, sizes: Mapping[str, int]) -> nn.Module:
        key = IntegralModel.sizes_key(sizes)
        if key not in self._skeletons:
            skeleton = self.inn.skeleton(sizes)
            self._skeletons[key] = skeleton if self._wrap is None else self._wrap(skeleton)
            if len(self._skeletons) > self._cache:
                self._skeletons.popitem(last=False)
        self._skeletons.move_to_end(key)
        return self._skeletons[key]

    def _matrix(self, g, n):
        key = (g.name, n)
        if key not in self._matrices:
            self._matrices[key] = self.inn.matrix(g, n, self.method).to(torch.float32)
        return self._matrices[key]

    def sampled_state(self, sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
        mats = {}
        for gi, g in enumerate(self.inn.all_groups):
            n = sizes.get(g.name, g.size)
            if not g.discrete and n != g.size:
                mats[gi] = self._matrix(g, n)
        names = self.inn.unit_grids(sizes)
        unit = {gi for gi, g in enumerate(self.inn.all_groups) if g.name in names}
        return self.inn.resampled_state(self.state_at_nodes(), mats, differentiable=True, unit=unit)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...], width: Width = 1.0):
        sizes = self.inn.sizes(width)
        skeleton = self._skeleton(sizes)
        skeleton.train(self.training)
        inputs = x if isinstance(x, tuple) else (x,)
        return functional_call(skeleton, self.sampled_state(sizes), inputs)

    def to_inn(self) -> IntegralModel:
        """A new IntegralModel holding the trained node values (norm stats must be
        re-estimated per width afterwards: ``runtime.inn.calibrate.reestimate_norms``)."""
        state = dict(self.inn.state)
        for name, p in zip(self._param_names, self.nodes, strict=True):
            state[name] = p.detach().clone()
        info = {**self.inn.info, "trained": True, "norm_stats": {}, "norm_stats_sampling": {}}
        return IntegralModel(
            self.inn.spec, state, self.inn.all_groups, self.inn.bindings, self.inn.size_fields, info
        )


def _count(g, w: float) -> int:
    """``w`` of group ``g``'s channels, a whole multiple of its blocks (at least one each)."""
    q = g.blocks
    return min(g.size, max(q, round(w * g.size / q) * q))


def sandwich_widths(
    rng: random.Random, min_width: float, k: int = 2, groups: Sequence | None = None
) -> list[Width]:
    """[1.0, min_width, k random widths in between]; with ``groups`` (IntegralModel.groups),
    the random ones are drawn per group as channel counts, whole multiples of a grouped
    convolution's groups (``blocks``)."""
    if not 0 < min_width <= 1:
        raise ValueError(f"min_width must be in (0, 1], got {min_width}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    widths: list[Width] = [1.0, min_width]
    for _ in range(k):
        if groups:
            widths.append({g.name: _count(g, rng.uniform(min_width, 1.0)) for g in groups})
        else:
            widths.append(rng.uniform(min_width, 1.0))
    return widths


def sandwich_step(
    model: TrainableINN,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    widths: Sequence[Width],
    distill: bool = True,
    teacher_logits: torch.Tensor | None = None,
) -> dict[str, float]:
    """One optimizer step over ``widths`` (the first is the teacher for the others).

    ``teacher_logits``: outputs of a frozen model to distil every width from (calibration);
    otherwise the full width learns from the labels and teaches the rest (in-place).
    Gradients of all widths accumulate before the single step. Returns the losses, one per
    width in order, keyed by the width (``'1.000'``; ``'groups'`` for per-group counts), a
    repeated key numbered from its second use (``'groups#2'``, ``'1.000#2'`` when min_width
    is 1.0) - the full width's loss is always ``losses['1.000']``.
    """
    optimizer.zero_grad(set_to_none=True)
    losses = {}
    soft = None if teacher_logits is None else teacher_logits.detach().softmax(-1)
    for i, w in enumerate(widths):
        out = model(x, w)  # (B, classes)
        if soft is not None:
            loss = F.kl_div(out.log_softmax(-1), soft, reduction="batchmean")
        elif i == 0 or not distill:
            loss = F.cross_entropy(out, y)
            if distill:
                soft = out.detach().softmax(-1)
        else:
            loss = F.kl_div(out.log_softmax(-1), soft, reduction="batchmean")
        loss.backward()
        losses[_label(w, losses)] = float(loss.detach())
    optimizer.step()
    return losses


def _label(w: Width, taken: dict) -> str:
    """The loss key of ``w``, numbered when already ``taken`` (two random widths within
    0.0005, every per-group draw, or min_width 1.0 beside the full width would otherwise
    overwrite each other's loss - the progress bar then showed a distilled copy's loss as
    the full width's)."""
    base = f"{float(w):.3f}" if isinstance(w, (int, float)) else "groups"
    label, n = base, 1
    while label in taken:
        n += 1
        label = f"{base}#{n}"
    return label


# -- checkpoints without pickle ---------------------------------------------------------------
# The tensors of a checkpoint: ``checkpoint-<sha256[:16]>.safetensors``, named by content and
# never overwritten; ``checkpoint.json`` names the one it was saved with (``tensors_file``).
# Before, one checkpoint.safetensors was replaced in place: a run killed between its rename
# and the JSON's left a torn pair, and the run's progress was lost (review helper-150).
LEGACY_TENSORS = "checkpoint.safetensors"


def save_checkpoint(path: str | Path, model: TrainableINN, optimizer, meta: dict) -> None:
    """Node values + optimizer state as safetensors, scalars as JSON (resumable, no pickle).
    The tensors go to a new file named by their sha256, then ``checkpoint.json`` - the
    record that names it - is replaced whole, then the older tensor files go: wherever a run
    is killed, the record names a complete file, this epoch's or the last one's."""
    import hashlib

    from safetensors.torch import save

    from runtime.atomic import write_bytes

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"node.{i}": p.detach().contiguous() for i, p in enumerate(model.nodes)}
    opt = optimizer.state_dict()
    scalars: dict = {"param_groups": opt["param_groups"], "state": {}}
    for pid, st in opt["state"].items():
        scalars["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"opt.{pid}.{k}"] = v.contiguous()
            elif isinstance(v, (list, tuple)):  # LBFGS's history (review 185: float(list))
                for i, item in enumerate(v):
                    if item is not None:  # (LBFGS: [None] * history_size at first)
                        tensors[f"opt.{pid}.{k}#{i}"] = _state_tensor(item, k).contiguous()
                scalars["state"][str(pid)][k] = {"items": len(v)}
            elif v is None:
                scalars["state"][str(pid)][k] = None
            else:
                scalars["state"][str(pid)][k] = float(_state_tensor(v, k))
    blob = save(tensors)
    sha = hashlib.sha256(blob).hexdigest()
    name = f"checkpoint-{sha[:16]}.safetensors"
    write_bytes(d / name, blob)
    record = {"meta": meta, "optimizer": scalars, "tensors_file": name, "tensors_sha256": sha}
    write_bytes(d / "checkpoint.json", json.dumps(record).encode())
    for old in [*d.glob("checkpoint-*.safetensors"), d / LEGACY_TENSORS]:
        if old.name != name:
            old.unlink(missing_ok=True)


def _state_tensor(v, key: str) -> torch.Tensor:
    """An optimizer state value as a tensor, or a ValueError naming what a checkpoint
    cannot hold (numbers, tensors, None, or lists of them, only)."""
    if torch.is_tensor(v):
        return v
    if isinstance(v, (int, float)):
        return torch.tensor(float(v))
    raise ValueError(
        f"the optimizer's state {key!r} is a {type(v).__name__}: a checkpoint holds numbers, "
        "tensors and None, or lists of them; train without a checkpoint, or with another optimizer"
    )


def checkpoint_record(path: str | Path) -> dict:
    """``checkpoint.json`` of the checkpoint in ``path``, or a ValueError that names the
    file and the way on (a bare JSONDecodeError or "[Errno 2]" said neither)."""
    f = Path(path) / "checkpoint.json"
    try:
        data = json.loads(f.read_text())
    except FileNotFoundError:
        raise ValueError(f"no checkpoint to resume in {path} ({f.name} is missing)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{f} is unreadable ({exc}): the checkpoint is damaged; --force starts over in "
            "this --out (or train into another)"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
        raise ValueError(
            f"{f} is not a checkpoint record; --force starts over in this --out (or train "
            "into another)"
        )
    # (a record without its optimizer state was an internal error: KeyError: 'optimizer';
    # review helper-288)
    if not isinstance(data.get("optimizer"), dict):
        raise ValueError(
            f"{f} is damaged (no optimizer state); --force starts over in this --out (or "
            "train into another)"
        )
    return data


def load_checkpoint(path: str | Path, model: TrainableINN, optimizer) -> dict:
    """Restore what ``save_checkpoint`` wrote; returns its ``meta`` (epoch, rng state...).
    A ValueError where the tensors are not the ones the JSON was saved with (a run killed
    between the two writes)."""
    import hashlib

    from safetensors.torch import load

    d = Path(path)
    data = checkpoint_record(d)
    name = data.get("tensors_file", LEGACY_TENSORS)  # (absent: saved before files were named)
    if not isinstance(name, str) or Path(name).name != name:
        raise ValueError(f"{d / 'checkpoint.json'} is not a checkpoint record (tensors_file "
                         f"{name!r}); --force starts over in this --out")  # fmt: skip
    try:
        blob = (d / name).read_bytes()
    except FileNotFoundError:
        raise ValueError(
            f"the checkpoint in {d} has no {name} (its tensors); --force starts over in this "
            "--out (or train into another)"
        ) from None
    want = data.get("tensors_sha256")  # absent: a checkpoint from before it was recorded
    if want is not None and hashlib.sha256(blob).hexdigest() != want:
        raise ValueError(
            f"the checkpoint in {d} is torn: {name} is not the file checkpoint.json was "
            "saved with (a run stopped while saving); --force starts over in this --out, or "
            "train from an older copy of the checkpoint"
        )
    tensors = load(blob)
    with torch.no_grad():
        for i, p in enumerate(model.nodes):
            p.copy_(tensors[f"node.{i}"])
    scalars = data["optimizer"]
    state = {}
    for pid, st in scalars["state"].items():
        prefix = f"opt.{pid}."
        entry = {}
        for k, v in st.items():
            if isinstance(v, dict):  # a list, its items saved as tensors k#0, k#1, ...
                entry[k] = [tensors.get(f"{prefix}{k}#{i}") for i in range(int(v["items"]))]
            elif v is None:
                entry[k] = None
            else:
                entry[k] = torch.tensor(v)
        for key, t in tensors.items():
            if key.startswith(prefix) and "#" not in key:
                entry[key[len(prefix) :]] = t
        state[int(pid)] = entry
    optimizer.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
    return data["meta"]
