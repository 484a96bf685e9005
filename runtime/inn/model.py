"""IntegralModel: one stored network that can be sampled at any width.

The model keeps the source architecture (as a JSON description, see ``graphio``) and its
parameters at full resolution, which are the node values of the continuous weights. Sampling
turns every continuous group of ``m`` channels into ``n`` channels by one ``(n, m)`` matrix
per group, applied to every tensor dim the group binds (``groups.Binding``); input-side dims
also get the quadrature scale ``m / n``. The result is a plain ``torch.fx.GraphModule`` made
of ordinary ``torch.nn`` layers - nothing of ``runtime`` is needed to run it.

Files written by ``save``: ``inn.safetensors`` (the node values) and ``inn.json`` (format
version, architecture, groups, bindings, a SHA-256 of the weights file). No pickle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx

from runtime.hashing import sha256_file
from runtime.inn import graphio
from runtime.inn.continuous import (
    METHODS,
    Method,
    auto_method,
    quadrature_scale,
    resample_matrix,
)
from runtime.inn.divergence import check_weights
from runtime.inn.layout import NODE_PREFIX, Binding, GroupInfo, Layout, Segment, SizeField
from runtime.inn.shaping import SHAPED, allocate
from runtime.inn_files import META_FILE, WEIGHTS_FILE, pending, renaming

log = logging.getLogger("innfer.inn")

FORMAT_VERSION = 1
# Calibrated tier weights share the safetensors file with the nodes under this prefix
# ("tier:<sizes key>/<state name>"); node names come from nn.Module and never contain ":".
TIER_PREFIX = "tier:"

# A matrix builder: (group, n) -> (n, size) float64 resampling matrix.
MatrixFn = Callable[[GroupInfo, int], torch.Tensor]
# Kinds of continuous group a width may name fractions for (IntegralModel.kind).
KINDS = ("heads", "ffn")
# How a stored grid weighs the input side (IntegralModel.grid): "midpoint" scales it by m / n
# (the integral over the channel coordinate is kept), "unit" leaves the sampled nodes as they
# are (a grid on chosen nodes samples a sub-network, runtime.inn.selection).
GRID_QUADRATURES = ("midpoint", "unit")


class ModelFileError(ValueError):
    """A saved INN is missing, corrupted or does not match its description."""


def honour_umask(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open`` gives (0o666 less the umask): safetensors'
    ``save_file`` writes 0o600, so a repository built by one user could not be served by
    another while every other file it wrote was readable."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # read, not set and restored: another thread may be creating files meanwhile
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class IntegralModel:
    """A network whose continuous channel groups can be sampled at any width.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from runtime import convert
        >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
        >>> inn = convert(net, (torch.randn(1, 8),))
        >>> [(g.name, g.size) for g in inn.groups]
        [('0', 32)]
        >>> small = inn.sample(0.5)
        >>> small(torch.randn(2, 8)).shape
        torch.Size([2, 3])
        >>> inn.sizes(0.5)
        {'0': 16}
    """

    def __init__(
        self,
        spec: dict[str, Any],
        state: dict[str, torch.Tensor],
        groups: list[GroupInfo],
        bindings: list[Binding],
        size_fields: dict[str, list[SizeField]],
        info: dict[str, Any] | None = None,
        tiers: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.spec = spec
        self.state = state
        self.all_groups = groups
        self.bindings = bindings
        # group name -> channels one entry spans (``unit``): the least ``inner`` of its runs
        # in the bindings' layouts (Segment.group indexes all_groups); fixed with them
        inners: dict[int, int] = {}
        for s in (s for b in bindings for s in b.layout):
            inners[s.group] = min(inners.get(s.group, s.inner), s.inner)
        self._units = {g.name: max(1, inners.get(i, 1)) for i, g in enumerate(groups)}
        self.size_fields = size_fields
        self.info = dict(info or {})
        # Calibrated weights of sampled networks (runtime.inn.calibrate), keyed by sizes_key:
        # the full state dict of the network sampled at exactly those channel counts.
        self.tiers: dict[str, dict[str, torch.Tensor]] = dict(tiers or {})

    def copy(self) -> IntegralModel:
        """An independent copy (tensors cloned): calibration returns one, leaving its input."""
        return IntegralModel(
            self.spec, {k: v.clone() for k, v in self.state.items()}, self.all_groups,
            self.bindings, self.size_fields, copy.deepcopy(self.info),
            {k: {n: t.clone() for n, t in d.items()} for k, d in self.tiers.items()},
        )  # fmt: skip

    # -- groups and widths -----------------------------------------------------------------
    @property
    def groups(self) -> list[GroupInfo]:
        """The continuous groups (name, full size, blocks, members); discrete ones excluded."""
        return [g for g in self.all_groups if not g.discrete]

    def group(self, name: str) -> GroupInfo:
        for g in self.groups:
            if g.name == name:
                return g
        fixed = next((g for g in self.all_groups if g.name == name), None)
        if fixed is not None:  # ("unknown group" for a layer the user can see; helper-298)
            why = self.info.get("kept", {}).get(name)
            raise ValueError(
                f"group {name!r} is fixed at its {fixed.size} channels ("
                + (f"kept: {why}" if why else "a model input or output, discrete=, or an op "
                   "that needs them whole")
                + f"); the continuous groups are {[g.name for g in self.groups]}"
            )  # fmt: skip
        raise ValueError(
            f"unknown group {name!r}; the continuous groups are {[g.name for g in self.groups]}"
        )

    def unit(self, g: GroupInfo) -> int:
        """Channels one entry of group ``g`` spans: 1 for plain channels, ``head_dim`` for a
        group of attention heads (its entries are whole heads). Read off the bindings'
        layouts - each of the group's runs says its entries per channel (``inner``) - and
        the smallest taken, because a member after a flatten spans H*W per channel without
        the group being heads. (A member dim's size over the group's size was wrong for a
        group that is one part of a concatenated dim with no member of its own size - the
        option-A pads: it read 4 and rounded them as heads.)"""
        return self._units.get(g.name, 1)

    def kind(self, g: GroupInfo) -> str:
        """``"heads"`` for a group of attention heads, else ``"ffn"`` (a transformer's FFN
        width; in a CNN every continuous group is of this kind). Tiers name fractions per
        kind: ``{"heads": 0.5, "ffn": 0.25}``."""
        return "heads" if self.unit(g) > 1 else "ffn"

    def sizes(self, width: float | Mapping[str, Any], multiple_of: int = 1) -> dict[str, int]:
        """Channel count per continuous group for ``width``.

        ``width``: a fraction in (0, 1] applied to every group (rounded to the nearest count,
        and to a multiple of ``multiple_of`` - vector lanes - where the group is that large;
        for heads the multiple counts channels, ``heads * head_dim``); a mapping from kind
        (``heads``, ``ffn``, see ``kind``) to a fraction for the groups of that kind; or a
        mapping from group name to a count in [1, full size] (entries: heads for a heads
        group). Groups not named keep their full size.

        Example:
            >>> inn.sizes({"heads": 0.5, "ffn": 0.5})  # doctest: +SKIP
            {'m.encoder.layer.0.intermediate.dense': 768, 'm.encoder.layer.0...query': 6, ...}
        """
        given, multiple_of = multiple_of, _count(multiple_of)
        if multiple_of is None or multiple_of < 1:
            raise ValueError(f"multiple_of must be an int >= 1, got {given!r}")
        # A group may be named like a kind (a layer ``self.ffn``): its name wins, so that
        # the counts ``sizes`` returns are read back as counts (review 185: every tier of
        # such a model failed with "width must be in (0, 1], got 16").
        kinds = set(width) & set(KINDS) if isinstance(width, Mapping) else set()
        if kinds and not kinds & self._group_names():
            return self._sizes_from_kinds(width, multiple_of)
        if isinstance(width, Mapping):
            return self._sizes_from_counts(width)
        w = check_width(width)
        return {g.name: self._rounded(g, w, multiple_of) for g in self.groups}

    def step(self, g: GroupInfo, multiple_of: int) -> int:
        """Entries per step of ``g``'s rounded widths: the fewest whose channels are a
        multiple of ``multiple_of`` and a multiple of the blocks (a grouped conv's or
        GroupNorm's groups); plain blocks where the group is too small."""
        q = math.lcm(multiple_of // math.gcd(multiple_of, self.unit(g)), g.blocks)
        return g.blocks if g.size < q or g.size % g.blocks else q

    def _rounded(self, g: GroupInfo, w: float, multiple_of: int) -> int:
        if w == 1.0:
            return g.size
        q = self.step(g, multiple_of)
        return min(g.size, max(q, round(w * g.size / q) * q))

    def _sizes_from_kinds(self, width: Mapping[str, Any], multiple_of: int) -> dict[str, int]:
        unknown = sorted(set(width) - {*KINDS, SHAPED})
        if unknown:
            raise ValueError(
                f"a width maps either kinds {list(KINDS)} to fractions (and optionally "
                f"{SHAPED!r}: true) or group names to counts, not both; got {unknown} beside "
                f"{sorted(set(width) & set(KINDS))}"
            )
        shaped = width.get(SHAPED, False)
        if not isinstance(shaped, bool):
            raise ValueError(f"{SHAPED!r} must be true or false, got {shaped!r}")
        for k, v in width.items():  # (model.yaml reads {heads: 4} as a count: a group's)
            if k != SHAPED and type(v) is int and v >= 2:
                raise ValueError(
                    f"{k!r} is a kind of group here (this model has no group of that name): "
                    f"give it a fraction in (0, 1], not {v}; channel counts name groups "
                    f"({', '.join(g.name for g in self.groups[:3])}, ...)"
                )
        fractions = {k: check_width(v) for k, v in width.items() if k != SHAPED}
        have = {self.kind(g) for g in self.groups}
        absent = sorted(k for k, f in fractions.items() if k not in have and f < 1.0)
        if absent:  # it was the full width, silently (review 185: {"heads": 0.25} on an MLP)
            raise ValueError(
                f"this model has no groups of kind {absent} (its continuous groups are of "
                f"kind {sorted(have) or 'none'}: 'heads' are attention heads, 'ffn' every "
                "other group); name its kinds, or give one fraction as the width"
            )
        uniform = {
            g.name: self._rounded(g, fractions.get(self.kind(g), 1.0), multiple_of)
            for g in self.groups
        }
        return self._shaped(uniform, fractions, multiple_of) if shaped else uniform

    def _shaped(
        self, uniform: dict[str, int], fractions: Mapping[str, float], multiple_of: int
    ) -> dict[str, int]:
        """``uniform``'s totals per kind, spread by the stored sensitivity curves
        (runtime.inn.shaping)."""
        curves = self.info.get("sensitivity", {}).get("groups")
        if not curves:
            raise ValueError(
                f"a width with {SHAPED!r}: true spreads channels by the per-layer sensitivity "
                "that text calibration measures, and this INN has none: run `innfer "
                "calibrate MODEL_DIR --text FILE` first (or drop 'shaped')"
            )
        out = dict(uniform)
        for kind in fractions:
            groups = [g for g in self.groups if self.kind(g) == kind]
            out.update(allocate(
                {g.name: g.size for g in groups}, {g.name: uniform[g.name] for g in groups},
                {g.name: self.step(g, multiple_of) for g in groups}, curves,
            ))  # fmt: skip
        return out

    def _group_names(self) -> set[str]:
        return {g.name for g in self.groups}

    def _sizes_from_counts(self, counts: Mapping[str, int]) -> dict[str, int]:
        out = {g.name: g.size for g in self.groups}
        for name, given in counts.items():
            g = self.group(name)
            n = _count(given)
            if n is None or not 1 <= n <= g.size:
                raise ValueError(
                    f"channel count for group {name!r} must be an int in [1, {g.size}], got "
                    f"{given!r}"
                )
            if n % g.blocks:
                raise ValueError(
                    f"channel count for group {name!r} must be a multiple of its {g.blocks} "
                    f"blocks (the groups of a grouped conv or GroupNorm on it), got {n}"
                )
            out[name] = n
        return out

    # -- sampling --------------------------------------------------------------------------
    def sample(
        self,
        width: float | Mapping[str, int] = 1.0,
        method: Method = "auto",
        multiple_of: int = 1,
        calibrated: bool = True,
    ) -> fx.GraphModule:
        """A plain ``nn.Module`` (eval mode) with every continuous group resampled.

        ``method``: ``"point"`` (interpolate at cell centres, as in the INN paper),
        ``"cell"`` (average over each new cell: merges neighbours), or ``"auto"`` (default:
        point where a group keeps >= 50 % of its channels, cell below - the better of the two
        in bench/conversion.py at each width).
        At ``width=1.0`` the result computes exactly what the source model computed.
        Where ``runtime.inn.calibrate`` stored weights for exactly these channel counts, they
        replace the resampled ones (whatever ``method``); ``calibrated=False`` skips them.
        A group sampled at a count with a stored grid (``grid``: tuned by calibration, or
        chosen by ``runtime.inn.selection``) is sampled on it at every width, with or
        without ``calibrated``.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        sizes = self.sizes(width, multiple_of)
        module = self.resample(
            sizes, lambda g, n: self.matrix(g, n, method), unit=self.unit_grids(sizes)
        )
        self._apply_norm_stats(module, sizes, method)
        tier = self.tiers.get(self.sizes_key(sizes)) if calibrated else None
        if tier is not None:
            module.load_state_dict(tier, strict=True)
        return module

    def set_tier(self, sizes: Mapping[str, int], weights: Mapping[str, torch.Tensor]) -> str:
        """Store ``weights`` (a state dict of the network ``sample(sizes)`` returns) as the
        calibrated network for ``sizes``; returns its key.

        Example:
            >>> key = inn.set_tier(sizes, tuned_module.state_dict())  # doctest: +SKIP
        """
        if not isinstance(sizes, Mapping):  # 0.5: "'float' object is not iterable"
            raise ValueError(
                f"sizes must be channel counts per group (inn.sizes(width)), got {sizes!r}"
            )
        # Every group named, as `sample` looks tiers up: a partial mapping (the groups left
        # out keep their full size) was stored under a key nothing would ever find.
        sizes = self.sizes(dict(sizes))
        key = self.sizes_key(sizes)
        if sizes == self.sizes(1.0):  # sample(1.0) would serve it: no longer the source
            raise ValueError(
                "the full width is the source model itself and keeps its weights; store "
                "calibrated weights for smaller widths only"
            )
        expected = {k: tuple(v.shape) for k, v in self.skeleton(sizes).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in weights.items()}
        if got != expected:
            wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            raise ValueError(
                f"weights do not match the network sampled at {key}: "
                + ", ".join(f"{k} is {got.get(k)}, expected {expected.get(k)}" for k in wrong[:4])
            )
        # A tier answering NaN at every input must not be stored (a diverged calibration).
        check_weights(weights.values(), f"the weights given for {key[:40]}")
        self.tiers[key] = {k: v.detach().clone() for k, v in weights.items()}
        return key

    def grid(self, group: str, n: int) -> dict | None:
        """The sampling grid stored for ``group`` at ``n`` channels, or None (uniform):
        ``{"points": [...], "quadrature": "midpoint" | "unit"}``. ``runtime.inn.calibrate``
        stores tuned points (a bare list: midpoint quadrature, the input side scaled by
        m / n); ``runtime.inn.selection`` stores points on chosen nodes with ``"unit"``
        quadrature (the sampled channels are those nodes, unscaled)."""
        grid = self.info.get("grids", {}).get(f"{group}@{n}")
        if grid is None:
            return None
        if not isinstance(grid, dict):
            grid = {"points": grid, "quadrature": "midpoint"}
        if grid.get("quadrature") not in GRID_QUADRATURES or len(grid.get("points", ())) != n:
            raise ValueError(
                f"the grid stored for {group}@{n} must hold {n} points and a quadrature in "
                f"{GRID_QUADRATURES}; got {len(grid.get('points', ()))} points and "
                f"{grid.get('quadrature')!r}: recalibrate the model"
            )
        return grid

    def unit_grids(self, sizes: Mapping[str, int]) -> set[str]:
        """Names of the groups whose stored grid at ``sizes`` has ``"unit"`` quadrature: their
        input side is sampled unscaled (``resample``'s ``unit``)."""
        out = set()
        for g in self.all_groups:
            n = sizes.get(g.name, g.size)
            grid = None if g.discrete or n == g.size else self.grid(g.name, n)
            if grid is not None and grid["quadrature"] == "unit":
                out.add(g.name)
        return out

    def matrix(self, g: GroupInfo, n: int, method: Method = "auto") -> torch.Tensor:
        """The (n, size) float64 matrix for group ``g``: a stored grid if there is one for
        this group and count (``grid``), else the uniform one for ``method``."""
        grid = self.grid(g.name, n)
        b = g.blocks
        if grid is not None:  # stored grids are point-sampling positions
            block = resample_matrix(g.size // b, n // b, "point", torch.tensor(grid["points"]))
        else:
            block = resample_matrix(g.size // b, n // b, method)
        return torch.block_diag(*[block] * b) if b > 1 else block

    @staticmethod
    def sizes_key(sizes: Mapping[str, int]) -> str:
        """Canonical text for a set of channel counts (keys per-width calibration data)."""
        return ",".join(f"{k}={sizes[k]}" for k in sorted(sizes))

    @staticmethod
    def parse_sizes_key(key: str) -> dict[str, int]:
        """The channel counts ``sizes_key`` wrote: ``""`` (a model without continuous
        groups) is no counts. ValueError on anything else that is not ``name=count,...``.

        Example:
            >>> IntegralModel.parse_sizes_key("a=4,b=2"), IntegralModel.parse_sizes_key("")
            ({'a': 4, 'b': 2}, {})
        """
        out = {}
        for item in key.split(",") if key else ():
            name, sep, count = item.rpartition("=")
            if not sep or not name:
                raise ValueError(f"tier key {key!r}: {item!r} is not name=count")
            out[name] = int(count)
        return out

    def calibrated(self, sizes: Mapping[str, int], method: Method = "auto") -> bool:
        """Whether ``sample(sizes, method)`` returns stored statistics or weights for
        exactly these channel counts (``reestimate_norms``, ``runtime.inn.calibrate``)
        rather than the resampled ones alone.

        Example:
            >>> inn.calibrated(inn.sizes(0.5))  # doctest: +SKIP
            True
        """
        # Every group named, as ``sample`` and ``set_tier`` look tiers up (review 185: a
        # partial mapping sample() served calibrated was said not to be).
        sizes = self.sizes(dict(sizes))
        return self.sizes_key(sizes) in self.tiers or bool(self._norm_stats(sizes, method))

    def sampling(self, sizes: Mapping[str, int], method: Method = "auto") -> str:
        """The resampling each reduced group gets at ``sizes`` with ``method`` ("auto"
        resolved per group), as text: what norm statistics stored for these counts were
        measured with (``reestimate_norms`` records it).

        Example:
            >>> inn.sampling({"fc1": 32}, "auto")  # doctest: +SKIP
            'fc1=cell'
        """
        out = []
        for g in self.groups:
            n = sizes.get(g.name, g.size)
            if n != g.size:
                out.append(f"{g.name}={auto_method(g.size, n) if method == 'auto' else method}")
        return ",".join(out)

    def _norm_stats(self, sizes: Mapping[str, int], method: Method) -> dict | None:
        """The statistics stored for these counts, where they were measured on the network
        ``method`` samples: those of another sampling are another network's (``innfer
        train`` stores point-sampled ones; model.yaml's ``method: cell`` served them on
        cell-averaged weights: 0.26 where its own gave 0.84). Statistics stored before the
        sampling was recorded apply whatever the method, as they always did."""
        key = self.sizes_key(sizes)
        stats = self.info.get("norm_stats", {}).get(key)
        measured = self.info.get("norm_stats_sampling", {}).get(key)
        if not stats or (measured is not None and measured != self.sampling(sizes, method)):
            return None
        return stats

    def _apply_norm_stats(
        self, module: fx.GraphModule, sizes: Mapping[str, int], method: Method
    ) -> None:
        """Norm statistics re-estimated for exactly these sizes and this sampling replace
        the resampled ones."""
        stats = self._norm_stats(sizes, method)
        if not stats:
            return
        buffers = dict(module.named_buffers())
        with torch.no_grad():
            for name, values in stats.items():
                buffers[name].copy_(torch.tensor(values, dtype=buffers[name].dtype))

    # Bumped whenever sampling computes something else for the same INN and width: part of
    # every tier's source hash (runtime/build), so `innfer build` exports the tiers again
    # instead of keeping an ONNX that no longer matches `sample`. 2: running variances kept
    # at or above the smallest stored one. 3: an option-A pad group rounded to multiple_of
    # (924d230; left at 2, a build after an upgrade or a rollback kept the other release's
    # ONNX, failed its validation on every run and discarded the engine - helper-310). (An
    # INN converted before a conversion fix - such as add/sub's alpha on the torch.export
    # path - must be converted again.)
    SAMPLER_VERSION = 3

    def resampled_state(
        self,
        state: Mapping[str, torch.Tensor],
        mats: Mapping[int, torch.Tensor],
        quadrature: bool = True,
        differentiable: bool = False,
        unit: Collection[int] = (),
    ) -> dict[str, torch.Tensor]:
        """``state`` with every bound tensor resampled by ``mats`` (group index -> matrix).
        ``differentiable=True`` keeps autograd (float32 matmuls): training and grid tuning.
        Groups in ``unit`` (indices) keep their input side unscaled whatever ``quadrature``."""
        out = dict(state)
        for b in self.bindings:
            if any(s.group in mats for s in b.layout):
                out[b.param] = self._resample_dim(
                    out[b.param], b, mats, quadrature, differentiable, unit
                )
                if b.param.endswith("running_var"):
                    # The cubic kernel's negative lobes can take a variance below zero (NaN
                    # outputs): none is smaller than the smallest stored one.
                    floor = max(float(state[b.param].min()), 0.0)
                    out[b.param] = out[b.param].clamp_min(floor)
        return out

    def resample(
        self,
        sizes: Mapping[str, int],
        matrix: MatrixFn,
        quadrature: bool = True,
        unit: Collection[str] = (),
    ) -> fx.GraphModule:
        """Sample with caller-given matrices: the hook for baselines (pruning, truncation).

        ``matrix(group, n)`` returns the ``(n, size)`` map for one group. ``quadrature=False``
        leaves input-side dims unscaled (as channel pruning does); ``unit`` names the groups
        for which that holds alone (their matrices pick nodes, as a selected grid does).
        """
        mats = {}
        for gi, g in enumerate(self.all_groups):
            n = sizes.get(g.name, g.size) if not g.discrete else g.size
            if n != g.size:
                a = matrix(g, n)
                if tuple(a.shape) != (n, g.size):
                    raise ValueError(f"matrix for {g.name!r}: shape {tuple(a.shape)}")
                mats[gi] = a.to(torch.float64)
        unit_idx = {gi for gi, g in enumerate(self.all_groups) if g.name in unit}
        state = self.resampled_state(self.state, mats, quadrature, unit=unit_idx)
        spec = self._spec_for({gi: a.shape[0] for gi, a in mats.items()})
        for path, a in spec["attrs"].items():
            a["shape"] = list(state[path].shape)
        return graphio.from_spec(spec, state)

    def skeleton(self, sizes: Mapping[str, int]) -> fx.GraphModule:
        """The sampled architecture on the meta device (no weights, no initialisation):
        what ``torch.func.functional_call`` needs to run given tensors at these sizes."""
        counts = {
            gi: sizes[g.name]
            for gi, g in enumerate(self.all_groups)
            if not g.discrete and sizes.get(g.name, g.size) != g.size
        }
        spec = self._spec_for(counts)
        for b in self.bindings:
            a = spec["attrs"].get(b.param)
            if a is not None:
                a["shape"][b.dim] = sum(
                    n * s.inner for s, _, n in self._layout_sizes(b.layout, counts)
                )
        with torch.device("meta"):
            return graphio.from_spec(spec, {}, strict=False)

    def _spec_for(self, counts: Mapping[int, int]) -> dict:
        """The architecture description with every size-bearing kwarg at ``counts``."""
        spec = copy.deepcopy(self.spec)
        nodes = {e["name"]: e for e in spec["nodes"]}
        for key, fields in self.size_fields.items():
            if key.startswith(NODE_PREFIX):  # a literal size in a call (F.layer_norm)
                entry = nodes[key[len(NODE_PREFIX) :]]
                for f in fields:
                    if f.kwarg.isdigit():
                        args = list(entry["args"]["tuple"])
                        args[int(f.kwarg)] = self._sized(args[int(f.kwarg)], f, counts)
                        entry["args"] = {"tuple": args}
                    else:
                        kw = entry["kwargs"]["dict"]
                        kw[f.kwarg] = self._sized(kw[f.kwarg], f, counts)
                continue
            kwargs = spec["modules"][key]["kwargs"]
            for f in fields:
                kwargs[f.kwarg] = self._sized(kwargs.get(f.kwarg), f, counts)
        return spec

    def _layout_sizes(self, layout: Layout, counts: Mapping[int, int]) -> list[tuple]:
        """(segment, stored count, sampled count) per segment of ``layout``."""
        out = []
        for s in layout:
            g = self.all_groups[s.group]
            m = g.size
            n = counts.get(s.group, m)
            if s.per_block:
                m, n = m // g.blocks, n // g.blocks
            out.append((s, m, n))
        return out

    def _sized(self, encoded: Any, f: SizeField, counts: Mapping[int, int]) -> Any:
        """The stored argument ``encoded`` with ``f``'s size (element ``f.index``) set."""
        size = sum(n * s.inner for s, _, n in self._layout_sizes(f.layout, counts))
        if f.slot is not None:  # a bound of a slice: ``x[:, 0:27]`` over channel groups
            return self._sized_slice(encoded, f, size)
        if f.index is None:
            return size
        if isinstance(encoded, dict) and "tuple" in encoded:
            items = list(encoded["tuple"])
            items[f.index] = size
            return {"tuple": items}
        items = list(encoded)
        items[f.index] = size
        return items

    @staticmethod
    def _sized_slice(encoded: Any, f: SizeField, size: int) -> Any:
        """``encoded`` (a slice, or a tuple of indices holding one at ``f.index``) with the
        slice's bound ``f.slot`` (0 start, 1 stop) set to ``size``."""
        if f.index is None:
            bounds = list(encoded["slice"])
            bounds[f.slot] = size
            return {"slice": bounds}
        items = list(encoded["tuple"])
        items[f.index] = IntegralModel._sized_slice(items[f.index], replace(f, index=None), size)
        return {"tuple": items}

    def _resample_dim(
        self,
        t: torch.Tensor,
        b: Binding,
        mats: Mapping[int, torch.Tensor],
        quadrature: bool,
        differentiable: bool = False,
        unit: Collection[int] = (),
    ) -> torch.Tensor:
        work = t.dtype if differentiable else torch.float64
        x = (t if differentiable else t.detach()).movedim(b.dim, 0)  # (L, *rest): bound dim
        rest = x.shape[1:]
        pieces, offset = [], 0
        counts = {gi: a.shape[0] for gi, a in mats.items()}
        for s, m, n in self._layout_sizes(b.layout, counts):
            chunk = x[offset : offset + m * s.inner].reshape(m, s.inner, -1)  # (m, inner, R)
            offset += m * s.inner
            if s.group in mats:
                a = mats[s.group]
                if s.per_block:  # a is block-diagonal; one block maps a block's channels
                    a = a[:n, :m]
                if not (t.is_floating_point() or t.is_complex()):
                    # A mask or an index per channel: each sampled channel takes the value of
                    # the channel it weighs most. Interpolated and cast back, any nonzero
                    # neighbour turned a masked-off channel on (review 155).
                    chunk = chunk[a.abs().argmax(1)]
                else:
                    chunk = torch.einsum("nm,mir->nir", a.to(work), chunk.to(work))
                    if b.reduce and quadrature and s.group not in unit:
                        chunk = chunk * quadrature_scale(m, n)
            pieces.append(chunk.reshape(-1, *rest).to(t.dtype))
        return torch.cat(pieces).movedim(0, b.dim).contiguous()

    # -- persistence -----------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``inn.safetensors`` and ``inn.json`` into ``directory`` (created if needed).

        Both are written in full beside their names and synced to the disk, then renamed
        into place back to back (weights, then metadata): an interrupted save (``innfer
        calibrate`` and ``train`` save over the model they read) leaves the old INN whole,
        or the new one. Cut between the two renames, it leaves the new weights under the
        old metadata and the new metadata in its temporary file: an exception (Ctrl-C)
        still renames it, a killed process leaves it to ``load`` and the leftovers sweep
        (``runtime.inn_files``), which complete the save. Synced: after a power loss the
        renames alone could name empty files (ext4, xfs) - the INN a calibration or a
        training run made, lost."""
        from safetensors.torch import save_file

        from runtime.atomic import sync_directory, sync_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # two savers of one pid: no collision
        weights = d / f".{WEIGHTS_FILE}.{tag}.tmp"
        meta_tmp = d / f".{META_FILE}.{tag}.tmp"
        tensors = dict(self.state)
        for key, tier in self.tiers.items():
            tensors.update({f"{TIER_PREFIX}{key}/{n}": t for n, t in tier.items()})
        try:
            try:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights))
            except Exception as exc:  # safetensors' own error for a disk full or read-only:
                # an OSError, said as one ("internal error: SafetensorError" before, after a
                # calibration's minutes were spent: review helper-234)
                if type(exc).__name__ != "SafetensorError":
                    raise
                raise OSError(f"cannot write the INN's weights in {d}: {exc}") from exc
            honour_umask(weights)
            meta_tmp.write_text(json.dumps(self._meta(tensors, sha256_file(weights)), indent=1))
            sync_file(weights)
            sync_file(meta_tmp)
            with renaming(d):  # another saver's pair is not renamed in between
                try:
                    os.replace(weights, d / WEIGHTS_FILE)
                finally:
                    if not weights.exists():  # renamed: the metadata follows, an exception
                        os.replace(meta_tmp, d / META_FILE)  # or not
        finally:
            if weights.exists():  # not renamed: the old INN stays whole, no temporary files
                weights.unlink()
                meta_tmp.unlink(missing_ok=True)
        sync_directory(d)
        return d

    def _meta(self, tensors: Mapping[str, torch.Tensor], weights_sha256: str) -> dict:
        """``inn.json``: everything but the tensors, and the checksum of the file of them."""
        return {
            "format": "innfer-inn",
            "version": FORMAT_VERSION,
            "weights_sha256": weights_sha256,
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "architecture": self.spec,
            "groups": [asdict(g) for g in self.all_groups],
            "bindings": [_binding_to_json(b) for b in self.bindings],
            "size_fields": {
                m: [_field_to_json(f) for f in fs] for m, fs in self.size_fields.items()
            },
            "info": self.info,
        }

    def module(self) -> fx.GraphModule:
        """The full-width network (same as ``sample(1.0)``)."""
        return self.sample(1.0)


def load(directory: str | Path) -> IntegralModel:
    """Load an INN saved by ``IntegralModel.save``, checked before use: the weights against
    the checksum ``inn.json`` records, ``inn.json`` against the weights (shapes, groups,
    the architecture rebuilt with them). ``inn.json`` itself carries no checksum: an edit
    that keeps it consistent (another kernel size of a pool) loads as that edit.

    Example:
        >>> inn = load("models/demo")  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    d = Path(directory)
    if d.is_file():  # "MODEL/inn.json/inn.json does not exist" said nothing of the mistake
        raise ModelFileError(
            f"{d} is a file: give the model's folder that holds it ({d.parent}), not a file in it"
        )
    meta_path, weights = d / META_FILE, d / WEIGHTS_FILE
    for p in (meta_path, weights):
        if not p.is_file():
            raise ModelFileError(
                f"{p} does not exist: give a model's folder (<repository>/<model>) holding "
                "an INN - inn.json and inn.safetensors, as `innfer train --out`, `innfer demo` "
                "and IntegralModel.save write them"
            )
    # Both files read as one pair, under the lock a save renames them under, and the
    # weights read once - hashed and parsed from the same bytes: a save into the folder
    # meanwhile (innfer calibrate saves after every tier) gave one save's weights under the
    # other's inn.json, or a false "corrupted" (285 of 4,565 loads in 20 s; helper-298).
    with renaming(d):
        try:
            meta_text, blob = meta_path.read_bytes(), weights.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"{d}: the INN cannot be read: {exc}") from exc
    try:
        meta = json.loads(meta_text.decode())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # (nested deep)
        raise ModelFileError(
            f"{meta_path} is not valid JSON ({exc}); the file is corrupted: restore it, or "
            "save the INN again (IntegralModel.save)"
        ) from exc
    _check_format(meta, meta_path)
    recorded = meta.get("weights_sha256")
    if not (isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded)):
        # (a hand edit: "the weights file is corrupted" blamed the other file; helper-219)
        raise ModelFileError(
            f"{meta_path} is malformed: weights_sha256 is {recorded!r}, not a sha256 hex "
            "digest; restore the file, or save the INN again (IntegralModel.save)"
        )
    digest = hashlib.sha256(blob).hexdigest()
    if digest != recorded:
        torn = pending(d, digest)  # a save killed between its two renames: finish it
        if torn is None:
            raise ModelFileError(
                f"{weights} does not match the checksum in {meta_path}: the weights file is "
                f"corrupted or belongs to another model"
            )
        log.warning("%s: a save was cut between its renames; read its %s from %s (the next "
                    "build completes it)", d, META_FILE, torn[0].name)  # fmt: skip
        meta = torn[1]
        _check_format(meta, torn[0])
    try:
        state = load_tensors(blob)
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{weights} cannot be read: {exc}") from exc
    del blob  # (the tensors are copies: the file's bytes need not stay)
    shapes = {k: list(v.shape) for k, v in state.items()}
    want = meta.get("shapes")
    if not isinstance(want, dict):  # a hand edit: KeyError / AttributeError before
        raise ModelFileError(f"{meta_path} is malformed: shapes is {want!r}, not an object")
    if shapes != want:
        diff = [k for k in sorted(set(shapes) | set(want)) if shapes.get(k) != want.get(k)]
        raise ModelFileError(
            f"{weights}: tensors do not match {meta_path}: "
            + ", ".join(f"{k} is {shapes.get(k)}, expected {want.get(k)}" for k in diff[:5])
        )
    tiers: dict[str, dict[str, torch.Tensor]] = {}
    for name in [k for k in state if k.startswith(TIER_PREFIX)]:
        key, _, param = name[len(TIER_PREFIX) :].partition("/")
        tiers.setdefault(key, {})[param] = state.pop(name)
    section = "groups"  # what is being read: named in the error (a hand edit's "'int'
    try:  # object is not iterable" or "'members'" said nothing of where; helper-219)
        groups = [
            GroupInfo(**{**g, "members": [tuple(x) for x in g["members"]]}) for g in meta["groups"]
        ]
        section = "bindings"
        bindings = [_binding_from_json(b) for b in meta["bindings"]]
        section = "size_fields"
        fields = {m: [_field_from_json(f) for f in fs] for m, fs in meta["size_fields"].items()}
        section = "architecture"
        model = IntegralModel(
            meta["architecture"], state, groups, bindings, fields, meta["info"], tiers
        )
        section = "groups' sizes against the weights"
        _check_bindings(model)  # the groups' sizes must cover the tensors they resample
        section = "architecture against the weights"
        graphio.from_spec(model.spec, state)  # the architecture must rebuild and accept weights
        section = "calibrated tiers"
        for key in tiers:  # each calibrated tier must fit the network sampled at its sizes
            model.set_tier(IntegralModel.parse_sizes_key(key), tiers[key])
    except (
        KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError,
        graphio.SpecError,
    ) as exc:  # fmt: skip
        # RuntimeError: torch refusing the weights for the architecture (size mismatch);
        # AttributeError: a field of another JSON type ("architecture": "x"; review 185)
        why = f"{exc} is missing" if isinstance(exc, KeyError) else str(exc)
        raise ModelFileError(f"{meta_path} is malformed in its {section}: {why}") from exc
    return model


def _check_format(meta: Any, path: Path) -> None:
    """ModelFileError unless ``meta`` (read from ``path``) describes an INN of this version."""
    if not isinstance(meta, dict) or meta.get("format") != "innfer-inn":
        raise ModelFileError(f"{path} is not an innfer INN description")
    if meta.get("version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has format version {meta.get('version')!r}; this innfer reads "
            f"version {FORMAT_VERSION}"
        )


def _check_bindings(model: IntegralModel) -> None:
    """Every bound dimension is exactly its layout's channels: an edited group size (the
    file is not checksummed, only the weights are) would otherwise sample a wrong network
    without an error. ValueError naming the tensor."""
    for b in model.bindings:
        shape = model.state[b.param].shape  # KeyError: a binding to no tensor
        covered = sum(m * s.inner for s, m, _ in model._layout_sizes(b.layout, {}))
        if not 0 <= b.dim < len(shape) or covered != shape[b.dim]:
            raise ValueError(
                f"binding of {b.param!r} dim {b.dim}: its groups cover {covered} channels, "
                f"the tensor has shape {list(shape)}"
            )


def as_number(x: Any) -> Any:
    """A one-element tensor or numpy value as the Python number it holds: ``torch.linspace``
    and numpy arrays give those, and ``np.float32(0.5)`` was refused as not a number.

    Example:
        >>> as_number(torch.tensor(0.5)), as_number(0.25)
        (0.5, 0.25)
    """
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    item = getattr(x, "item", None)  # numpy scalars
    return item() if callable(item) and type(x).__module__ == "numpy" else x


def _count(n: Any) -> int | None:
    """``n`` as an int (a Python, numpy or one-element tensor integer), or None."""
    n = as_number(n)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def check_width(width: Any) -> float:
    """``width`` as a fraction in (0, 1] (numpy and one-element tensors too), else a
    ValueError saying what it must be."""
    width = as_number(width)
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise ValueError(f"width must be a number in (0, 1] or a mapping, got {width!r}")
    w = float(width)
    if not (0.0 < w <= 1.0):  # also rejects NaN
        raise ValueError(f"width must be in (0, 1], got {width}")
    return w


def _layout_to_json(lay: Layout) -> list[list]:
    return [[s.group, s.inner, s.per_block] for s in lay]


def _layout_from_json(data: list) -> Layout:
    return tuple(Segment(int(g), int(i), bool(p)) for g, i, p in data)


def _binding_to_json(b: Binding) -> dict:
    return {"param": b.param, "dim": b.dim, "layout": _layout_to_json(b.layout), "reduce": b.reduce}


def _binding_from_json(d: dict) -> Binding:
    return Binding(d["param"], int(d["dim"]), _layout_from_json(d["layout"]), bool(d["reduce"]))


def _field_to_json(f: SizeField) -> dict:
    out = {"kwarg": f.kwarg, "layout": _layout_to_json(f.layout), "index": f.index}
    return out if f.slot is None else {**out, "slot": f.slot}


def _field_from_json(d: dict) -> SizeField:
    return SizeField(d["kwarg"], _layout_from_json(d["layout"]), d["index"], d.get("slot"))
