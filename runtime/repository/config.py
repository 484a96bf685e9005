"""``model.yaml``: validated config classes for one model in a repository. No torch.

Each field is declared once (default, bounds, one-line doc) with ``runtime.configspec.spec``;
the parser is derived from the declarations, and checks that involve several fields live in
each class's ``validate``. An error names the file, the field path, the value and what is
allowed:

    models/mnist/model.yaml: tiers[1].width: got 1.5, expected a number in (0, 1], a
      mapping {group: channels} or a mapping of kinds {heads: fraction, ffn: fraction} ...

Example ``model.yaml``:

    inputs:
      - {name: input, dtype: float32, shape: [1, 28, 28]}   # per sample; batch is axis 0
    outputs:
      - {name: logits, dtype: float32, shape: [10]}
    tiers:                       # largest first is conventional, not required
      - {name: w100, width: 1.0}
      - {name: w050, width: 0.5}
    backends: [onnxruntime]      # preference order; the first available one is used
    precision: fp32
    max_batch: 8
    default_latency_budget_ms: 50
    multiple_of: 8               # round channel counts (vector lanes); 16 for tensor cores
    threads: 2                   # ONNX Runtime intra-op threads per engine
    instances: 1                 # batches of this model at once (engine threads)
    slo_target: 0.999            # plans meet their deadlines with this probability
    admit_quantile: 0.5          # refuse at arrival only if this quantile of the plan misses
    plan_overhead: null          # null: the server's plan_overhead; true / false: this model's
    # channel_search: {multiples: [8, 16, 32]}   # time channel counts near each width
    # auto_tiers: {max_tiers: 4, accuracy_floor: 0.9}  # let the server choose the widths

``reference(ModelConfig)`` lists every key with its default, allowed values and doc.

Example:
    >>> cfg = ModelConfig.from_dict({"inputs": [{"name": "x", "dtype": "float32",
    ...     "shape": [4]}], "outputs": [{"name": "y", "dtype": "float32", "shape": [2]}],
    ...     "tiers": [{"name": "w100", "width": 1.0}]}, source="model.yaml")
    >>> cfg.tiers[0].name, cfg.max_batch
    ('w100', 8)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.configspec import (
    NAME,
    ConfigError,
    Where,
    describe,
    parse,
    read_config_yaml,
    read_yaml,
    reference,
    spec,
    to_dict,
)
from runtime.engines import BACKENDS

# spec() returns a dataclasses.field() carrying the rules; ruff cannot see that.
# ruff: noqa: RUF009

__all__ = [
    "DTYPES",
    "FP16_BACKENDS",
    "METHODS",
    "PRECISIONS",
    "AutoTiersConfig",
    "ChannelSearchConfig",
    "ConfigError",
    "EvaluationConfig",
    "ModelConfig",
    "TensorConfig",
    "TextConfig",
    "TierConfig",
    "describe",
    "read_yaml",
    "reference",
    "to_dict",
]

DTYPES = ("float32", "float16", "int64", "int32", "uint8", "bool")
PRECISIONS = ("fp32", "fp16")
# The INN sampling methods of runtime.inn.continuous.METHODS, repeated because importing
# that module imports torch (tests/test_config.py checks the two agree).
METHODS = ("auto", "point", "cell")
# Backends that build fp16 engines: TensorRT, and torch (meant for CUDA). ONNX Runtime here
# is the CPU provider, which builds fp32 only (runtime/engines/onnxruntime.py).
FP16_BACKENDS = ("tensorrt", "torch")

_WIDTH = (
    "a number in (0, 1], a mapping {group: channels} or a mapping of kinds "
    "{heads: fraction, ffn: fraction} (add shaped: true to spread each kind's channels over "
    "the layers by the sensitivity text calibration measured)"
)
# Kinds of continuous group a width may give fractions for (runtime.inn.model.KINDS: heads
# are attention heads, ffn every other group - a transformer's FFN width).
KINDS = ("heads", "ffn")
# The key of a kinds width asking for a shaped tier (runtime.inn.shaping.SHAPED).
SHAPED = "shaped"
# A per-sample dim that varies per request (a sequence axis).
DYNAMIC = -1


def _counts_for_groups_named_as_kinds(v: dict) -> bool:
    """Whether a width that names a kind gives it a channel count (a whole number >= 2,
    which no fraction is): a group of that name (a layer ``self.ffn``), counted like any
    other group (review 185: ``{ffn: 16}`` was refused as a fraction)."""
    return any(type(n) is int and n >= 2 for k, n in v.items() if k in KINDS)


def _width(v: Any, where: Where) -> float | dict[str, int] | dict[str, float]:
    """A tier width: a fraction of every group's channels, fractions per kind of group, or
    channels per group."""
    if isinstance(v, dict) and not v:  # every group at its full size: the full tier, silently
        where.fail(v, f"{_WIDTH}, naming at least one group or kind")
    if isinstance(v, dict) and set(v) & set(KINDS) and not _counts_for_groups_named_as_kinds(v):
        if set(v) - {*KINDS, SHAPED}:
            where.fail(
                v, f"either kinds {list(KINDS)} with fractions (and {SHAPED}: true|false) or "
                "group counts, not both",
            )  # fmt: skip
        for k, f in v.items():
            if k == SHAPED:
                if not isinstance(f, bool):
                    where.child(k).fail(f, "true (spread by measured sensitivity) or false")
            elif isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                where.child(k).fail(f, "a fraction in (0, 1]")
        return {k: f if k == SHAPED else float(f) for k, f in v.items()}
    if isinstance(v, dict):
        named = [k for k in v if k in KINDS]
        if any(isinstance(v[k], float) for k in named):
            # {heads: 0.5, ffn: 2} blamed heads' 0.5 as "a positive channel count" (helper-243)
            where.fail(
                v, f"fractions for kinds {list(KINDS)}, or channel counts for groups named "
                f"{' / '.join(named)}, not both",
            )  # fmt: skip
        for g, n in v.items():
            # Group names are strings, but YAML reads `{0: 4}` with an int key: the build then
            # refused "unknown group 0" while listing group '0' (an nn.Sequential's layers are
            # named 0, 1, ...), and tier.json's JSON key would never equal it again.
            if isinstance(g, bool) or not isinstance(g, (str, int)):
                where.child(str(g)).fail(g, "a group name (quote it: 'name': channels)")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                where.child(str(g)).fail(n, "a positive channel count")
        return {str(g): n for g, n in v.items()}
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        where.fail(v, _WIDTH)
    return float(v)


_DIMS = "a list of per-sample dims: positive ints, -1 for a dynamic (sequence) axis"


def _dims(v: Any, where: Where) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        where.fail(v, _DIMS)
    for i, d in enumerate(v):
        if isinstance(d, bool) or not isinstance(d, int) or not (d >= 1 or d == DYNAMIC):
            where.child(i).fail(d, "a positive int, or -1 for a dynamic axis")
    return tuple(v)


@dataclass(frozen=True, kw_only=True)
class TensorConfig:
    """A model input or output: name, dtype and per-sample shape (batch axis excluded)."""

    name: str = spec(pattern=NAME, doc="tensor name, as in the ONNX graph and requests")
    dtype: str = spec("float32", choices=DTYPES, doc="element type (numpy name)")
    shape: tuple[int, ...] = spec(
        parse=_dims,
        expected=_DIMS,
        doc="per-sample shape; the batch axis is left out; -1: varies per request (sequence)",
    )

    @property
    def dynamic(self) -> tuple[int, ...]:
        """Per-sample axes whose size varies per request (-1 in ``shape``)."""
        return tuple(i for i, d in enumerate(self.shape) if d == DYNAMIC)

    def concrete(self, length: int) -> tuple[int, ...]:
        """The per-sample shape with every dynamic axis at ``length``."""
        return tuple(length if d == DYNAMIC else d for d in self.shape)


@dataclass(frozen=True, kw_only=True)
class TierConfig:
    """A size tier: a name clients can ask for and a width (fraction or {group: channels})."""

    name: str = spec(pattern=NAME, doc="what clients ask for (request parameter 'tier')")
    width: float | dict[str, int] = spec(
        parse=_width, expected=_WIDTH, doc="fraction of the full width, or channels per group"
    )


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """Optional: what measures each tier's accuracy at build time - a classifier's data set
    (top-1 accuracy on its test split), or a text embedder's held-out sentences (embedding
    fidelity: the mean cosine of the tier's embeddings to the full width's)."""

    dataset: str | None = spec(
        None,
        doc="classifier: data set name in runtime.demo.data.DATASETS (e.g. mnist5k), or a "
        ".npz file of your own in the model's directory (x_train, y_train, x_test, y_test; "
        "or x, y)",
    )
    text: str | None = spec(
        None,
        pattern=NAME,
        doc="text model: a file in the model's directory, one held-out sentence per line "
        "(not the calibration text)",
    )
    limit: int = spec(1000, lo=1, hi=10**7, doc="test samples per tier (build time grows)")

    def validate(self, where: Where) -> None:
        if (self.dataset is None) == (self.text is None):
            where.fail(to_dict(self), "exactly one of dataset (classifier) or text (text model)")


@dataclass(frozen=True, kw_only=True)
class ChannelSearchConfig:
    """Optional: time a few channel roundings of each fractional tier and keep the fastest per
    unit of accuracy (runtime/build/channels.py has the rule)."""

    multiples: tuple[int, ...] = spec(
        (8, 16, 32),
        lo=1,
        hi=256,
        nonempty=True,
        unique=True,
        doc="candidate roundings: one candidate per multiple, besides multiple_of's own",
    )
    batch: int | None = spec(
        None, lo=1, hi=4096, doc="batch size the candidates are timed at; null: max_batch"
    )
    repeats: int = spec(10, lo=3, hi=1000, doc="timed runs per candidate (their median counts)")


# Requests a server keeps per model for auto-tiering (server/traffic.py's ring, ~5 MB): a
# ``rebuild.min_requests`` above it could never be reached, and a check waited for ever.
TRAFFIC_CAPACITY = 200_000

# Sections a blank key (every setting commented out) would silently turn off; auto_tiers:
# blank is said by the build instead (``auto_tiers_empty_note``).
_BLANK_REFUSED = {
    "text": "text input",
    "evaluation": "accuracy measured at build time",
    "channel_search": "the channel-count search",
}

# A budget above this is no deadline anyone means (11.6 days): the server refuses it in a
# request, and the answer reports budgets in int64 microseconds (a default of 1e30 ms
# failed every request without a deadline INTERNAL there: review 160).
MAX_BUDGET_MS = 1e9

# The default candidate widths of auto-tiering: 1/16 steps from a quarter to the full width.
AUTO_WIDTHS = tuple(k / 16 for k in range(16, 3, -1))


@dataclass(frozen=True, kw_only=True)
class RebuildConfig:
    """When auto-tiering may replace the live tier set (``auto_tiers.rebuild``)."""

    min_interval_s: float = spec(
        600.0, lo=0, unit="seconds", doc="at least this long between two tier-set changes"
    )
    check_interval_s: float = spec(
        30.0, lo=1, unit="seconds", doc="how often the server re-evaluates its tier set"
    )
    min_gain: float = spec(
        0.005, lo=0, hi=1,
        doc="score gain a new set must bring: expected served accuracy (misses count 0), "
        "where the live set misses the attainment floor also its shortfall (sim/tiering.py); "
        "a live set that breaks max_tiers, max_memory_mb or accuracy_floor is replaced "
        "whatever the gain",
    )  # fmt: skip
    # (Up to 10**7 parses, as before the cap was known: a model.yaml that loaded must not
    # stop loading on an upgrade. A server counts at most TRAFFIC_CAPACITY and says so.)
    min_requests: int = spec(
        500, lo=10, hi=10**7,
        doc="recorded requests (within window_s) needed before a choice is made; a server "
        f"keeps the last {TRAFFIC_CAPACITY:,} per model, so more count as that many",
    )  # fmt: skip
    drift: float = spec(
        0.2, lo=0, hi=10,
        doc="choose again only when the recent traffic's rate, a budget quantile (p10, p50, "
        "p90) or mean rows moved by more than this fraction since the last choice; also the "
        "least move (KS distance of the budgets, relative mean rows) that counts as a shift "
        "the window is started at, and that makes a choice stale once applied",
    )  # fmt: skip
    nice: int = spec(10, lo=0, hi=19, doc="niceness of the background builder process")


@dataclass(frozen=True, kw_only=True)
class AutoTiersConfig:
    """Goals instead of widths: the server chooses its tiers from the traffic it sees
    (runtime/build/frontier.py measures the candidates, sim/tiering.py chooses among them).
    ``tiers`` stay the set served until the first choice is made."""

    max_tiers: int = spec(4, lo=1, hi=16, doc="tiers served at once (engines in memory)")
    accuracy_floor: float | None = spec(
        None, lo=0, hi=1, doc="no tier less accurate than this (evaluation accuracy)"
    )
    max_memory_mb: float | None = spec(
        None, lo=0, lo_open=True, unit="MiB",
        doc="the chosen tiers' weights together (fp32 parameters) stay within this many "
        "mebibytes (2**20 bytes, Kubernetes' Mi)",
    )  # fmt: skip
    widths: tuple[float, ...] = spec(
        AUTO_WIDTHS, lo=0, hi=1, lo_open=True, nonempty=True, unique=True,
        doc="uniform candidate widths measured for the frontier",
    )  # fmt: skip
    shaped: bool = spec(
        True,
        doc="also measure non-uniform candidates that keep the groups whose narrowing costs "
        "most accuracy wider (per-group sensitivity)",
    )
    attainment_slack: float = spec(
        0.002, lo=0, hi=1,
        doc="attainment a set may give up, below the SLO target or (where that is out of "
        "reach) the best attainment the traffic allows, for accuracy",
    )  # fmt: skip
    keep_fastest: bool = spec(
        True,
        doc="every chosen set of 2 tiers or more keeps the fastest candidate (at one row or "
        "at a full batch, whichever serves the traffic better): a shift to tighter budgets is "
        "absorbed by the scheduler at once, not after the next choice and swap (with "
        "max_tiers 1 the one tier is the best for the traffic)",
    )
    window_s: float = spec(
        120.0, lo=1, unit="seconds",
        doc="recent traffic the choice is made for (from its last shift, where the requests "
        "a choice replays hold one)",
    )  # fmt: skip
    simulate_requests: int = spec(
        3000, lo=100, hi=10**6, doc="requests of that traffic each candidate set is simulated on"
    )
    rebuild: RebuildConfig = spec(RebuildConfig(), doc="when the live set may change")

    def validate(self, where: Where) -> None:
        # A candidate is named w<percent> (runtime/build/frontier.py): two widths that round
        # to the same percent would share a name and one would silently not be measured.
        by_name: dict[int, list[float]] = {}
        for w in self.widths:
            by_name.setdefault(round(w * 100), []).append(w)
        clashes = [ws for ws in by_name.values() if len(ws) > 1]
        if clashes:
            where.child("widths").fail(
                list(self.widths),
                "widths that round to distinct whole percents (candidates are named "
                "w<percent>: "
                + "; ".join(f"{ws} would all be w{round(ws[0] * 100):03d}" for ws in clashes)
                + ")",
            )


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """Optional: clients may send raw text (a BYTES input, one string per row); the server
    tokenizes it with the model's own tokenizer file and feeds the ids and mask inputs."""

    input: str = spec("text", pattern=NAME, doc="the BYTES input clients send strings on")
    tokenizer: str = spec(
        "tokenizer.json", pattern=NAME, doc="Hugging Face tokenizers file in the model's directory"
    )
    max_length: int = spec(
        256, lo=2, hi=65536, doc="tokens per text (special tokens included); longer is truncated"
    )
    ids: str = spec("input_ids", pattern=NAME, doc="the model input the token ids feed")
    mask: str = spec(
        "attention_mask", pattern=NAME, doc="the model input the mask feeds (1 token, 0 pad)"
    )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One model's ``model.yaml``.

    Example:
        >>> cfg = ModelConfig.from_dict({"inputs": [{"name": "x", "shape": [4]}],
        ...     "outputs": [{"name": "y", "shape": [2]}],
        ...     "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}]})
        >>> cfg.batch_sizes, cfg.tier("w050").width
        ((1, 2, 4, 8), 0.5)
    """

    inputs: tuple[TensorConfig, ...] = spec(
        nonempty=True, unique="name", doc="model inputs, in the order the graph takes them"
    )
    outputs: tuple[TensorConfig, ...] = spec(
        nonempty=True, unique="name", doc="model outputs; the first is scored by evaluation"
    )
    tiers: tuple[TierConfig, ...] = spec(
        nonempty=True, unique="name", doc="size tiers, largest first by convention"
    )
    backends: tuple[str, ...] = spec(
        ("onnxruntime",),
        choices=BACKENDS,
        nonempty=True,
        unique=True,
        doc="engine backends in preference order; the first available one is used",
    )
    precision: str = spec(
        "fp32",
        choices=PRECISIONS,
        doc="engine precision; fp16 on the backends that build it (tensorrt, torch), fp32 on "
        "a listed fallback that does not (onnxruntime)",
    )
    max_batch: int = spec(8, lo=1, hi=4096, doc="largest batch; profiled at 1, 2, 4, ...")
    default_latency_budget_ms: float = spec(
        100.0, lo=0, lo_open=True, hi=MAX_BUDGET_MS, unit="milliseconds",
        doc="budget when a request gives none",
    )  # fmt: skip
    multiple_of: int = spec(1, lo=1, hi=256, doc="round channel counts to a multiple of this")
    method: str = spec("auto", choices=METHODS, doc="how a tier samples the INN's channels")
    threads: int = spec(1, lo=1, hi=256, doc="ONNX Runtime intra-op threads per engine")
    spin: bool = spec(
        True,
        doc="ONNX Runtime's intra-op threads spin-wait for work between runs (ORT's default): "
        "with threads > 1 the lowest latency, but idle threads burn CPU that request "
        "handling and other models need (the MLP of bench/spin.py, 2 threads, a run every "
        "3 ms: 1.34-1.41 cores busy, 0.52-0.63 with false; p50 1.01-1.24 vs 1.47-1.53 ms). "
        "No effect at threads 1",
    )  # fmt: skip
    instances: int = spec(
        1, lo=1, hi=64,
        doc="batches of this model that may run at once, each on its own engine thread "
        "(Triton's instance_group count); a shared device (server device_slots) runs at most "
        "its slots in all. On a CPU, instances x threads should not exceed the cores. "
        "TensorRT gets one execution context per instance; torch engines run one batch at a "
        "time (one module per tier): such a model is planned with 1",
    )  # fmt: skip
    max_queue: int = spec(
        256, lo=1, hi=10**6,
        doc="requests queued before refusing more. Each arrival and decision costs the event "
        "loop time that grows with the queue (0.03 ms per arrival at 1,000 queued, 0.8 ms at "
        "50,000, 1.3 ms at 100,000; review helper-287): keep it within ~10,000. A queue "
        "that keeps filling makes the planner choose tiers that keep up with the arrivals "
        "(docs/design.md, a bounded queue)",
    )  # fmt: skip
    priority_levels: int = spec(
        0, lo=0, hi=10**6 - 1,
        doc="Triton's priority levels: 1 is the most urgent, a request's priority 0 (none) "
        "or above this count takes default_priority_level; 0 (the default): every level a "
        "request gives outranks one that gives none",
    )  # fmt: skip
    default_priority_level: int = spec(
        0, lo=0, hi=10**6 - 1,
        doc="the level of a request that gives no priority, in [1, priority_levels] "
        "(0: the last level, priority_levels)",
    )  # fmt: skip
    slo_target: float = spec(
        0.999, lo=0.5, hi=1, hi_open=True,
        doc="probability with which plans meet their deadlines: tiers and batches are "
        "planned at this quantile of each tier's latency distribution (admission: see "
        "admit_quantile)",
    )  # fmt: skip
    admit_quantile: float = spec(
        0.5, lo=0.01, hi=1, hi_open=True,
        doc="while fewer than max_batch requests wait, a request is refused at arrival "
        "(DEADLINE_EXCEEDED) only when this quantile of the plan that serves it misses its "
        "deadline (0.5: more likely missed than met; a refusal always misses); behind a "
        "full batch, at slo_target (a refusal then also sheds load). Set it to slo_target "
        "to refuse everything the plans do not promise",
    )  # fmt: skip
    plan_overhead: bool | None = spec(
        None,
        doc="this model's plan_overhead (plan budgets short by the learned request "
        "overhead); null: the server's setting (on by default). Without it the answers' way "
        "out is not planned for: text models planned per length at 30 ms, MiniLM 83.7 vs "
        "99.5 % within budget",
    )
    evaluation: EvaluationConfig | None = spec(None, doc="measure tier accuracy at build time")
    text: TextConfig | None = spec(None, doc="accept raw text, tokenized in the server")
    mask_input: str | None = spec(
        None,
        pattern=NAME,
        doc="a sequence model's input that masks its padding (1 on tokens, 0 on padding; "
        "e.g. attention_mask, with ids its clients tokenize themselves): its requests of "
        "any length within one profiled length (a lane of lengths) then share batches padded "
        "to the longest, and a request padded by its client runs and is planned at its real "
        "length (the padding cut; masks checked 0 / 1, right-padded). Without it (or text:), "
        "a sequence model's requests are batched only with requests of the same lengths - "
        "padding would be data to it. (text: implies its mask)",
    )
    lengths: tuple[int, ...] | None = spec(
        None, lo=1, hi=65536, nonempty=True, unique=True,
        doc="sequence lengths each tier is profiled at (models with a -1 input dim); a "
        "request is planned at the smallest one >= its own length, the largest is the "
        "longest accepted; null with text: 16, 32, ... up to text.max_length",
    )  # fmt: skip
    channel_search: ChannelSearchConfig | None = spec(
        None,
        doc="at build time, time each fractional tier's channel counts rounded to a few "
        "multiples and keep the best accuracy per latency (tier.json records the search); "
        "null: round to multiple_of only",
    )
    auto_tiers: AutoTiersConfig | None = spec(
        None,
        doc="let the server choose and swap its tier widths from the traffic it sees; the "
        "tiers above are served until then (null: serve the tiers above only)",
    )
    name: str = spec("", doc="model name: its directory's (another is refused); may be left out")
    source: str = spec("", key=False, compare=False, doc="the file this was read from")
    # ``auto_tiers:`` written with no goals under it (YAML null: every key commented out)
    # reads as off, as ``auto_tiers: null`` does; build, serve and `tiers suggest` say so
    # (they said nothing, and auto-tiering never ran).
    auto_tiers_empty: bool = spec(
        False, key=False, compare=False, doc="model.yaml has auto_tiers with no goals (null)"
    )

    @property
    def auto_tiers_empty_note(self) -> str:
        """What to say about an ``auto_tiers`` with no goals ("" where it has some or is
        absent)."""
        if not self.auto_tiers_empty:
            return ""
        return (
            f"{self.source}: auto_tiers has no goals (it reads as null: are all its keys "
            "commented out?), so auto-tiering is off for this model; write auto_tiers: {} for "
            "its defaults, give goals (e.g. {max_tiers: 4}), or remove the key"
        )

    def validate(self, where: Where) -> None:
        """Checks across fields, so a config that cannot build is refused when read."""
        shared = sorted({t.name for t in self.inputs} & {t.name for t in self.outputs})
        if shared:
            where.child("outputs").fail(shared, "names that no input has")
        if self.precision == "fp16" and not set(self.backends) & set(FP16_BACKENDS):
            where.child("precision").fail(
                self.precision,
                f"fp32 for backends {list(self.backends)} (they build fp32 engines only); "
                f"for fp16 add {' or '.join(FP16_BACKENDS)} to backends",
            )
        if self.evaluation is not None and self.evaluation.text is not None:
            if self.text is None:
                where.child("evaluation").child("text").fail(
                    self.evaluation.text, "null for a model without a text: section (tokenizer)"
                )
        elif self.evaluation is not None:
            # runtime/build/pipeline.py scores accuracy as argmax over the first output,
            # feeding the data set to the only input.
            if len(self.inputs) != 1:
                where.child("evaluation").fail(
                    to_dict(self.evaluation), "no evaluation for a model with several inputs"
                )
            if len(self.outputs[0].shape) not in (1, 3):
                where.child("outputs").child(0).child("shape").fail(
                    list(self.outputs[0].shape),
                    "[classes] or [classes, H, W] per pixel (evaluation scores its argmax)",
                )

        if self.default_priority_level > self.priority_levels:
            where.child("default_priority_level").fail(
                self.default_priority_level,
                f"a level in [1, priority_levels] ({self.priority_levels}), or 0 for the last",
            )
        self._validate_sequence(where)
        floor = None if self.auto_tiers is None else self.auto_tiers.accuracy_floor
        if floor is not None and self.evaluation is None:
            # Without an evaluation the frontier's "accuracy" is each candidate's FLOPs
            # fraction (runtime/build/frontier.py): a floor of 0.9 silently kept only the
            # candidates with 90 % of the full width's FLOPs.
            where.child("auto_tiers").child("accuracy_floor").fail(
                floor,
                "null for a model without an evaluation: section (the candidates' accuracy is "
                "then their FLOPs fraction); add evaluation to measure it",
            )
        if self.auto_tiers is not None:
            self._validate_candidate_names(where)
        if self.auto_tiers is not None and self.sequence_lengths:
            where.child("auto_tiers").fail(
                to_dict(self.auto_tiers),
                "null for a model with a sequence (-1) axis (auto-tiering measures one "
                "latency per batch size; sequence models are not supported yet)",
            )
        search = self.channel_search
        if search is not None and search.batch is not None and search.batch > self.max_batch:
            where.child("channel_search").child("batch").fail(
                search.batch, f"a batch size <= max_batch ({self.max_batch}) or null"
            )

    def _validate_candidate_names(self, where: Where) -> None:
        """With auto_tiers, a hand-written tier may not take the name of a frontier candidate
        of another network (``w<percent>`` of another width, any ``s<percent>``): after a
        swap, requests pinned to it were served by the candidate - the same name, another
        network - and its metric series ran on across both (review helper-283)."""
        for i, tier in enumerate(self.tiers):
            m = re.fullmatch(r"([ws])(\d{3})", tier.name)
            if m is None:
                continue
            uniform = not isinstance(tier.width, dict)
            if m[1] == "w" and uniform and round(tier.width * 100) == int(m[2]):
                continue  # the candidate of that name is this tier's width
            what = (f"the candidate of width {int(m[2]) / 100:g}" if m[1] == "w"
                    else "a shaped candidate")  # fmt: skip
            where.child("tiers").child(i).child("name").fail(
                tier.name,
                f"a name auto-tiering does not give {what} (it names its candidates "
                f"w<percent> and s<percent>: after a swap a request pinned to "
                f"{tier.name!r} would be served by that other network); rename it, e.g. "
                f"'hand_{tier.name}'",
            )

    def _validate_sequence(self, where: Where) -> None:
        for i, t in enumerate(self.outputs):
            if t.dynamic:
                where.child("outputs").child(i).child("shape").fail(
                    list(t.shape), "fixed dims (dynamic outputs are not supported yet)"
                )
        for i, t in enumerate(self.inputs):
            if len(t.dynamic) > 1:
                where.child("inputs").child(i).child("shape").fail(
                    list(t.shape), "at most one dynamic (-1) axis: the sequence"
                )
        dynamic = [t.name for t in self.inputs if t.dynamic]
        if self.lengths is not None and not dynamic:
            where.child("lengths").fail(list(self.lengths), "null (no input has a -1 dim)")
        if dynamic and self.lengths is None and self.text is None:
            where.child("lengths").fail(
                None, f"the lengths to profile at, e.g. [16, 64, 256] (inputs {dynamic} are -1)"
            )
        if self.text is not None:
            self._validate_text(where.child("text"))
        if self.mask_input is not None:
            t = next((t for t in self.inputs if t.name == self.mask_input), None)
            if t is None or not t.dynamic or t.dtype not in ("int64", "int32", "bool"):
                where.child("mask_input").fail(
                    self.mask_input,
                    "the name of an int64/int32/bool input with a -1 (sequence) axis; inputs: "
                    + ", ".join(f"{i.name} {i.dtype} {list(i.shape)}" for i in self.inputs),
                )
            elif self.text is not None and self.mask_input != self.text.mask:
                where.child("mask_input").fail(
                    self.mask_input, f"null or text.mask ({self.text.mask!r}): text: masks"
                )

    def _validate_text(self, where: Where) -> None:
        text = self.text
        names = {t.name: t for t in self.inputs}
        if text.input in names or text.input in {t.name for t in self.outputs}:
            where.child("input").fail(text.input, "a name no model input or output has")
        for key in ("ids", "mask"):
            name = getattr(text, key)
            t = names.get(name)
            if t is None or t.shape != (DYNAMIC,) or t.dtype not in ("int64", "int32"):
                where.child(key).fail(
                    name, f"an int64/int32 input of shape [-1]; inputs: {list(names)}"
                )
        others = sorted(set(names) - {text.ids, text.mask})
        if others:
            where.fail(
                to_dict(text), f"a model whose inputs are only ids and mask (also: {others})"
            )
        if self.lengths is not None and max(self.lengths) < text.max_length:
            where.child("max_length").fail(
                text.max_length, f"at most the largest profiled length ({max(self.lengths)})"
            )

    @functools.cached_property  # read per request (server/dataplane.py); the config is frozen
    def sequence_lengths(self) -> tuple[int, ...]:
        """The profiled sequence lengths, ascending; () for a model with fixed shapes."""
        if not any(t.dynamic for t in self.inputs):
            return ()
        if self.lengths is not None:
            return tuple(sorted(self.lengths))
        out, n = [], 16
        while n < self.text.max_length:
            out.append(n)
            n *= 2
        return (*out, self.text.max_length)

    @property
    def sequence_profile(self) -> tuple[int, int, int] | None:
        """(shortest, tuned-for, longest) sequence length an engine must run, for a
        TensorRT optimisation profile; None for fixed shapes. Requests are padded to their
        batch's longest, so any length from 1 to the longest profiled one reaches the
        engine; TensorRT tunes for the middle profiled length.

        Example:
            >>> cfg.sequence_lengths, cfg.sequence_profile  # doctest: +SKIP
            ((16, 32, 64, 128), (1, 64, 128))
        """
        lengths = self.sequence_lengths
        if not lengths:
            return None
        return (1, lengths[len(lengths) // 2], lengths[-1])

    @property
    def example_length(self) -> int:
        """The sequence length FLOPs are counted and shapes exported at (the shortest
        profiled one; 1 for a model with fixed shapes: unused)."""
        return self.sequence_lengths[0] if self.sequence_lengths else 1

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Profiled batch sizes: 1, 2, 4, ... up to and including ``max_batch``."""
        sizes, b = [], 1
        while b < self.max_batch:
            sizes.append(b)
            b *= 2
        return (*sizes, self.max_batch)

    def input(self, name: str) -> TensorConfig:
        """The input called ``name`` (KeyError if there is none)."""
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def tier(self, name: str) -> TierConfig:
        """The tier called ``name`` (KeyError if there is none)."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read and validate ``path``; the model name is its directory's name, or for a
        deployed tier set ``<model>.model.yaml`` its file name's ``<model>`` (a ``name``
        that differs is refused: a model is served as its directory is named, and a
        ``name`` the server ignored misled whoever wrote it)."""
        path = Path(path)
        data = read_config_yaml(path, _BLANK_REFUSED)
        suffix = ".model.yaml"
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            # a tier set in a ConfigMap: its folder is the mount's (review helper-243:
            # `name: tiny` in tiny.model.yaml was "not its directory's name 'etc'")
            owner, what = path.name[: -len(suffix)], "file name's model"
            fix = "rename the file"
        else:
            # (absolute, not resolved: a model.yaml linked from elsewhere is its folder's
            # - resolved, the link's target's folder was blamed: helper-281; never "")
            owner, what = path.absolute().parent.name, "directory's name"
            fix = "rename the directory"
        if isinstance(data, dict) and data.get("name", owner) != owner:
            raise ConfigError(
                f"{path}: name: {data['name']!r} is not its {what} {owner!r}; a model is "
                f"served under its directory's name: {fix}, or leave name out"
            )
        data = {"name": owner, **data} if isinstance(data, dict) else data
        config = cls.from_dict(data, source=str(path))
        if isinstance(data, dict) and "auto_tiers" in data and data["auto_tiers"] is None:
            config = dataclasses.replace(config, auto_tiers_empty=True)
        return config

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>") -> ModelConfig:
        """Validate a mapping (parsed YAML); ``source`` names it in errors."""
        return parse(cls, data, Where(source), source=source)
